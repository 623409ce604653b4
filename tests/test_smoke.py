from conftest import run


def test_pmap_cell_function(ip, local_pool):
    run(ip, "def sq(x):\n    return x * x\n")
    assert run(ip, "%pmap -q sq, range(10)") == [x * x for x in range(10)]
