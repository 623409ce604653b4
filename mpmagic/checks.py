"""The one check of the API's number options (``workers``, ``chunksize``, ``timeout``,
``retries``, ``seed``, ``buffer``, a pool's size...): what the serial and stdlib
code takes, in one ``UsageError`` line that names the option, the value and what it takes.

A number that came from numpy (``arr.sum()``, ``np.argmax``, ``df[c].nunique()``)
is taken as the number it is, as ``range(np.int64(3))`` and
``multiprocessing.Pool(np.int64(2))`` take it: a whole number is anything
``operator.index`` takes (``int``, ``numpy.int64``...), a number anything
``numbers.Real`` (``float``, ``numpy.float32``, ``fractions.Fraction``, the whole
numbers too). A bool is neither (``workers=True`` is a mistake, not 1). The value
is handed on as a plain ``int`` or ``float``: it travels to the workers and into
the reports, which have no reason to hold a numpy scalar.

Imports nothing of mpmagic's but its errors: the worker side (``seeding``) uses it too.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
import threading
from collections.abc import Callable

from .errors import ArgumentTypeError, UsageError

#: Digits a whole number is shown with in full in a message; past them, abbreviated (``number_text``).
SHOWN_DIGITS = 20


def number_text(value: object) -> str:
    """``value`` as a message shows it: its ``repr``, but a whole number of more than
    ``SHOWN_DIGITS`` digits abbreviated (``10**400``, ``-10**30``, ``999999... (29 digits)``).

    Why: ``workers=10**400`` was refused with all 401 digits in the line, and
    ``repr`` of an int past 4300 digits raises ValueError (Python's limit on
    int-to-text), which would replace the refusal with an unrelated error.
    """
    number = whole(value)
    if number is None or -(10**SHOWN_DIGITS) < number < 10**SHOWN_DIGITS:
        return repr(value)
    sign, size = ("-" if number < 0 else ""), abs(number)
    digits = int(math.log10(size)) + 1  # (log10 takes any int; a float's rounding is corrected next)
    while size < 10 ** (digits - 1):
        digits -= 1
    while size >= 10**digits:
        digits += 1
    if size == 10 ** (digits - 1):
        return f"{sign}10**{digits - 1}"
    return f"{sign}{size // 10 ** (digits - 6)}... ({digits} digits)"


def size_refused(template: str, *sizes: object, keyword: str = "workers") -> UsageError:
    """The UsageError refusing a number of workers or ranks: ``template`` with each ``{}``
    one of ``sizes`` as a call gives it (``workers = 1000``); a magic says it as its line
    gave it (``-n 1000``, :func:`size_said_as`).

    Why: ``%pmap -n 1000`` was refused as ``workers = 1000``, in the API's words, where
    ``%%parallel -n 1000`` said ``-n 1000``, and so did ``parallel(code, workers=1000)``,
    in the magic's words: each now names what its user typed.
    """
    shown = tuple(number_text(size) for size in sizes)
    error = UsageError(template.format(*(f"{keyword} = {size}" for size in shown)))
    error.mpmagic_sizes = (template, shown)  # type: ignore[attr-defined]  # (read by size_said_as)
    return error


def size_said_as(error: BaseException, option: str) -> str:
    """``error``'s message as a magic says it: a refusal of :func:`size_refused` with
    its sizes as ``option N`` (``-n 1000``, as the line gave them); any other error's
    message as it is."""
    sizes = getattr(error, "mpmagic_sizes", None)
    if sizes is None:
        return str(error)
    template, shown = sizes
    return str(template.format(*(f"{option} {size}" for size in shown)))


def whole(value: object) -> int | None:
    """``value`` as a plain int if it is a whole number (``operator.index`` takes it:
    ``int``, ``numpy.int64``...), not a bool; else None."""
    if type(value) is int:  # (the usual: every run checks its options)
        return value
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def real(value: object) -> float | None:
    """``value`` as a plain float if it is a real number (``numbers.Real``, or a whole
    number ``operator.index`` takes), not a bool; else None. A whole number too large
    for a float (``10**400``) is infinite, as ``1e400`` is (``float('1e400')`` is
    ``inf``): no wait in seconds can reach it either. NaN stays NaN (each check refuses it)."""
    if type(value) is float:  # (the usual, and an ABC's isinstance costs ~1 us a check)
        return value
    if isinstance(value, bool):
        return None
    number: numbers.Real | int | None = value if isinstance(value, numbers.Real) else whole(value)
    if number is None:
        return None
    try:
        return float(number)
    except OverflowError:  # (an int or a Fraction past float's range)
        return -math.inf if number < 0 else math.inf


def check_whole(name: str, value: object, least: int = 1, takes: str | None = None,
                most: int | None = None) -> int:
    """``value`` as a plain int if it is a whole number of at least ``least`` (and at
    most ``most``, if given), else a ``UsageError``: ``{name} must be {takes}, not
    {value!r}`` (``takes``: by default ``a whole number of at least 1`` / ``of 0 or
    more`` / ``from 0 to {most}``)."""
    number = whole(value)
    if number is None or number < least or (most is not None and number > most):
        if takes is None:
            takes = (f"a whole number from {least} to {most}" if most is not None
                     else f"a whole number of {'0 or more' if least == 0 else f'at least {least}'}")
        raise UsageError(f"{name} must be {takes}, not {number_text(value)}")
    return number


def check_real(name: str, value: object, takes: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a plain float if it is a real number that ``ok`` accepts (NaN never
    is), else a ``UsageError``: ``{name} must be {takes}, not {value!r}``."""
    number = real(value)
    if number is None or math.isnan(number) or not ok(number):
        raise UsageError(f"{name} must be {takes}, not {number_text(value)}")
    return number


#: What a run's ``timeout`` takes, as its refusal says it.
TIMEOUT_TAKES = "a number of seconds greater than 0 (None: no limit)"


def run_timeout(value: object, name: str = "timeout") -> float | None:
    """A run's ``timeout`` (``pmap``, ``imap``, ``parallel``...): None (no limit), or a
    plain float of seconds greater than 0.

    One too large to wait on (``10**400``, ``inf``, ``1e400``) is ``inf``: no item
    can run past it, so it is no limit, as the float of the same value always was
    (and ``--timeout 1e400`` in the magics). Unchecked, ``10**400`` reached the
    pool's manager thread as an int, whose deadline (``monotonic() + timeout``)
    raised OverflowError there and failed every run in flight with it.
    """
    if value is None:
        return None
    return check_real(name, value, TIMEOUT_TAKES, lambda seconds: seconds > 0)


def wait_timeout(value: object, name: str = "timeout") -> float | None:
    """How long a caller waits (``as_completed(timeout=)``, ``run.result(timeout=)``):
    None for no limit, or seconds as ``concurrent.futures`` takes them (0 or less: do
    not wait). One too large to wait on (``inf``, ``10**400``, past ``threading.TIMEOUT_MAX``,
    some 292 years) is None: ``threading`` raises OverflowError for it, and waiting that
    long is waiting with no limit."""
    if value is None:
        return None
    seconds = check_real(name, value, "a number of seconds to wait (None: no limit)", lambda seconds: True)
    return None if seconds > threading.TIMEOUT_MAX else seconds


#: The largest ``maxsize``, ``producers`` or ``capacity`` an ``mpmagic.Queue`` takes:
#: the local queue keeps them in 64-bit words of its shared header (``10**400``
#: failed there with ``memoryview: invalid value for format 'Q'``), and Dask sends
#: them to its scheduler as 64-bit integers. ``sys.maxsize`` is also the most
#: items any Python container holds, so no queue can need a bound past it.
#: (``multiprocessing.Queue`` refuses less: past ``2**31 - 1``, its semaphore's
#: limit, it raises OverflowError.)
QUEUE_SIZE_MAX = sys.maxsize


def queue_size(name: str, value: object, least: int, most: int = QUEUE_SIZE_MAX, most_says: str = "sys.maxsize") -> int:
    """An ``mpmagic.Queue`` size option (``maxsize``, ``producers``, ``capacity``):
    a plain int from ``least`` to ``most`` (:data:`QUEUE_SIZE_MAX`, written
    ``most_says`` in the refusal), else one ``UsageError`` line naming it, on the
    local backend and on Dask alike."""
    return check_whole(f"mpmagic.Queue: {name}", value, least, f"a whole number from {least} to {most_says}", most)


def queue_maxsize(value: object) -> int:
    """An ``mpmagic.Queue``'s ``maxsize``: a whole number up to :data:`QUEUE_SIZE_MAX`, and
    0 or less for no bound (0), as ``multiprocessing.Queue`` and ``queue.Queue`` take it
    (``Queue(-1)`` was refused). Anything but a whole number is an ``ArgumentTypeError``
    (a ``TypeError``, as theirs, and a ``UsageError``), on the local backend and on Dask alike."""
    number = whole(value)
    if number is None:
        raise ArgumentTypeError(
            f"mpmagic.Queue: maxsize must be a whole number (0 or less: no bound), not {number_text(value)}")
    return 0 if number <= 0 else queue_size("maxsize", number, 0)


def check_delay(name: str, value: object) -> float:
    """A delay such as ``progress_delay``: a plain float of seconds, 0 or more and
    finite (as ``%config MPMagic.progress_delay`` takes it)."""
    if type(value) is float and 0 <= value < math.inf:  # (the usual, every pmap's default: no closure, no calls)
        return value
    return check_real(name, value, "a number of seconds (0 or more)", lambda seconds: 0 <= seconds < math.inf)


def check_flags(**flags: object) -> None:
    """A ``UsageError`` for the first of the API's on/off options (``star``, ``compare``,
    ``block``...) that is not True or False: ``star must be True or False, not 'False'``.

    Why: each was read by its truth, so ``compare="no"`` or ``star="False"`` (a
    string, as a config file or a form gives it) switched the option on without a
    word, and ``star="yes"`` over ints failed in the workers with ``'int' object is
    not iterable``. What ``if`` reads as True or False without a doubt is taken: a
    bool, a numpy bool (``arr.any()``), 0 and 1, and None (off, as the default).
    """
    for name, value in flags.items():
        if value is None or value is True or value is False:  # (the usual values: no call)
            continue
        if isinstance(value, bool) or whole(value) in (0, 1) or _numpy_bool(value):
            continue
        raise UsageError(f"{name} must be True or False, not {number_text(value)}")


def _numpy_bool(value: object) -> bool:
    """Is ``value`` a numpy bool (``np.True_``), without importing numpy."""
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")


#: Keyword arguments written for the API's (another library's name, or a magic's option
#: as the line spells it), with the API's own name: ``pmap(f, xs, n=4)`` is ``workers=4``.
KEYWORD_ALIASES: dict[str, str] = {
    "n": "workers", "n_jobs": "workers", "processes": "workers", "max_workers": "workers",
    "num_workers": "workers", "nworkers": "workers", "n_workers": "workers", "nprocs": "workers",
    "jobs": "workers", "chunk_size": "chunksize", "chunk": "chunksize", "chunks": "chunksize", "quiet": "show_report", "q": "show_report",
    "label": "label_output", "no_label": "label_output", "retry": "retries", "max_retries": "retries",
}

#: What to write instead of a keyword of ``map()``'s that the API has no parameter for.
KEYWORD_INSTEAD: dict[str, str] = {
    "strict": "zip the iterables as map(..., strict=True) does, with star=True: "
              "{caller}(f, zip(xs, ys, strict=True), star=True)",
}


def unexpected_keyword(caller: str, refused: dict[str, object], known: tuple[str, ...]) -> TypeError:
    """Python's TypeError for ``caller()``'s first keyword in ``refused`` that it has no
    parameter for, with the one it may have meant (``pmap(f, xs, n=4)``: ``workers=``,
    as ``%pmap -n 4``; ``chunk_size=``: ``chunksize=``); Python 3.11's said only
    ``got an unexpected keyword argument 'n'``."""
    import difflib

    name = next(iter(refused))
    said = f"{caller}() got an unexpected keyword argument {name!r}"
    if name in KEYWORD_INSTEAD and "star" in known:
        return TypeError(f"{said}: {KEYWORD_INSTEAD[name].format(caller=caller)}")
    meant = KEYWORD_ALIASES.get(name)
    if meant not in known:
        meant = None
    if meant is None:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)  # (0.6 took strict for star)
        meant = close[0] if close else None
    if meant == "show_report":
        return TypeError(f"{said}; did you mean show_report=? (a call shows no report unless show_report=True)")
    if meant is not None:
        return TypeError(f"{said}; did you mean {meant}=?")
    return TypeError(f"{said} (it takes {', '.join(k + '=' for k in known)})")


def keyword_names(func: Callable[..., object], skip: int = 1) -> tuple[str, ...]:
    """The parameters of ``func`` a call names, in order: all but its first ``skip``
    (the function or code given first) and its ``*`` / ``**`` ones."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in list(inspect.signature(func).parameters.values())[skip:] if p.kind in kinds)
