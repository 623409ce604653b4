"""What ``get_ipython()`` gives a notebook function running in a worker.

IPython turns a magic line inside a ``def`` into a call on the shell:
``r = %pmap f, [x]`` becomes ``r = get_ipython().run_line_magic('pmap', 'f, [x]')``,
``!ls`` becomes ``get_ipython().system('ls')`` and ``x = !ls``
``get_ipython().getoutput('ls')``. Such a function ran serially in the
notebook, but in a task (``%pmap h, xs``, a ``%%parallel`` rank calling it)
failed with ``'NoneType' object has no attribute 'run_line_magic'``: a worker
runs without IPython, and its ``get_ipython()`` returns None.

So in a worker, a call ``get_ipython().<attribute>`` (the form IPython
writes) gives a :class:`TaskShell`; any other use of ``get_ipython()``
(``if get_ipython() is not None``, ``ip = get_ipython()``) still gives None,
as outside IPython, so a script's guards keep working (:func:`shell_for_caller`).
``TaskShell.run_line_magic('pmap', line)`` runs the nested map as
``mpmagic.pmap`` does inside a task: serially in that worker, with the same
results and errors as ``map()`` (the note says so once per worker). The
line's argument list is evaluated in the calling function's frame, its own
names first, as ``%pmap`` does in the notebook. Every other magic,
``!cmd`` and any other attribute is one clear error saying what to write
instead. A sent function's magic lines name notebook globals only in a
string; :func:`magic_line_names` finds them, so that the payload sends
them (``payload``) and the payload cache watches them (``payload_cache``).

Imports no IPython (workers import it); the API is imported only when a
task runs a ``%pmap`` line, as the task's own ``mpmagic.pmap`` would import it.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import dis
import hashlib
import importlib
import linecache
import re
import shlex
import sys
import threading
import tokenize
import types
import weakref
from typing import Any

from .errors import ArgumentTypeError, UsageError

#: The ``%pmap`` line's options as the magic has them (``magics._pmap_parser``; a
#: test keeps the two the same): whether each takes a value.
PMAP_OPTIONS: dict[str, bool] = {
    "-h": False, "--help": False, "-n": True, "--workers": True, "--chunksize": True, "--star": False,
    "--compare": False, "-q": False, "--quiet": False, "--errors": True, "--timeout": True, "--retries": True,
    "--seed": True, "--rerun-failed": False, "--bg": False, "--progress": False, "--no-progress": False,
    "--checkpoint": False, "--no-checkpoint": False, "--insights": False, "--scaling": False,
}

#: Options a ``%pmap`` line run in a task refuses, and why (what it runs is a serial map).
_REFUSED = {
    "bg": "--bg: a background run needs the notebook's pool; without it the line runs (serially) here",
    "scaling": "--scaling: it times the map on 1..N workers, and a worker cannot start workers",
    "rerun_failed": "--rerun-failed: the failed items it re-runs are the notebook's last %pmap's",
    "checkpoint": "--checkpoint: the checkpoint store is the notebook's; put --checkpoint on the outer %pmap",
    "help": "--help: see %pmap? in the notebook",
}

#: The API's names of options a serial map does not apply, as the ``%pmap`` line writes them
#: (for ``api._serial_in_worker``'s note).
MAGIC_OPTION_NAMES = {"workers": "-n", "chunksize": "--chunksize", "timeout": "--timeout", "retries": "--retries",
                      "compare": "--compare", "insights": "--insights", "progress": "--progress"}

_NO_SHELL = "a task runs in a worker process, without IPython"


class TaskShellError(AttributeError):
    """What ``get_ipython().<anything>`` in a task raises when it cannot be done
    there: a magic other than ``%pmap``, ``!cmd``, a shell attribute. An
    AttributeError, as ``None.<anything>`` raised before, so code that catches
    that to tell IPython from a script still does."""


def _first_word(text: str) -> tuple[str, str]:
    """``text``'s first word and the rest, split at any run of whitespace, or at a ``#``
    outside quotes: the line after the options is Python, where ``#`` starts a comment
    (``--timeout 5# why`` is ``--timeout 5``, as %%parallel's and %pool's lines read it;
    it was refused as "'5#' is not a number of seconds"). The comment stays in the rest."""
    parts = text.split(None, 1)
    word, rest = parts[0], parts[1] if len(parts) > 1 else ""
    quote = ""
    for at, char in enumerate(word):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and at > 0:  # (a word that is all comment is the caller's: not an option)
            return word[:at], text.lstrip()[at:]
    return word, rest


def _unquoted(word: str) -> str:
    """An option's word with its shell quotes taken off, as ``%%parallel`` and ``%pool``
    read theirs (``shlex``): ``-n '2'`` and ``--timeout="1.5"`` are ``-n 2`` and
    ``--timeout=1.5`` (they were refused: ``"'2'" is not a whole number``). A word
    without quotes, or not quoted as a shell word, stays as written."""
    if "'" not in word and '"' not in word:
        return word
    try:
        words = shlex.split(word)
    except ValueError:  # an unclosed quote: the parser names the word as written
        return word
    return words[0] if len(words) == 1 else word


def _takes_next_word(head: str, actions: Any) -> bool:
    """Is the word after option ``head`` its value (``-n 2``; ``-qn 2``, the last of combined flags)?"""
    action = actions.get(head.split("=", 1)[0])
    if action is not None:
        return action.nargs != 0 and "=" not in head
    if head.startswith("--") or len(head) < 3:
        return False  # unknown: the parser names it
    for k, letter in enumerate(head[1:], 2):  # -qn: -q then -n, as argparse reads it
        action = actions.get("-" + letter)
        if action is None or action.nargs != 0:
            return action is not None and k == len(head)  # a value attached (-qn2) or the next word
    return False


def split_options(line: str, parser: argparse.ArgumentParser) -> tuple[list[str], str, bool]:
    """Split ``-x VALUE --flag REST`` into option tokens, the rest of the line, and
    whether a ``--`` ended the options (the rest is then the arguments, however it reads).

    The rest (map()'s argument list) is Python and is never tokenized as
    shell words, so its quotes and spaces survive untouched; an option's word
    loses its shell quotes, as ``%%parallel``'s (``-n '2'``: see :func:`_unquoted`). Words are split
    at any whitespace (a tab too), and short flags may be combined as
    argparse takes them (``-qn 2``, ``-qn2``).
    """
    tokens: list[str] = []
    rest = line.strip()
    actions = parser._option_string_actions  # noqa: SLF001 - argparse has no public table
    while rest.startswith("-") and not rest.startswith("--, "):
        head, tail = _first_word(rest)
        if head == "--":  # the end of the options, as on a command line: the rest is ARGS
            return tokens, tail, True
        head = _unquoted(head)
        tokens.append(head)
        rest = tail
        if _takes_next_word(head, actions):
            if not rest:
                break
            value, rest = _first_word(rest)
            tokens.append(_unquoted(value))
    return tokens, rest, False


def without_final_semicolon(text: str) -> tuple[str, bool]:
    """``text`` without a final ``;`` (IPython's "show no output"), and whether it had one.

    Found as IPython finds it, as the last token that is not a comment or a
    line end: ``f, xs;  # note`` has one, ``f, [";"]`` has not.
    """
    try:
        tokens = list(tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__))
    except (tokenize.TokenError, SyntaxError):
        return text, False  # (not Python: the parser says so)
    for token in reversed(tokens):
        if token.type in (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT):
            continue
        if token.type == tokenize.OP and token.string == ";":
            lines = text.splitlines(keepends=True)
            row, col = token.start
            return "".join(lines[: row - 1]) + lines[row - 1][:col] + lines[row - 1][col + 1 :], True
        break
    return text, False


#: Where a parse keeps the options given so far on its namespace (GivenOnce); gone before the options are read.
_GIVEN = "_mpmagic_given_options"


def without_given(opts: argparse.Namespace) -> argparse.Namespace:
    """``opts`` without :class:`GivenOnce`'s record of the options given (the magics read ``vars(opts)``)."""
    vars(opts).pop(_GIVEN, None)
    return opts


class GivenOnce(argparse.Action):
    """argparse's ``store`` for the magics' options, each given at most once a line.

    ``store`` kept the last value and dropped the first without a word
    (``%pmap --timeout 5 --timeout 0.01`` stopped items at 0.01 s, and
    ``%%parallel --reduce max --reduce min`` returned the min): an option that
    takes a value, given twice, is now refused in one line naming the option
    and both values as written. (A flag given twice, ``-q -q``, says the same
    thing twice and stays accepted; a positional word is stored as before.)
    The notebook's magics and a ``%pmap`` line run in a task (whose ``-n 2 -n 3``
    the task took as ``-n 3``) refuse it alike: both parsers are :class:`OnceParser`.
    """

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.option_strings:
            written = parser.written(values) if isinstance(parser, OnceParser) else repr(values)
            given = vars(namespace).setdefault(_GIVEN, {})
            if self.dest in given:
                raise argparse.ArgumentError(
                    None, f"{'/'.join(self.option_strings)} given twice ({given[self.dest]}, then {written}): "
                          "give it once")
            given[self.dest] = written
        setattr(namespace, self.dest, values)


class OnceParser(argparse.ArgumentParser):
    """An argparse parser whose options that take a value are given once a line
    (:class:`GivenOnce`), refused in the words they were written as: the base of the
    notebook's magics' parser (``magics._Parser``) and of a task's ``%pmap`` line's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The words the option being stored was given as, read by the action just after
        # argparse converted them (_get_values).
        self._written = threading.local()
        self.register("action", None, GivenOnce)
        self.register("action", "store", GivenOnce)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        values = super()._get_values(action, arg_strings)
        self._written.words = list(arg_strings)  # (for the action argparse calls next: GivenOnce)
        return values

    def written(self, values: Any) -> str:
        """The words the option argparse is storing now was given as (``-1GB``, not
        ``values``, what they were read as: ``-n -1`` is None), for a message."""
        words = self._written.__dict__.pop("words", None)
        return repr(values) if words is None else " ".join(shlex.quote(word) for word in words)


class _TaskParser(OnceParser):
    """The ``%pmap`` line's options in a task: each mistake one UsageError line, in the
    magic's words (argparse's own said ``invalid int value: 'abc'`` and ``unrecognized
    arguments: --tiemout``, where the notebook's ``%pmap`` names the option meant), an
    option given twice too (``-n 2 -n 3`` ran as ``-n 3``, refused in the notebook)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:  # type: ignore[override]
        opts, extra = super().parse_known_args(args, namespace)
        return without_given(opts), extra

    def error(self, message: str) -> Any:
        unknown = re.fullmatch(r"unrecognized arguments: (\S+).*", message)
        if unknown is not None:
            message = self.unknown(unknown.group(1))
        raise UsageError(f"%pmap inside a task: {message}")

    def unknown(self, token: str) -> str:
        """``unknown option --tiemout; did you mean --timeout?``, as the magic says it."""
        if not token.startswith("-"):
            return f"unexpected argument {token!r}"
        name = token.split("=", 1)[0]
        actions = self._option_string_actions
        cased = [option for option in actions if option.lower() == name.lower()]  # (-N: the Shift key)
        bare = {option.lstrip("-"): option for option in actions}
        found = cased or [bare[b] for b in difflib.get_close_matches(name.lstrip("-"), list(bare), n=1, cutoff=0.6)]
        if not found:
            return f"unknown option {name}"
        return f"unknown option {name}; did you mean {'/'.join(actions[found[0]].option_strings)}?"


def _whole_word(text: str) -> int:
    """An option's whole number, refused as the magic refuses it (its range is the API's check)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _seconds_word(text: str) -> float:
    """An option's seconds, refused as the magic refuses them (its range is the API's check)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


_parser: _TaskParser | None = None


def _pmap_parser() -> _TaskParser:
    """The options of :data:`PMAP_OPTIONS`, read as the magic reads them (values are
    checked by the API, as ``mpmagic.pmap``'s keywords are)."""
    global _parser
    if _parser is None:
        p = _TaskParser(prog="%pmap", add_help=False, allow_abbrev=False)
        p.add_argument("-h", "--help", action="store_true")
        p.add_argument("-n", "--workers", type=_whole_word)
        p.add_argument("--chunksize", type=_whole_word)
        p.add_argument("--star", action="store_true")
        p.add_argument("--compare", action="store_true")
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--errors", choices=("raise", "collect"), default="raise")
        p.add_argument("--timeout", type=_seconds_word)
        p.add_argument("--retries", type=_whole_word, default=0)
        p.add_argument("--seed", type=_whole_word)
        p.add_argument("--rerun-failed", action="store_true")
        p.add_argument("--bg", action="store_true")
        p.add_argument("--progress", dest="progress", action="store_true", default=None)
        p.add_argument("--no-progress", dest="progress", action="store_false")
        p.add_argument("--checkpoint", action="store_true", default=None)
        p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
        p.add_argument("--insights", action="store_true")
        p.add_argument("--scaling", action="store_true")
        _parser = p
    return _parser


def _split_line(line: str) -> tuple[list[str], str]:
    """A ``%pmap`` line's option words, and its argument list without a final ``;``."""
    tokens, rest, _ = split_options(line, _pmap_parser())
    return tokens, without_final_semicolon(rest)[0]


# --------------------------------------------------------------------------
# The notebook side: the globals a function's magic lines read


def _line_names(line: str) -> tuple[set[str], set[str]]:
    """The names the argument list of ``%pmap`` line ``line`` reads, and the
    attribute names it uses (``np.linalg.norm``: a submodule to import); none
    for a line that is not one."""
    try:
        source, _, collector = _args_source(_split_line(line)[1])
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, UsageError):
        return set(), set()
    nodes = list(ast.walk(tree))
    return ({node.id for node in nodes if isinstance(node, ast.Name)} - {collector},
            {node.attr for node in nodes if isinstance(node, ast.Attribute)})


_ATTRIBUTE_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


def _pmap_lines(code: types.CodeType) -> list[str]:
    """The lines of the ``%pmap`` magics in ``code`` itself (``get_ipython().run_line_magic('pmap', LINE)``)."""
    if "run_line_magic" not in code.co_names:
        return []
    found = []
    instructions = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "EXTENDED_ARG")]
    for at, ins in enumerate(instructions[:-2]):
        name, line = instructions[at + 1], instructions[at + 2]
        if (ins.opname in _ATTRIBUTE_LOADS and ins.argval == "run_line_magic" and name.opname == "LOAD_CONST"
                and name.argval == "pmap" and line.opname == "LOAD_CONST" and isinstance(line.argval, str)):
            found.append(line.argval)
    return found


_names_of: weakref.WeakKeyDictionary[types.CodeType, tuple[frozenset[str], frozenset[str]]] = \
    weakref.WeakKeyDictionary()


def magic_line_names(code: types.CodeType) -> tuple[frozenset[str], frozenset[str]]:
    """The global names the ``%pmap`` lines in ``code`` (and code nested in it) read,
    and the attribute names they use.

    The function's bytecode names none of them (the line is a string), so
    cloudpickle did not send them: ``f`` of ``r = %pmap f, [x]`` was missing in
    the worker. The function's own local names are left out (the line sees them
    first); a name that is no global of the function's is simply not sent.
    """
    found = _names_of.get(code)
    if found is None:
        names: set[str] = set()
        attributes: set[str] = set()
        for line in _pmap_lines(code):
            line_names, line_attributes = _line_names(line)
            names |= line_names
            attributes |= line_attributes
        names -= {*code.co_varnames, *code.co_cellvars, *code.co_freevars}
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                inner, inner_attributes = magic_line_names(const)
                names |= inner
                attributes |= inner_attributes
        _names_of[code] = found = frozenset(names), frozenset(attributes)
    return found


# --------------------------------------------------------------------------
# The worker side: get_ipython() and the shell it stands in for


_CALLS = frozenset({"CALL", "CALL_FUNCTION", "CALL_METHOD"})
_BETWEEN = frozenset({"PRECALL", "PUSH_NULL", "CACHE", "EXTENDED_ARG", "NOP"})
_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_FAST", "LOAD_CLASSDEREF"})
_shell_calls: weakref.WeakKeyDictionary[types.CodeType, frozenset[int]] = weakref.WeakKeyDictionary()


def _calls_then_attribute(code: types.CodeType) -> frozenset[int]:
    """The offsets in ``code`` of the calls of the form ``get_ipython().<attribute>``."""
    found = _shell_calls.get(code)
    if found is None:
        offsets: set[int] = set()
        if "get_ipython" in code.co_names or "get_ipython" in code.co_varnames or \
                "get_ipython" in code.co_freevars:
            instructions = [i for i in dis.get_instructions(code) if i.opname not in ("CACHE", "EXTENDED_ARG")]
            for at, ins in enumerate(instructions):
                if ins.opname not in _CALLS or ins.arg or at + 1 >= len(instructions):
                    continue
                if instructions[at + 1].opname not in _ATTRIBUTE_LOADS:
                    continue
                back = at - 1
                while back >= 0 and instructions[back].opname in _BETWEEN:
                    back -= 1
                if back >= 0 and instructions[back].opname in _LOADS and instructions[back].argval == "get_ipython":
                    # (the frame's f_lasti may be the call's own offset, or that of its last
                    # inline cache entry, as in 3.11: every offset up to the attribute's)
                    offsets.update(range(ins.offset, instructions[at + 1].offset, 2))
        _shell_calls[code] = found = frozenset(offsets)
    return found


def shell_for_caller(frame: types.FrameType | None) -> TaskShell | None:
    """What ``get_ipython()`` called from ``frame`` gives in a task: a
    :class:`TaskShell` where the caller uses it at once (``get_ipython().run_line_magic(...)``,
    IPython's form of a magic line, ``!cmd``...), else None, as outside IPython
    (``if get_ipython() is not None`` is False in a worker, as in a script)."""
    if frame is None:
        return None
    try:
        return _SHELL if frame.f_lasti in _calls_then_attribute(frame.f_code) else None
    except Exception:  # (anything odd: as before, None)
        return None


class TaskShell:
    """The stand-in for IPython's shell that ``get_ipython().…`` gets in a task.

    ``run_line_magic('pmap', line)`` runs the nested map serially, as
    ``mpmagic.pmap`` does in a task; the rest says in one line what to write
    instead (:class:`TaskShellError`).
    """

    def __repr__(self) -> str:
        return "<mpmagic.task_shell.TaskShell: get_ipython() in a task (a worker runs without IPython)>"

    def run_line_magic(self, magic_name: str, line: str, _stack_depth: int = 1) -> Any:
        """``%magic_name line`` in a function running in a task: ``%pmap`` runs
        serially (:func:`run_pmap_line`), with its argument list evaluated in the
        calling frame, as the magic does; any other magic is refused."""
        __tracebackhide__ = True
        if magic_name == "pmap":
            return run_pmap_line(line, sys._getframe(_stack_depth))
        raise TaskShellError(_magic_refusal("%" + str(magic_name), line))

    def run_cell_magic(self, magic_name: str, line: str, cell: str) -> Any:
        """``%%magic_name`` in a task: refused, one line saying what to write instead."""
        __tracebackhide__ = True
        raise TaskShellError(_magic_refusal("%%" + str(magic_name), line))

    def system(self, cmd: str) -> None:
        """``!cmd`` in a task: refused. IPython's ``system`` expands ``$name`` and
        ``{expr}`` in the caller's frame, relays the output and sets ``_exit_code``
        in the notebook's namespace: nothing a worker has to do it faithfully."""
        __tracebackhide__ = True
        raise TaskShellError(f"!{cmd} cannot run inside a task: {_NO_SHELL} to run shell commands; "
                             "call subprocess.run([...], check=True) in the function instead")

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
        """``x = !cmd`` in a task: refused (IPython's ``SList`` has no worker-side equal)."""
        __tracebackhide__ = True
        raise TaskShellError(f"x = !{cmd} cannot run inside a task: {_NO_SHELL} to run shell commands; "
                             "call subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout"
                             ".splitlines() in the function instead")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise TaskShellError(f"get_ipython().{name} is not available inside a task: {_NO_SHELL} (get_ipython() "
                             "there is None; only its %pmap lines run, serially, as mpmagic.pmap does)")


_SHELL = TaskShell()

#: What each magic that cannot run in a task should be written as there.
_INSTEAD = {
    "%%parallel": "call the code directly (a task is one process; mpmagic.parallel cannot run there either: "
                  "its ranks must run at the same time)",
    "%time": "time it with time.perf_counter()", "%%time": "time it with time.perf_counter()",
    "%timeit": "time it with timeit.timeit(...)", "%%timeit": "time it with timeit.timeit(...)",
    "%pool": "the pool is the notebook's: run %pool there",
}


def _magic_refusal(magic: str, line: str) -> str:
    written = f"{magic} {line}".strip()
    instead = _INSTEAD.get(magic, "call the Python it stands for (a nested map: mpmagic.pmap(f, xs), or a "
                                  "%pmap line; a shell command: subprocess.run([...]))")
    return (f"{written} cannot run inside a task: {_NO_SHELL} to run magics (only a %pmap line runs there, "
            f"serially, as mpmagic.pmap does); {instead}")


def _args_source(text: str) -> tuple[str, str, str]:
    """The code of argument list ``text`` passed to a collector, its file name and the
    collector's name, as ``magics._args_code`` makes them (the same file name, from the
    same digest as ``cell.source_digest``), put in ``linecache``: a traceback through
    the line shows it, in the worker and in the notebook, which registers it when the
    function is sent (:func:`magic_line_names`)."""
    collector = "__mpmagic_args__"
    while collector in text:
        collector += "_"
    source = f"{collector}({text}\n)"
    filename = f"<pmap-args-{hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=6).hexdigest()}>"
    if filename not in linecache.cache:
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    return source, filename, collector


def _eval_arguments(text: str, frame: types.FrameType) -> tuple[tuple, bool]:
    """map()'s arguments from ``text``, evaluated in ``frame`` as ``%pmap`` does in
    the notebook: one namespace of the frame's globals and locals, its locals
    winning (a lambda written in the line sees them as globals); and whether
    map()'s ``strict=True`` (Python 3.14) zipped several iterables into one of
    argument tuples."""
    __tracebackhide__ = True
    if not text.strip():
        raise ArgumentTypeError("%pmap inside a task: missing FUNC and ITERABLE")
    source, filename, collector = _args_source(text)
    try:
        tree = ast.parse(source, mode="eval")
        if not (isinstance(tree.body, ast.Call) and isinstance(tree.body.func, ast.Name)
                and tree.body.func.id == collector):
            raise SyntaxError("not one call")
        code = compile(source, filename, "eval", dont_inherit=True)
    except SyntaxError:
        raise UsageError(f"%pmap inside a task: {text!r} is not an argument list like map()'s") from None
    namespace = {**frame.f_globals, **frame.f_locals} if frame.f_locals is not frame.f_globals else frame.f_globals
    found: list[tuple[tuple, dict[str, Any]]] = []
    namespace[collector] = lambda *args, **keywords: found.append((args, keywords))
    try:
        eval(code, namespace)
    finally:
        namespace.pop(collector, None)
    args, keywords = found[0]
    if keywords:
        if not (sys.version_info >= (3, 14) and set(keywords) == {"strict"}):
            raise ArgumentTypeError(f"%pmap inside a task: map() takes no keyword arguments: {text!r}")
        if keywords["strict"] and len(args) > 2:  # (map()'s strict=, as the magic applies it)
            return (args[0], zip(*args[1:], strict=True)), True
    return args, False


def run_pmap_line(line: str, frame: types.FrameType) -> list:
    """Run ``%pmap line`` in a task, called from ``frame``: serially, as
    ``mpmagic.pmap`` runs inside a worker, with the line's options that a
    serial map applies (``--star``, ``--errors``, ``--seed``; ``-n``,
    ``--timeout``... are named as not applied, as the API names them), and
    one line refusing those it cannot (``--bg``, ``--scaling``...)."""
    __tracebackhide__ = True
    tokens, text = _split_line(line)
    opts = _pmap_parser().parse_args(tokens)
    refused = [why for dest, why in _REFUSED.items() if getattr(opts, dest)]
    if refused:
        raise UsageError(f"%pmap inside a task runs serially in the worker, and cannot take {'; '.join(refused)}")
    args, zipped = _eval_arguments(text, frame)
    star = opts.star or zipped
    if len(args) < 2:
        raise ArgumentTypeError("%pmap inside a task: " + ("missing ITERABLE after FUNC" if args
                                                           else "missing FUNC and ITERABLE"))
    if opts.star and (zipped or len(args) > 2):
        raise UsageError("%pmap inside a task: --star takes one iterable of argument tuples, not several iterables")
    api: Any = importlib.import_module("mpmagic.api")  # (the task's own import, as its mpmagic.pmap's)
    caller = api._serial_caller.set("%pmap")
    try:
        return api.pmap(args[0], *args[1:], workers=None if opts.workers == -1 else opts.workers,
                        chunksize=opts.chunksize, star=star, compare=opts.compare, errors=opts.errors, timeout=opts.timeout, retries=opts.retries,
                        progress=bool(opts.progress), insights=opts.insights, seed=opts.seed)
    finally:
        api._serial_caller.reset(caller)
