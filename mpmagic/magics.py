"""The IPython skin: ``%pmap``, ``%%parallel`` and ``%pool``.

Each magic parses its line, evaluates what it must in the user's namespace,
calls the plain API (``api.py``, ``pool.py``) and displays the result and the
timing report. Nothing else happens here.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import functools
import itertools
import linecache
import re
import shlex
import sys
import threading
import tokenize
import types
import unicodedata
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import (
    Magics,
    cell_magic,
    line_cell_magic,
    line_magic,
    magics_class,
    needs_local_scope,
    no_var_expand,
)
from IPython.display import display

from . import api, astlock, config, debugging, pool, scaling
from .backends.local import START_METHODS, start_method_refused, tasks_per_child_refused
from .cell import source_digest
from .checks import size_said_as
from .errors import (
    STOPPED_OUTCOME,
    MPMagicError,
    UsageError,
    add_note,
    came_from_worker,
    cell_origin,
    interrupt_outcome,
    interrupt_read_past,
    one_line_interrupt,
)
from .fmt import noun
from .jobs import SAY_RETRIES_AT
from .setup_api import RunsInFlight, SetupRefused
from .task_shell import (
    OnceParser,
    _takes_next_word,
    split_options,
    without_final_semicolon,
    without_given,
)

_INTERRUPTED = "{magic} interrupted: {outcome}"
# An interrupt that escapes a magic outside its run (_one_line_interrupts): what it says.
_BG_STARTED = ("{magic} --bg interrupted after its run had started in the background, where it goes on: its "
               "handle is kept in this interrupt's .run (sys.last_value.run in the next cell); %pool runs lists it")
_POOL_BEFORE = "{magic} interrupted before it did anything: nothing changed"
_POOL_DURING_ANY = "{magic} {action}{clear} interrupted before it finished; %pool shows the pool's state"
_POOL_DURING = {  # (start, restart, resize, local, dask: their own line, "... while it waited for the workers")
    "status": "{magic} interrupted while it read the pool's state: nothing changed",
    "runs": "{magic} runs interrupted while it listed the runs: nothing changed",
    "checkpoints": "{magic} checkpoints{clear} interrupted before it finished; %pool checkpoints shows what is stored",
}
# The local pool's outcome (Dask's says what it did instead: errors.interrupt_outcome).
_STOPPED = STOPPED_OUTCOME
# --compare's serial run is in the notebook, after the parallel run: an
# interrupt there stops no worker, and the parallel run's values are lost
# with the exception (api.py does not keep them).
_SERIAL_INTERRUPTED = (
    "{magic} --compare interrupted in its serial run here in the notebook, after the parallel run had "
    "finished (mpmagic.last_report() is its report): no worker was stopped, and the parallel run's {values} "
    "were dropped with the interrupt; run it without --compare to keep them"
)


class MagicUsageError(IPythonUsageError, ValueError):
    """A magic's refusal of what the API refuses with :class:`mpmagic.UsageError`:
    IPython's ``UsageError`` (one line, no traceback) that is also a ``ValueError``,
    as the API's is, so ``except ValueError`` around the magic catches it as around
    the call. (A plain IPython ``UsageError`` was caught by neither.)"""

    def _render_traceback_(self) -> list[str]:
        # IPython shows only UsageError itself (not a subclass) in one line; a class
        # that renders its own traceback is shown as that, in the same words.
        return [f"UsageError: {self}"]


class MagicArgumentTypeError(MagicUsageError, TypeError):
    """A wrong FUNC or ITERABLE in a magic's line (``%pmap f, None``), where ``map()``
    raises ``TypeError`` and the API :class:`mpmagic.ArgumentTypeError`: one line as
    IPython's ``UsageError``, and a ``TypeError``, so ``try: r = %pmap f, xs`` /
    ``except TypeError:`` in a cell catches it, as around ``list(map(f, xs))``."""


# Both are named as IPython's: a kernel's error reply names the exception's class
# (``ename``), which papermill and nbclient print before its text, and which a
# plain UsageError's reply gives as "UsageError".
for _cls in (MagicUsageError, MagicArgumentTypeError):
    _cls.__name__ = _cls.__qualname__ = "UsageError"
del _cls


def _usage_class(like: BaseException | type[BaseException] | None) -> type[IPythonUsageError]:
    """The usage error class for a refusal like ``like`` (the API's error, or the
    built-in class serial ``map()`` would raise): a ``TypeError`` or ``ValueError``
    stays one (:class:`MagicArgumentTypeError`, :class:`MagicUsageError`)."""
    if like is None:
        return IPythonUsageError
    kind = like if isinstance(like, type) else type(like)
    if issubclass(kind, TypeError):
        return MagicArgumentTypeError
    if issubclass(kind, ValueError):
        return MagicUsageError
    return IPythonUsageError


class _Parser(OnceParser):
    """argparse for a magic's line: no abbreviations, and errors as a short usage error.

    Every error is two lines: what is wrong (an unknown option names the
    closest real one), then the usage ending with the pointer to the help
    (``see %pmap?``). argparse would otherwise print and exit, and by default
    takes ``--worker`` for ``--workers`` (then misreports the value).
    """

    def __init__(self, prog: str | None = None, intermixed: bool = False, api: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(prog, allow_abbrev=False, add_help=False, **kwargs)
        self._no_options: tuple[int, dict[str, Any]] | None = None  # (options then, what no option gives: parse_args)
        # api: for a magic whose line IPython does not expand (@no_var_expand), the call that takes
        # a variable; a value written as ``$n`` or ``{n}`` gets a hint naming it (_unexpanded_hint).
        self.api = api
        # intermixed: options and words in any order (``%pool dask --timeout 1 ADDRESS``); plain
        # argparse fills every positional at the first word, then calls the later one unexpected.
        self.intermixed = intermixed
        # elsewhere: an option the magic has not but its sibling has (``%%parallel --retries``),
        # and what to write instead, said in place of a guess at a close name (unknown()).
        self.elsewhere: dict[str, str] = {}
        # extra_words: for words past those the line takes (``%pool checkpoints clear a b``), the
        # refusal naming the first and what its subcommand takes, from what was parsed (None: unknown()'s).
        self.extra_words: Callable[[argparse.Namespace, list[str]], str | None] | None = None
        # (An option that takes a value is given once a line: OnceParser.)
        # argparse's own -h would print and exit: the magic prints its help itself (_show_help).
        self.add_argument("-h", "--help", action="store_true", help="show this help (as %(prog)s? does); run nothing")

    def usage_error(self, message: str, like: BaseException | type[BaseException] | None = None) -> IPythonUsageError:
        """The magic's usage error: ``message``, then the usage line and the pointer to its help.
        ``like``: the error (or built-in class) it stands for, whose ``TypeError`` or
        ``ValueError`` it stays (:func:`_usage_class`), so ``except TypeError`` catches it."""
        usage = self.format_usage().strip().removeprefix("usage: ")
        return _usage_class(like)(f"{self.prog}: {message}{self._unexpanded_hint(message)}\n"
                                  f"usage: {usage}   (see {self.prog}?)")

    def _unexpanded_hint(self, message: str) -> str:
        """For a value quoted in ``message`` that starts ``$name`` or ``{``: the line is
        taken as written (IPython's expansion is off for this magic), and what to write."""
        # (the whole quoted value: an argument list that merely starts with a set is not one)
        if self.api is None or not re.search(r"'(\$[A-Za-z_]\w*|\$?\{[^'\s]*\})'", message):
            return ""
        return (f"; {self.prog}'s line is not expanded by IPython ($name and {{expr}} stay as written): "
                f"write the value itself, or call {self.api} with a variable")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise self.usage_error(message)

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        if args == [] and namespace is None and type(args) is list:
            # A line without options (the common ``%pmap f, xs``): the defaults, parsed
            # once (argparse took ~15 us a call); a fresh namespace each time, as the
            # magics set attributes on it. (No option's default is mutable; an option
            # added since makes it parse again.)
            if self._no_options is None or self._no_options[0] != len(self._actions):
                self._no_options = (len(self._actions), vars(self._parse([])))
            return argparse.Namespace(**self._no_options[1])
        return self._parse(args, namespace)

    def _parse(self, args: Any, namespace: Any = None) -> argparse.Namespace:
        if self.intermixed:
            opts, extra = self.parse_known_intermixed_args(args, namespace)
        else:
            opts, extra = self.parse_known_args(args, namespace)
        if extra:
            said = None if extra[0].startswith("-") or self.extra_words is None else self.extra_words(opts, extra)
            raise self.usage_error(said or self.unknown(extra[0]))
        return opts

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:  # type: ignore[override]
        opts, extra = super().parse_known_args(self._negatives_attached(args), namespace)
        return without_given(opts), extra

    def parse_known_intermixed_args(self, args: Any = None,  # type: ignore[override]
                                    namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        opts, extra = super().parse_known_intermixed_args(self._negatives_attached(args), namespace)
        return without_given(opts), extra

    def _negatives_attached(self, args: Any) -> Any:
        """``args`` with a value that starts like a negative number attached to its option
        (``--max-memory -1GB`` as ``--max-memory=-1GB``, ``-n -1e3`` as ``-n-1e3``).

        argparse takes ``-1GB`` or ``-1e3`` for an option (only ``-1`` and ``-0.5`` read
        as negative numbers), so ``--max-memory -1GB`` said "expected one argument",
        one argument having been given, where the value's own check says what is wrong
        with it (``max_memory must be more than 0 bytes``), as ``--max-memory=-1GB`` did.
        """
        if not args:
            return args
        actions = self._option_string_actions  # noqa: SLF001 - argparse has no public table
        words, out = list(args), []
        at = 0
        while at < len(words):
            word = words[at]
            if word == "--":  # the end of the options: the rest as it is
                out.extend(words[at:])
                break
            if (_LOOKS_NEGATIVE.match(word) and word.split("=", 1)[0] not in actions and self._positionals._group_actions  # noqa: SLF001
                    and not any(w.startswith("-") and not _LOOKS_NEGATIVE.match(w) for w in words[at + 1:])):
                # A positional that looks negative (``%pool resize -1GB``), with only
                # positionals after it: argparse took it for an unknown option.
                out.append("--")
                out.extend(words[at:])
                break
            value = words[at + 1] if at + 1 < len(words) else None
            if (value is not None and word.startswith("-") and _takes_next_word(word, actions)
                    and _LOOKS_NEGATIVE.match(value) and value.split("=", 1)[0] not in actions):
                out.append(f"{word}={value}" if word.startswith("--") else word + value)
                at += 2
                continue
            out.append(word)
            at += 1
        return out

    def dash_hint(self, text: str) -> str:
        """``; '—compare' starts with an em dash (U+2014), not the ASCII '-' or '--' ...`` for the first
        word of ``text`` that starts with a dash other than ASCII '-' (autocorrect's en
        or em dash for ``--``, a minus sign pasted from a document), else "". Such a word
        is no option: Python or argparse then said only that the line was not right."""
        found = re.search(rf"(?:^|(?<=[\s,]))([{_OTHER_DASHES}]+)([^\s,]*)", text)
        if found is None:
            return ""
        dashes, name = found.groups()
        actions = self._option_string_actions  # noqa: SLF001 - argparse has no public table
        meant = next((o for o in (f"--{name}", f"-{name}") if name and o in actions), None)
        char = dashes[0]
        what = unicodedata.name(char, "a dash").lower()
        fix = f": write {meant}" if meant else ""
        return (f"; {dashes + name!r} starts with {'an' if what[0] in 'aeiou' else 'a'} {what} (U+{ord(char):04X}), "
                f"not the ASCII '-' or '--' an option starts with{fix}")

    def unknown(self, token: str) -> str:
        """What is wrong with a token no option takes: for an option, the magic's note when it
        is another magic's (``elsewhere``), else a close option's name when there is one.

        Close is judged on the names without their dashes (``--`` made ``--retries`` look
        like ``--workers``), or a name that begins only one option (``--rerun``); the
        other magic's options count (``%%parallel --retry`` is told about ``--retries``)."""
        if not token.startswith("-"):
            return f"unexpected argument {token!r}{self.dash_hint(token)}"
        name = token.split("=", 1)[0]
        if name in self.elsewhere:
            return f"unknown option {name}: {self.elsewhere[name]}"
        actions = self._option_string_actions  # noqa: SLF001 - argparse has no public table
        # (each name and what it sets: -n and --workers are one option; another magic's names too)
        names = {**{option: actions[option].dest for option in actions}, **{o: o for o in self.elsewhere}}
        begun = [option for option in names if option.startswith(name)]
        cased = [option for option in names if option.lower() == name.lower()]  # (-N, -Q: the Shift key)
        if cased:
            close = cased[0]
        elif len(name) > 3 and len({names[option] for option in begun}) == 1:
            close = begun[0]
        else:
            bare = {option.lstrip("-"): option for option in names}
            found = difflib.get_close_matches(name.lstrip("-"), list(bare), n=1, cutoff=0.6)
            if not found:
                return f"unknown option {name}"
            close = bare[found[0]]
        if close in self.elsewhere:  # (--retry in %%parallel: --retries is %pmap's)
            return f"unknown option {name}; {close} is {self.elsewhere[close]}"
        return f"unknown option {name}; did you mean {'/'.join(actions[close].option_strings)}?"


#: Dashes that are not ASCII '-' but look like it: hyphens, figure / en / em dash, horizontal
#: bar, minus sign, small and full-width hyphen-minus (autocorrect writes '—' for '--').
_OTHER_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"

#: A value argparse would take for an option (``-1GB``, ``-1e3``, ``-.5s``): see _Parser._negatives_attached.
_LOOKS_NEGATIVE = re.compile(r"-\.?\d")

def _int_at_least(minimum: int, words: str) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers >= ``minimum`` (``words`` says so in errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {words}, not {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "at least 1")


def _workers_int(text: str) -> int | None:
    """``-n`` of ``%pmap`` / ``%%parallel``: a size of at least 1, or -1 (joblib's
    ``n_jobs=-1``) for the whole pool, as leaving ``-n`` out."""
    if text.strip() == "-1":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (-1 or no -n: the whole pool)") from None
_nonnegative_int = _int_at_least(0, "0 or more")


def _pool_size_int(text: str) -> int:
    """``-n`` of ``%pool`` (and ``%pool resize N``): a size of at least 1, or -1 (joblib's
    ``n_jobs=-1``, ``start_pool(workers=-1)``) for one worker per usable CPU."""
    if text.strip() == "-1":
        return -1
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (-1: one per usable CPU)") from None


def _tasks_per_child_int(text: str) -> int:
    """``--max-tasks-per-child`` of ``%pool``: the number checked as ``start_pool`` checks
    its ``max_tasks_per_child`` (``tasks_per_child_refused``: one check, one wording)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    why = tasks_per_child_refused(value)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return value


def _start_method(text: str) -> str:
    """``--start-method`` of ``%pool``: checked as ``start_pool`` and ``%config MPMagic.start_method``
    check it (``start_method_refused``: one accepted set, one wording; ``FORK`` is none of them)."""
    why = start_method_refused(text)
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:  # (not >: NaN too)
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


@functools.cache
def _pmap_parser() -> _Parser:
    p = _Parser(prog="%pmap", usage="%(prog)s [options] FUNC, ITERABLE [, ITERABLE ...]",
                api="mpmagic.pmap(f, xs, workers=n)")
    p.add_argument("-n", "--workers", type=_workers_int,
                   help="worker processes to use (default, or -1: the pool's size); more than the pool has grows it, "
                        "for good (%%pool resize N shrinks it)")
    p.add_argument("--chunksize", type=_positive_int, help="items per message (default: automatic)")
    p.add_argument("--star", action="store_true", help="call FUNC(*item) for each item, like starmap")
    p.add_argument("--compare", action="store_true", help="also run serially here; report the measured speedup (not for a function using an mpmagic Queue, Value, Array or Event: one line says why)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the timing report")
    p.add_argument("--errors", choices=("raise", "collect"), default="raise",
                   help="raise the first error (default), or collect failures in place of results")
    p.add_argument("--timeout", type=_positive_float, help="seconds an item may run before it is stopped")
    p.add_argument("--retries", type=_nonnegative_int, default=0,
                   help=f"times to re-send an item whose worker died (no maximum: once one item's worker "
                   f"died {SAY_RETRIES_AT} times the run says so, and the final error says how often it was sent)")
    p.add_argument("--seed", type=_nonnegative_int,
                   help="give item i its own random stream from SEED and i (same results on any workers)")
    p.add_argument("--rerun-failed", action="store_true",
                   help="run only the failed items of the last %%pmap again, with its FUNC looked up again as its line "
                        "wrote it (so a fix since is used) or FUNC if given alone, and return the full results (no "
                        "ITERABLE; only -n, --chunksize, --timeout, --retries and -q go with it)")
    p.add_argument("--bg", action="store_true",
                   help="run in the background: return a run handle at once (not with --compare or --scaling)")
    config.add_options(p, "items")
    p.elsewhere = {
        "-o": "a %%parallel option; assign %pmap's value instead: results = %pmap f, xs",
        "--output": "a %%parallel option; assign %pmap's value instead: results = %pmap f, xs",
        "--reduce": "a %%parallel option; reduce %pmap's value instead: results = %pmap f, xs, then sum(results)",
        "--gather": "a %%parallel option; %pmap's value is the list of results: results = %pmap f, xs",
    }
    return p


@functools.cache
def _parallel_parser() -> _Parser:
    p = _Parser(prog="%%parallel", usage="%(prog)s [options]", api="mpmagic.parallel(code, workers=n)")
    p.add_argument("-n", "--workers", type=_workers_int, help="ranks to run at once (default, or -1: the pool's size)")
    p.add_argument("--compare", action="store_true", help="also run the cell once here with rank=0, size=1, on a copy of its names as a rank (its output labelled [serial]; with --reduce: say whether the reduced value equals that one); not for a cell using an mpmagic Queue, Value, Array or Event: one line says why")
    p.add_argument("-o", "--output", metavar="NAME", help="store the list of last values in NAME")
    p.add_argument("--reduce", metavar="FUNC", help="combine the ranks' values with FUNC (e.g. sum)")
    p.add_argument("--gather", metavar="NAME[,NAME]",
                   help="bring these variables of every rank back as lists (names separated by commas, or by spaces "
                        "within quotes: --gather 'x y'); "
                        "with --bg they are in the handle's result().gathered, a dict of those lists")
    p.add_argument("--timeout", type=_positive_float, help="seconds a rank may run before it is stopped")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the timing report")
    p.add_argument("--no-label", action="store_true", help="do not prefix output lines with [rank N]")
    p.add_argument("--bg", action="store_true",
                   help="run in the background: the cell's value is a run handle (-o NAME stores it); its result() "
                        "is the list of the ranks' values, .gathered the --gather lists (not with --reduce)")
    p.add_argument("--seed", type=_nonnegative_int, help="give each rank its own random stream from SEED and its rank")
    p.add_argument("--keep", action="store_true",
                   help="persistent ranks: each rank keeps its variables in its worker for the next --keep cell")
    p.add_argument("--reset", action="store_true", help="with --keep: drop the kept ranks and start afresh")
    config.add_options(p, "ranks")
    p.elsewhere = {
        "--retries": "a %pmap option (it re-sends an item whose worker died); a rank runs once, and one whose "
                     "worker died fails the cell: run the cell again, or map the work with %pmap --retries N",
        "--errors": "a %pmap option; a failed rank raises ParallelError, whose .values keeps the values of the "
                    "ranks that finished and .failures each failed rank's error",
        "--chunksize": "a %pmap option; each rank is one task",
        "--star": "a %pmap option; each rank runs the cell, which reads rank and size",
        "--rerun-failed": "a %pmap option; run the cell again",
    }
    return p


#: %pool's subcommands, in the order its help lists them.
_POOL_ACTIONS = ("status", "start", "stop", "restart", "resize", "local", "dask", "checkpoints", "runs", "cancel",
                 "setup")

@functools.cache
def _pool_parser() -> _Parser:
    p = _Parser(prog="%pool", intermixed=True,
                usage="%(prog)s [status | start | stop | restart | resize N | local | dask [ADDRESS]"
                " | checkpoints [clear [NAME]] | runs | cancel ID | setup [clear]] [options]")
    # (no argparse choices: a misspelled option before the word, ``%pool --worker 2``, made its value
    # the subcommand, and argparse's "invalid choice" came before the option was named; checked in pool())
    p.add_argument("action", nargs="?", default="status", metavar="ACTION",
                   help=f"the subcommand: {', '.join(_POOL_ACTIONS)} (see the usage above)")
    p.add_argument("target", nargs="?", metavar="TARGET",  # (upper case, as ACTION and the reference)
                   help="N for resize; ADDRESS for dask; clear for checkpoints and setup; the run's ID for cancel")
    p.add_argument("name", nargs="?", metavar="NAME", help="checkpoints clear: the function whose stored runs to delete")
    p.add_argument("-n", "--workers", type=_pool_size_int,
                   help="number of worker processes (-1: one per usable CPU, as joblib's n_jobs=-1)")
    # (type: its refusal in start_pool's words; choices: for the help, as the type refuses first)
    p.add_argument("--start-method", type=_start_method, choices=START_METHODS, help="how workers start")
    p.add_argument("--max-tasks-per-child", type=_tasks_per_child_int,
                   help="recycle a worker after this many items (0: never)")
    p.add_argument("--max-memory", help="replace a worker holding more than this of its own memory after a task "
                   "(shared memory it only reads is not counted; e.g. 2GB; 0: no limit)")
    p.add_argument("--gpus", metavar="ID[,ID]",
                   help="start: give workers CUDA_VISIBLE_DEVICES round-robin from these devices")
    p.add_argument("--scheduler-file", help="dask: connect to the scheduler described in this file")
    p.add_argument("--tls-ca-file", help="dask: CA certificate for tls:// addresses")
    p.add_argument("--tls-cert", help="dask: client certificate for tls:// addresses")
    p.add_argument("--tls-key", help="dask: client key for tls:// addresses")
    p.add_argument("--timeout", type=_positive_float, default=10.0, help="dask: seconds to wait for the scheduler (default: 10)")
    p.extra_words = _pool_extra_words
    return p


def _pool_extra_words(opts: argparse.Namespace, extra: list[str]) -> str | None:
    """``unexpected argument 'b': %pool checkpoints takes clear NAME`` for words past the
    three %pool reads, naming the first word ``opts.action`` does not take, as
    _check_pool_line says it for fewer (it said only ``unexpected argument 'b'``). For an
    unknown subcommand, that first (``%pool foo a b c`` named 'c' as unexpected)."""
    if opts.action not in _POOL_ACTIONS:
        return _unknown_pool_action(opts.action)
    takes = _POOL_WORDS.get(opts.action, ())
    words = [w for w in (opts.target, opts.name) if w is not None] + extra
    return f"unexpected argument {words[len(takes)]!r}: %pool {opts.action} takes {' '.join(takes) or 'none'}"


def _unknown_pool_action(action: str) -> str:
    """``unknown subcommand 'strat'; did you mean start?``, or the list of those %pool takes."""
    close = difflib.get_close_matches(action, _POOL_ACTIONS, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (it takes {', '.join(_POOL_ACTIONS)})"
    return f"unknown subcommand {action!r}{hint}"


def _options_ended(parser: _Parser, tokens: list[str]) -> list[str]:
    """``%%parallel``'s option words without a ``--`` that ends them, as on a command
    line (it was "unknown option --"); a word after it is refused: the line takes
    options only (the cell is the code). A ``--`` that is an option's value stays."""
    actions = parser._option_string_actions  # noqa: SLF001 - argparse has no public table
    for at, word in enumerate(tokens):
        if word == "--" and not (at and _takes_next_word(tokens[at - 1], actions)):
            if at + 1 < len(tokens):
                raise parser.usage_error(f"unexpected argument {tokens[at + 1]!r} after --: {parser.prog} takes "
                                         "options only (the cell is its code)")
            return tokens[:at]
    return tokens


#: What ``%pmap --rerun-failed`` takes (the last run's other options stay), as its
#: parser's destinations, the ones passed on to ``postmortem.rerun_failed``.
_RERUN_OPTIONS = frozenset({"workers", "chunksize", "timeout", "retries"})
_RERUN_TAKES = _RERUN_OPTIONS | {"quiet", "rerun_failed"}


@functools.cache
def _without_defaults(build: Callable[[], _Parser]) -> _Parser:
    """A parser of its own made by ``build`` (the uncached builder), whose options
    have no defaults: it reads only what a line says. Built once per builder."""
    parser = build()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public table
        if action.option_strings:
            action.default = argparse.SUPPRESS
    return parser


def _given_options(build: Callable[[], _Parser], tokens: list[str]) -> dict[str, str]:
    """The options ``tokens`` give, as ``{destination: option name as written}`` (defaults left out).

    The name is the one on the line: ``--progress`` and ``--no-progress`` share
    a destination, and a refusal naming the other one named an option the user
    never wrote. (``-qn2``, combined short flags: the option's own short name.)
    ``build``: the magic's uncached parser builder (``_pmap_parser.__wrapped__``);
    the magic's own parser, shared by every call, is never changed."""
    parser = _without_defaults(build)
    given = vars(parser.parse_args(tokens))
    actions = parser._option_string_actions  # noqa: SLF001 - argparse has no public table
    written: dict[str, str] = {}
    for token in tokens:
        action = actions.get(token.split("=", 1)[0]) if token.startswith("-") else None
        if action is not None:
            written.setdefault(action.dest, token.split("=", 1)[0])
    return {a.dest: written.get(a.dest, a.option_strings[0]) for a in parser._actions  # noqa: SLF001
            if a.option_strings and a.dest in given}


#: What ``--scaling`` passes on to each of its runs, besides -n (its largest size), -q (it
#: prints no report: the table is its value), --help and --scaling itself, as the parsers'
#: destinations. Any other option is refused by name (``_check_scaling_line``), not dropped.
_SCALING_TAKES = frozenset({"workers", "quiet", "help", "scaling", "chunksize", "star", "errors", "timeout",
                            "retries", "seed", "no_label"})


def _check_scaling_line(parser: _Parser, build: Callable[[], _Parser], tokens: list[str]) -> None:
    """A usage error naming the options ``--scaling`` does not take (as written on the line).

    ``--scaling`` returns a table of timings, not the run's values (``-o``,
    ``--gather``, ``--reduce`` have nothing to store), and measures the serial
    run itself (``--compare``); a checkpoint would make every run after the
    first compute nothing, and a progress bar or insights per run are not
    made. Before, all of these were accepted and silently dropped.
    """
    given = vars(_without_defaults(build).parse_args(tokens))
    refused = [name for dest, name in _given_options(build, tokens).items()
               if dest not in _SCALING_TAKES and given[dest] is not False]  # (--no-progress: none is made)
    if refused:
        takes = ("-n, --chunksize, --star, --errors, --timeout, --retries, --seed and -q" if parser.prog == "%pmap"
                 else "-n, --timeout, --seed, --no-label and -q")
        raise parser.usage_error(
            f"--scaling does not take {', '.join(refused)}: it times the run serially and on 1..N workers and "
            f"returns that table, not the run's values (it takes {takes}); run without --scaling for "
            f"{'them' if len(refused) > 1 else 'it'}")


# (a warm %pmap line tokenized its text again each call)
_without_final_semicolon = functools.lru_cache(maxsize=256)(without_final_semicolon)


def _statement_is_an_expression() -> bool:
    """Is the ``%pmap ...;`` that called us a statement of its own (its value
    would be shown), rather than ``res = %pmap ...;`` (which must assign the
    results, as ``res = list(map(f, xs));`` does)? Asked of the calling frame
    (the one that called IPython's ``run_line_magic``) with ``executing``,
    which IPython's tracebacks use. When it cannot tell (``%time``, ``exec``
    of a string), not: the results are returned, never dropped."""
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "run_line_magic":
        frame = frame.f_back
    if frame is None or frame.f_back is None:
        return False
    try:
        import executing

        node = executing.Source.executing(frame.f_back).node
    except Exception:
        return False
    return node is not None and isinstance(getattr(node, "parent", None), ast.Expr)


_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = frozenset(_OPENERS.values())


def _closes_more_than_opened(text: str) -> str | None:
    """The first closing bracket in ``text`` that closes more than was opened
    before it (the ')' of ``f, xs)[0]``), or None. Read token by token (a ')' in a string or a comment does
    not count), so the line can be told apart from one that is simply not
    Python: the stray ')' ends map()'s argument list before the line does,
    whatever follows it."""
    depth = 0
    try:
        for token in tokenize.generate_tokens(iter([text + "\n"]).__next__):
            if token.type != tokenize.OP:
                continue
            if token.string in _OPENERS:
                depth += 1
            elif token.string in _CLOSERS:
                if depth == 0:
                    return token.string
                depth -= 1
    except SyntaxError as error:  # Python 3.12+'s tokenizer names the stray bracket itself
        found = re.match(r"unmatched '(.)'", str(error.msg))
        return found.group(1) if found else None
    except tokenize.TokenError:  # an unclosed bracket or string: nothing closed too early so far
        pass
    return None


def _never_closed(text: str) -> str | None:
    """The first opening bracket in ``text`` that is never closed (the '[' of ``f, [1, 2``),
    or None; read token by token, as :func:`_closes_more_than_opened` reads them."""
    opened: list[str] = []
    try:
        for token in tokenize.generate_tokens(iter([text + "\n"]).__next__):
            if token.type != tokenize.OP:
                continue
            if token.string in _OPENERS:
                opened.append(token.string)
            elif token.string in _CLOSERS and opened:
                opened.pop()
    except (tokenize.TokenError, SyntaxError):
        pass  # (the end of the text inside a bracket: what was opened so far is what counts)
    return opened[0] if opened else None


def _eval_map_args(text: str, user_ns: dict[str, Any], parser: _Parser,
                   local_ns: dict[str, Any] | None = None, ended: bool = False) -> tuple:
    """Evaluate ``text`` as the argument list of ``map()`` in the user's namespace.

    ``local_ns``: the locals of the function whose body holds the ``%pmap``
    line (``def f(data): res = %pmap g, data``), looked up before the
    notebook's names, as in ``map(g, data)`` there (a walrus there binds in
    neither, as in IPython's ``%time``). ``ended``: a ``--`` ended the options,
    so a word in ``text`` that reads as an option is the user's argument, and
    an error gets no "options go before FUNC" hint.
    """
    __tracebackhide__ = True
    template, filename, collector = _args_code(text, parser, ended)
    # (registered each call: the lines a traceback through the arguments shows)
    linecache.cache[filename] = (len(text), None, [text + "\n"], filename)
    # The notebook's namespace as globals and no separate locals, as a cell's
    # own line: a walrus in the arguments (``%pmap f, (xs := load())``) binds
    # ``xs`` in the notebook, as ``map(f, (xs := load()))`` does. The collector
    # is lent to it for the call.
    # A name of its own per call (two threads may evaluate %pmap lines at once):
    # the compiled line's collector is renamed to it.
    name = f"__mpmagic_args_{next(_arg_names)}__"
    names = template.co_names
    at = names.index(collector)
    code = template.replace(co_names=(*names[:at], name, *names[at + 1 :]))
    user_ns[name] = _collect_args
    try:
        if local_ns is not None and local_ns is not user_ns and _is_class_body(local_ns):
            # A class body's names are seen by the argument list itself, not
            # by a lambda or comprehension in it, as in ``map(...)`` there:
            # run as a statement of a class body, in the class's namespace.
            args, keywords = _eval_in_class_body(text, parser, filename, collector, name, user_ns, local_ns)
        elif local_ns is not None and local_ns is not user_ns:
            # One namespace of both, the function's names winning: a lambda
            # written here finds them as its globals (eval's separate locals
            # are no closure: ``lambda v: v * k`` could not see ``k``).
            args, keywords = eval(code, {**user_ns, **local_ns})
        else:
            args, keywords = eval(code, user_ns)
    except (NameError, TypeError) as exc:
        # ``%pmap f, xs --compare`` is ``xs - (-compare)``, as in map(): that error stays,
        # with a line saying where options go when the name is one of an option's. A
        # TypeError gets it when the text holds an option (``ys -q`` with a ``q`` defined
        # is ``ys - q``: a list minus an int).
        words = [] if ended else _option_words(text, parser)
        if (any(exc.name == option.lstrip("-").split("-")[0] for option in words) if isinstance(exc, NameError)
                else bool(words)):
            add_note(exc, _options_after(text, parser).removeprefix("; "))
        raise
    finally:
        user_ns.pop(name, None)
    return _map_keywords(args, keywords, text, parser)


def _func_text(text: str) -> str | None:
    """FUNC as written in map()'s argument list ``text`` (``functools.partial(co, 10)``),
    or None (a ``*args`` first, or a line that does not parse)."""
    try:
        call = ast.parse(f"f({text}\n)", mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or not call.args or isinstance(call.args[0], ast.Starred):
        return None
    return ast.get_source_segment(f"f({text}\n)", call.args[0])


def _eval_in_class_body(text: str, parser: _Parser, filename: str, collector: str, name: str,
                        user_ns: dict[str, Any], class_ns: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """map()'s arguments and keywords from ``text`` evaluated as a statement of
    the class body whose namespace is ``class_ns``, as ``map(...)`` there.

    Why not ``eval(code, user_ns, class_ns)``, Python's class scope until
    3.11: from 3.12 (PEP 709) a list, set or dict comprehension in top-level
    code is inlined and reads eval's separate locals, so ``[base for _ in
    range(2)]`` saw the class's ``base`` where map() there sees the
    notebook's. A real class body's code is run instead, in the class's own
    namespace (a walrus binds there, as today); the names the compiler's
    class prologue writes (``__qualname__``, ...) are put back after it.
    ``name``: the collector's name for this call (see :func:`_eval_map_args`).
    """
    __tracebackhide__ = True
    class_name = str(class_ns.get("__qualname__", "")).rpartition(".")[2]
    template = _class_body_code(text, parser, filename, collector, class_name if class_name.isidentifier() else "_")
    names = template.co_names
    at = names.index(collector)
    code = template.replace(co_names=(*names[:at], name, *names[at + 1 :]))
    found: list[tuple[tuple, dict[str, Any]]] = []
    user_ns[name] = lambda *args, **keywords: found.append((args, keywords))
    missing = object()
    saved = {key: class_ns.get(key, missing) for key in _CLASS_BODY_OWN_NAMES}
    try:
        exec(code, user_ns, class_ns)
    finally:
        for key, value in saved.items():
            if value is missing:
                class_ns.pop(key, None)
            elif class_ns.get(key, missing) is not value:
                class_ns[key] = value
    return found[0]


def _class_body_code(text: str, parser: _Parser, filename: str, collector: str, class_name: str) -> types.CodeType:
    """The code of the body of ``class <class_name>: <collector>(<text>)``, under
    ``filename`` and at the same lines and columns as :func:`_args_code`'s (a
    traceback shows the line as written). Named after the user's class, so a
    ``__name`` is mangled as in ``map(...)`` there. Cached by text and name."""
    __tracebackhide__ = True
    key = (text, class_name)
    code = _class_body_codes.get(key)
    if code is not None:
        return code
    call = astlock.parse(f"{collector}({text}\n)", filename, "eval").body  # type: ignore[attr-defined]  # (checked by _args_code)
    statement = ast.copy_location(ast.Expr(call), call)
    since_312: dict[str, Any] = {"type_params": []} if sys.version_info >= (3, 12) else {}
    body = ast.ClassDef(name=class_name, bases=[], keywords=[], body=[statement], decorator_list=[], **since_312)
    ast.copy_location(body, call)
    try:
        module = astlock.compile_tree(ast.Module(body=[body], type_ignores=[]), filename, "exec")
    except SyntaxError as exc:  # what only a class body refuses (a walrus in a comprehension), as map() there
        raise parser.usage_error(f"{text!r}: {exc.msg}") from None
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    # "in <module>" in a traceback, as the line evaluated elsewhere shows
    since_311: dict[str, Any] = {"co_qualname": "<module>"} if sys.version_info >= (3, 11) else {}
    code = code.replace(co_name="<module>", **since_311)
    if len(_class_body_codes) >= _ARGS_CODES_KEPT:
        _class_body_codes.clear()
    _class_body_codes[key] = code
    return code


#: Class-body codes of argument lists (:func:`_class_body_code`), by text and class name.
_class_body_codes: dict[tuple[str, str], types.CodeType] = {}


def _class_body_own_names() -> frozenset[str]:
    """The names the compiler's class prologue and epilogue bind in a class
    namespace (``__module__``, ``__qualname__``, 3.13's ``__firstlineno__``
    and ``__static_attributes__``, ...), asked of this Python."""
    module = compile("class _:\n    pass\n", "<class>", "exec")
    namespace: dict[str, Any] = {}
    exec(next(c for c in module.co_consts if isinstance(c, types.CodeType)), {"__name__": "_"}, namespace)
    return frozenset(namespace) | {"__classcell__", "__classdictcell__"}


_CLASS_BODY_OWN_NAMES = _class_body_own_names()


#: Compiled argument lists by their text (:func:`_args_code`): a warm ``%pmap f, xs``
#: parsed, checked and compiled its line again each call (~40 us of its ~0.25 ms).
_args_codes: dict[str, tuple[types.CodeType, str, str]] = {}
_ARGS_CODES_KEPT = 256


def _args_code(text: str, parser: _Parser, ended: bool = False) -> tuple[types.CodeType, str, str]:
    """``text`` checked and compiled as map()'s argument list passed to a collector,
    the file name its lines go under, and the collector's name in the code (one
    the line does not use); the usage error for a line that is not one. Cached
    by the text: the same line compiles to the same code (a lambda in it keeps
    the same payload key). ``ended``: a ``--`` ended the options (no hint that
    options go before FUNC)."""
    __tracebackhide__ = True
    found = _args_codes.get(text)
    if found is not None:
        return found
    if not text:
        raise parser.usage_error("missing FUNC and ITERABLE", like=TypeError)  # (map() raises TypeError)
    collector = "__mpmagic_args__"
    while collector in text:
        collector += "_"
    source = f"{collector}({text}\n)"  # the newline lets a trailing # comment end the line
    def unbalanced(bracket: str = ")") -> IPythonUsageError:
        return parser.usage_error(f"the argument list is not balanced (a '{bracket}' ends it before the end of "
                                  f"the line): {text!r}")

    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        # ``f, xs)[0]``: a stray ')' is named as such, whether or not the rest
        # of the line happens to parse once the call's own ')' is added.
        if (bracket := _closes_more_than_opened(text)) is not None:
            raise unbalanced(bracket) from None
        hint = parser.dash_hint(text) or ("" if ended else _options_after(text, parser))  # (after a --, the user's words are ARGS)
        if not hint and (bracket := _never_closed(text)) is not None:
            # (Python's own words would name the collector's ')': "does not match opening parenthesis '['")
            hint = f": its '{bracket}' is never closed"
        elif not hint and exc.msg != "invalid syntax" and "parenthesis" not in exc.msg:
            # Python's words where they say more and are about the user's text, as map(...) would
            # show them: "Perhaps you forgot a comma?" (``f xs``), "Generator expression must be
            # parenthesized" (``f, x for x in xs``), "unterminated string literal"
            hint = f" (Python: {exc.msg})"
        raise parser.usage_error(f"{text!r} is not an argument list like map()'s{hint}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == collector):
        # A stray ')' closed the argument list early and the rest of the line
        # (``f, xs)[1].append(3``) was code around the call: refused before
        # anything is evaluated, as map() would never run it.
        raise unbalanced() from None
    if not _MAP_TAKES_STRICT and any(k.arg is not None for k in call.keywords):
        # (refused before anything is evaluated, as map() refuses it; ``**opts`` is seen once evaluated)
        raise parser.usage_error(f"map() takes no keyword arguments: {text!r}", like=TypeError)
    if any(isinstance(node, ast.Await) for node in ast.walk(tree)):
        raise parser.usage_error("await in the arguments is not supported: await it in a line before "
                                 "(items = await load()), then %pmap f, items")
    # Named by content, not by a counter: linecache keeps every name for good
    # (see cell.register_source), and a lambda written here keeps the same
    # code, so the same payload key, call after call.
    filename = f"<pmap-args-{source_digest(text)}>"
    try:
        code = compile(source, filename, "eval", dont_inherit=True)
    except SyntaxError as exc:  # what only compiling finds (a yield outside a function)
        raise parser.usage_error(f"{text!r}: {exc.msg}") from None
    if len(_args_codes) >= _ARGS_CODES_KEPT:
        _args_codes.clear()
    _args_codes[text] = found = code, filename, collector
    return found


#: Whether this Python's map() takes ``strict=`` (3.14 and later), as %pmap's argument list then does.
_MAP_TAKES_STRICT = sys.version_info >= (3, 14)


class _StarArgs(tuple):
    """map()'s arguments ``(func, pairs)`` whose items are argument tuples for ``func`` (star):
    ``f, xs, ys, strict=True`` made into ``f, zip(xs, ys, strict=True)``."""

    __slots__ = ()


def _map_keywords(args: tuple, keywords: dict[str, Any], text: str, parser: _Parser) -> tuple:
    """map()'s arguments with its keywords applied, or a usage error where map() refuses them.

    ``**{}`` is no keyword, as for map(). ``strict=`` (map() takes it from Python
    3.14): a true one zips several iterables with ``zip(..., strict=True)``, so a
    length mismatch raises map()'s ValueError; with one iterable it changes nothing.
    """
    if not keywords:
        return args
    unknown = [k for k in keywords if not (_MAP_TAKES_STRICT and k == "strict")]
    if unknown:
        if not _MAP_TAKES_STRICT:
            raise parser.usage_error(f"map() takes no keyword arguments: {text!r}", like=TypeError)
        raise parser.usage_error(f"map() got an unexpected keyword argument {unknown[0]!r} (it takes strict=): "
                                 f"{text!r}", like=TypeError)
    if keywords["strict"] and len(args) > 2:
        return _StarArgs((args[0], zip(*args[1:], strict=True)))
    return args


def _code_and_comment(text: str) -> tuple[str, str]:
    """``text`` (map()'s argument list as written) without its final ``# comment``, and
    that comment ("" if none), found as Python finds it (a ``#`` in a string is no comment)."""
    comment = None
    try:
        for token in tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__):
            if token.type == tokenize.COMMENT:
                comment = token.start
    except (tokenize.TokenError, SyntaxError):
        pass  # (an unclosed bracket: the comments before it were seen)
    if comment is None:
        return text, ""
    row, col = comment
    at = sum(len(line) for line in text.splitlines(keepends=True)[: row - 1]) + col
    return text[:at].rstrip(), text[at:].strip()


def _option_words(text: str, parser: _Parser) -> list[str]:
    """The words of ``text`` (map()'s argument list as written) that are one of the magic's
    options; none in its comment (``f, xs  # -n 2 was too slow`` has none)."""
    actions = parser._option_string_actions  # noqa: SLF001 - argparse has no public table
    code = _code_and_comment(text)[0]
    return [w for w in re.findall(r"(?:^|(?<=[\s,]))(--?[A-Za-z][\w-]*)", code) if w in actions]


def _options_after(text: str, parser: _Parser) -> str:
    """``; options go before FUNC: %pmap --compare f, xs`` when ``text`` has options after the
    arguments (a command line's habit, read as Python there), else "". A final comment stays
    at the end of the line shown (before FUNC it would make the rest of the line a comment)."""
    words = _option_words(text, parser)
    if not words:
        return ""
    code, comment = _code_and_comment(text)
    at = re.search(rf"(?:^|(?<=[\s,])){re.escape(words[0])}(?![\w-])", code)
    if at is None:
        return ""
    args, options = code[:at.start()].strip().rstrip(","), code[at.start():].strip()
    return f"; options go before FUNC: {parser.prog} {options} {args}" + (f"  {comment}" if comment else "")


_arg_names = itertools.count()


def _is_class_body(local_ns: dict[str, Any]) -> bool:
    """Whether ``local_ns`` is a class body being executed (``class C: r = %pmap ...``).

    Python puts ``__module__`` and ``__qualname__`` in a class namespace
    before the body's first line; a function's locals never hold both.
    """
    return "__qualname__" in local_ns and "__module__" in local_ns


def _collect_args(*args: Any, **keywords: Any) -> tuple[tuple, dict[str, Any]]:
    return args, keywords


def _interrupted(magic: str, text: str | None = None, outcome: str | None = None) -> KeyboardInterrupt:
    """The KeyboardInterrupt a magic raises when the user interrupts its run.

    It carries ``_render_traceback_`` (IPython's hook for exceptions that
    render themselves, as errors.MPMagicError does), so the notebook shows
    this one line instead of a traceback through the magic; its type stays
    KeyboardInterrupt, so ``except KeyboardInterrupt`` and the kernel's
    ``ename`` are unchanged. ``outcome``: what the backend did with the run's
    work (Dask cannot stop a running task and says what it did instead).
    """
    return one_line_interrupt(text or _INTERRUPTED.format(magic=magic, outcome=outcome or _STOPPED))


class _Call:
    """One magic call in progress, for :func:`_one_line_interrupts`: the one line an
    interrupt escaping the magic now shows, and what it keeps (a finished run's value)."""

    def __init__(self, magic: str, before: str | None = None) -> None:
        self.magic = magic
        self.line = before or f"{magic} interrupted before its run started: nothing ran"
        self.kept: tuple[str, Any] | None = None  # (attribute of the interrupt, value)


# The calls in progress in this thread, innermost last (a magic may run inside
# another's argument list; two threads may run magics at once).
_calls = threading.local()


def _current_call() -> _Call | None:
    stack = getattr(_calls, "stack", None)
    return stack[-1] if stack else None


def _now(line: str, kept: tuple[str, Any] | None = None) -> None:
    """What an interrupt escaping the current magic from here on says (and keeps)."""
    call = _current_call()
    if call is not None:
        call.line, call.kept = line, kept


def _finished(magic: str, attr: str, what: str, value: Any) -> None:
    """The run returned ``value``: an interrupt from here on (the report, storing
    names) keeps it on the interrupt (``attr``) and says where; the cell still stops."""
    _now(f"{magic} interrupted after its run had finished: {what} kept in this interrupt's .{attr} "
         f"(sys.last_value.{attr} in the next cell)", (attr, value))


def _in_user_arguments(exc: BaseException) -> bool:
    """Did the interrupt land in the user's own code that the magic evaluated (the
    argument list of ``%pmap``, a generator or function it calls)? Its frames are
    then kept, as ``list(map(f, slow_args()))`` shows them."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith("<pmap-args-"):
            return True
        tb = tb.tb_next
    return False


def _one_line_interrupts(name: str, before: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make magic ``name`` (``%pmap``) end every interrupt in one line, whenever it lands.

    ``before``: what an interrupt says until the magic says otherwise (by
    default "{name} interrupted before its run started: nothing ran").

    The run's own interrupts are already one line (:class:`_magic_errors`, the
    backends) and stay as they are. This covers the rest: an interrupt while
    the line is parsed or evaluated or the run prepared (``%pmap interrupted
    before its run started: nothing ran``), or after the run returned, while
    the report shows or names are stored: the cell stops, as the user asked,
    and the finished run's value is kept on the interrupt, whose line says
    where (:func:`_finished`). A magic says what an interrupt means at each
    step with :func:`_now`. Without this, IPython showed a traceback through
    argparse or gettext, or an empty one through the magic's hidden frames.
    An interrupt inside the user's own code in the argument list keeps the
    user's frames, as ``list(map(f, slow_args()))`` shows them.
    """

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def magic(self: Any, *args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            call = None
            try:
                call = _Call(name, before)
                _calls.__dict__.setdefault("stack", []).append(call)
                return method(self, *args, **kwargs)
            except KeyboardInterrupt as exc:
                if hasattr(exc, "_render_traceback_") or _in_user_arguments(exc):
                    raise
                new = one_line_interrupt(call.line if call is not None else _Call(name, before).line)
                if call is not None and call.kept is not None:
                    setattr(new, *call.kept)
                raise new from None
            finally:
                stack = _calls.__dict__.get("stack", [])
                if call in stack:
                    stack.remove(call)

        return magic

    return wrap


class _magic_errors:  # noqa: N801 (used as a function: `with _magic_errors(parser):`)
    """A run's errors as the magic says them.

    Our UsageError (bad arguments found by the API) becomes the magic's usage
    error with the pointer to its help (still a ``TypeError`` or ``ValueError``
    as the API's was: :class:`MagicArgumentTypeError`), unless a task raised it
    (it then has the worker's frames and is the task's error). An
    interrupt becomes the one-line KeyboardInterrupt of :func:`_interrupted`;
    when ``serial_pass()`` says the parallel run had finished (a ``--compare``
    run whose report was made), it says the serial run here was interrupted.

    A class, not ``contextlib.contextmanager``: that one sets ``__traceback__``
    on an exception passing through, via the class's own ``__setattr__``,
    and a frozen dataclass exception a task raised became a FrozenInstanceError.
    """

    def __init__(self, parser: _Parser, serial_pass: Callable[[], bool] | None = None) -> None:
        self.parser = parser
        self.serial_pass = serial_pass

    def __enter__(self) -> None:
        return None

    def __exit__(self, etype: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        __tracebackhide__ = True  # noqa: F841 (read by IPython)
        parser = self.parser
        if isinstance(exc, UsageError):
            if came_from_worker(exc):
                return
            # (the API's ArgumentTypeError stays a TypeError, its UsageError a ValueError; a size
            # refused is said as the line gave it: -n 1000, not the API's workers = 1000)
            raise parser.usage_error(size_said_as(exc, "-n"), like=exc) from None
        if isinstance(exc, KeyboardInterrupt):
            if self.serial_pass is not None and self.serial_pass():
                values = "results" if parser.prog == "%pmap" else "ranks' values"
                raise _interrupted(parser.prog, _SERIAL_INTERRUPTED.format(magic=parser.prog, values=values)) from None
            new = _interrupted(parser.prog, outcome=(interrupt_outcome(exc) or _STOPPED) + interrupt_read_past(exc))
            # (a cell's ranks that had failed, and those that finished: its line says where they are)
            new.__dict__.update({k: v for k, v in exc.__dict__.items() if k in ("failures", "values", "gathered")})
            raise new from None


def _compare_finished(compare: bool, before: Any) -> Callable[[], bool]:
    """For :func:`_magic_errors`: did this ``--compare`` run's parallel part finish?

    The API sets the run's report once its parallel run has finished and
    before the serial run starts; an interrupt of the parallel run sets a
    report marked interrupted (or leaves ``before`` in place).
    """

    def finished() -> bool:
        report = api.last_report()
        return compare and report is not before and not getattr(report, "interrupted", False)

    return finished


@magics_class
class MPMagics(Magics):
    """%pmap, %%parallel and %pool."""

    @property
    def _user_ns(self) -> dict[str, Any]:
        """The notebook's namespace: ARGS and cells are evaluated there, -o / --gather write there."""
        if self.shell is None:  # Magics(shell=None) is allowed, but ours need the user's names
            raise UsageError("mpmagic's magics need an IPython shell: load them with %load_ext mpmagic")
        return self.shell.user_ns

    # The line is Python (map()'s argument list): IPython's {expr} / $name
    # expansion of magic lines would turn a set or dict literal into other
    # text ({5, 1, 3} became (5, 1, 3)), as %timeit also avoids.
    @no_var_expand
    @needs_local_scope
    @line_magic
    @_one_line_interrupts("%pmap")
    def pmap(self, line: str = "", local_ns: dict[str, Any] | None = None) -> Any:
        __tracebackhide__ = True
        parser = _pmap_parser()
        tokens, rest, ended = split_options(line, parser)
        rest, silenced = _without_final_semicolon(rest)
        result = self._pmap(parser, tokens, rest, local_ns, ended)
        call = _current_call()
        if result is not None and call is not None and call.kept is None:  # (--rerun-failed's results)
            _finished("%pmap", "results", "its results are", result)
        if silenced and _statement_is_an_expression():
            return None  # %pmap f, xs; shows nothing, as list(map(f, xs)); does
        return result

    def _pmap(self, parser: _Parser, tokens: list[str], rest: str, local_ns: dict[str, Any] | None,
              ended: bool = False) -> Any:
        """``ended``: a ``--`` ended the options (no "options go before FUNC" hint then)."""
        __tracebackhide__ = True
        opts = parser.parse_args(tokens)
        if opts.help:
            return _show_help(MPMagics.pmap)
        if opts.rerun_failed:
            return self._rerun_failed(parser, tokens, rest, local_ns, ended)
        args = _eval_map_args(rest, self._user_ns, parser, local_ns, ended)
        if len(args) < 2:  # (a comment alone, ``%pmap # f, xs``, or ``*[]``, has no FUNC either)
            raise parser.usage_error("missing ITERABLE after FUNC" if args else "missing FUNC and ITERABLE",
                                     like=TypeError)
        if opts.star and (isinstance(args, _StarArgs) or len(args) > 2):
            # (said here in the magic's words: the API's refusal names its star=True)
            raise parser.usage_error("--star takes one iterable of argument tuples, not several iterables",
                                     like=UsageError)  # (a ValueError, as the API's refusal)
        if isinstance(args, _StarArgs):  # strict=True: the iterables zipped, each item FUNC's arguments
            opts.star = True
        with _magic_errors(parser):  # (before the API's own check: its fix then calls FUNC as written)
            api.check_not_async(args[0], lambda: _func_text(rest), several=opts.star or len(args) > 2)
        config.apply(opts)  # %config MPMagic defaults for what the line did not say
        if opts.bg:
            return self._pmap_bg(parser, opts, args)
        if opts.scaling:
            _check_scaling_line(parser, _pmap_parser.__wrapped__, tokens)
            with _magic_errors(parser):
                return scaling.pmap_scaling(args[0], *args[1:], max_workers=opts.workers, star=opts.star,
                                            chunksize=opts.chunksize, errors=opts.errors, timeout=opts.timeout,
                                            retries=opts.retries, seed=opts.seed)
        before = api.last_report()
        recorded = debugging.last_run_ref()
        try:
            with _magic_errors(parser, _compare_finished(opts.compare, before)):
                result = api.pmap(
                    args[0],
                    *args[1:],
                    workers=opts.workers,
                    chunksize=opts.chunksize,
                    star=opts.star,
                    compare=opts.compare,
                    errors=opts.errors,
                    timeout=opts.timeout,
                    retries=opts.retries,
                    seed=opts.seed,
                    **config.run_kwargs(opts),
                )
            _finished("%pmap", "results", "its results are", result)
        finally:
            self._name_func(recorded, rest, local_ns)
            report = api.last_report()
            if report is not None and report is not before and getattr(opts, "chunksize_setting", False):
                report.extra["chunksize_setting"] = True  # its advice names %config MPMagic.chunksize
            _show_report(opts, report, before, self.shell)
        return result

    def _rerun_failed(self, parser: _Parser, tokens: list[str], rest: str, local_ns: dict[str, Any] | None,
                      ended: bool = False) -> Any:
        """``%pmap --rerun-failed [FUNC]`` (mpmagic.postmortem): the last run's failed
        items again, with FUNC, or the last run's FUNC looked up again as its line wrote it
        (``postmortem._rerun_function``).

        The options that a re-run can change are taken; any other one, or an
        ITERABLE, is a usage error: the re-run keeps the last run's input, star
        and errors, and a --bg or --compare given here was dropped without a word.
        """
        __tracebackhide__ = True
        given = _given_options(_pmap_parser.__wrapped__, tokens)
        ignored = [name for dest, name in given.items() if dest not in _RERUN_TAKES]
        if ignored:
            raise parser.usage_error(
                f"--rerun-failed runs the last %pmap's failed items with that run's input and options; it does not "
                f"take {', '.join(ignored)} (it takes -n, --chunksize, --timeout, --retries and -q): run the whole "
                "%pmap again with them instead")
        options = {dest: getattr(parser.parse_args(tokens), dest) for dest in given if dest in _RERUN_OPTIONS}
        func = None
        if rest.strip():
            args = _eval_map_args(rest, self._user_ns, parser, local_ns, ended)
            if len(args) > 1:
                raise parser.usage_error(
                    "--rerun-failed takes FUNC alone (the fixed function; by default the last run's FUNC, looked up "
                    "again as its line wrote it), not ITERABLE: it runs the last run's failed items")
            func = args[0] if args else None  # (a comment alone gives no FUNC: the last run's, as with none)
        from .postmortem import rerun_failed

        recorded = debugging.last_run_ref()
        try:
            with _magic_errors(parser):
                return rerun_failed(func, namespace=self._user_ns, **options)
        finally:
            if func is not None:  # (the re-run's record: FUNC given here is how it names the function now)
                self._name_func(recorded, rest, local_ns)

    def _name_func(self, recorded: Callable[[], Any], rest: str, local_ns: dict[str, Any] | None) -> None:
        """Keep FUNC as this line wrote it with the run the line recorded (``recorded``: the
        record before it ran, weakly: ``debugging.last_run_ref``), for ``--rerun-failed`` to look it up again, as written, among
        the notebook's names: so only when it was evaluated there, not among a function's
        locals (a ``%pmap`` line in a ``def``), which a later cell does not see."""
        if local_ns is None or local_ns is self._user_ns:
            debugging.name_func(recorded(), _func_text(rest))

    def _pmap_bg(self, parser: _Parser, opts: argparse.Namespace, args: tuple) -> Any:
        """``%pmap --bg``: the run's handle at once; its live area shows in this cell."""
        __tracebackhide__ = True
        with _magic_errors(parser):
            from . import background

            background.check_options(compare=opts.compare, scaling=opts.scaling)
            kw = config.run_kwargs(opts)
            run = api.pmap(args[0], *args[1:], workers=opts.workers, chunksize=opts.chunksize, star=opts.star,
                           errors=opts.errors, timeout=opts.timeout, retries=opts.retries, seed=opts.seed,
                           insights=kw.get("insights", False), checkpoint=kw.get("checkpoint", False), block=False,
                           show_report=not opts.quiet)  # (in the run's live area once it ended)
        _now(_BG_STARTED.format(magic="%pmap"), ("run", run))
        return run

    def _parallel_bg(self, parser: _Parser, opts: argparse.Namespace, cell: str,
                     gather: tuple[str, ...]) -> Any:
        """``%%parallel --bg``: the run's handle (also stored in ``-o NAME``).

        ``--gather`` names come back as ``parallel(gather=, block=False)`` brings
        them: in ``h.result().gathered``, not as notebook variables (a run that
        ends while another cell runs would change that cell's names under it)."""
        __tracebackhide__ = True
        if opts.reduce is not None:  # (given empty too: nothing is dropped unsaid; reduce= needs block=True too)
            raise parser.usage_error("--bg cannot be combined with --reduce: reduce the handle's result() (the list "
                                     "of the ranks' values) once it is done, e.g. sum(h.result())")
        with _magic_errors(parser):
            from . import background

            background.check_options(compare=opts.compare, scaling=opts.scaling)
            kw = config.run_kwargs(opts)
            run = api.parallel(cell, workers=opts.workers, namespace=self._user_ns, timeout=opts.timeout, gather=gather,
                               label_output=not opts.no_label, insights=kw.get("insights", False),
                               checkpoint=kw.get("checkpoint", False), seed=opts.seed, keep=opts.keep,
                               reset=opts.reset, block=False, show_report=not opts.quiet)
        _now(_BG_STARTED.format(magic="%%parallel"), ("run", run))
        if opts.output:
            self._user_ns[opts.output] = run
        return run

    # The line is taken as written: --reduce's text is Python (``lambda v: {n}`` is a
    # set display), which IPython's {expr} / $name expansion rewrote into other code.
    @no_var_expand
    @cell_magic
    @_one_line_interrupts("%%parallel")
    def parallel(self, line: str = "", cell: str = "") -> Any:
        __tracebackhide__ = True
        parser = _parallel_parser()
        # The whole line is options: shell words as %pool splits them, so a quoted
        # value keeps its spaces (--reduce 'lambda v: sorted(v)'), and a # starts a comment.
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # shlex: an unclosed quote
            raise parser.usage_error(str(exc)) from None
        tokens = _options_ended(parser, tokens)
        opts, extra = parser.parse_known_args(tokens)
        if extra:
            at = tokens.index(extra[0])
            unquoted = at >= 2 and tokens[at - 2] in ("--reduce", "--gather")  # --reduce lambda v: max(v)
            hint = f"; quote a value with spaces: {tokens[at - 2]} '{tokens[at - 1]} {extra[0]} ...'" if unquoted else ""
            raise parser.usage_error(parser.unknown(extra[0]) + hint)
        if opts.help:
            return _show_help(MPMagics.parallel)
        config.apply(opts)  # %config MPMagic defaults for what the line did not say
        # ``is not None``: -o '' and --reduce '' were taken as not given, and stored or reduced nothing unsaid
        if opts.output is not None:  # a name as Python reads it (NFKC: ``ℌ`` is ``H``), or later cells could not see it
            opts.output = unicodedata.normalize("NFKC", opts.output)
            if not api.is_variable_name(opts.output):
                raise parser.usage_error(f"-o needs a variable name, not {opts.output!r}")
        gather: tuple[str, ...] = ()
        if opts.gather is not None:
            with _magic_errors(parser):  # (one reading of the names for --gather and the API's gather=)
                gather = api.variable_names(opts.gather, "--gather")
        # (the gathered lists were overwritten by -o's values without a word; with --bg, -o
        # stores the handle and the lists stay in its result().gathered: no clash)
        if opts.output in gather and not opts.bg:
            raise parser.usage_error(f"-o {opts.output} and --gather {opts.gather} would both store "
                                     f"{opts.output}: give -o another name")
        _check_plain_python(parser, cell, self.shell)
        if opts.bg:
            return self._parallel_bg(parser, opts, cell, gather)
        if opts.scaling and (opts.keep or opts.reset):
            raise parser.usage_error("--scaling runs the cell at several sizes, each afresh: it cannot keep "
                                     "ranks (--keep/--reset)")
        if opts.scaling:
            _check_scaling_line(parser, _parallel_parser.__wrapped__, tokens)
            with _magic_errors(parser):
                return scaling.parallel_scaling(cell, self._user_ns, max_workers=opts.workers, timeout=opts.timeout,
                                                seed=opts.seed, label_output=not opts.no_label)
        reducer = None
        if opts.reduce is not None:
            if not opts.reduce.strip():  # (eval's "invalid syntax (<string>, line 0)" said less)
                raise parser.usage_error(f"--reduce needs a function such as sum, not {opts.reduce!r}")
            try:
                reducer = eval(opts.reduce, self._user_ns)
            except Exception as exc:
                raise parser.usage_error(f"--reduce {opts.reduce!r}: {type(exc).__name__}: {exc}") from None
            if not callable(reducer):
                raise parser.usage_error(f"--reduce needs a function such as sum, not {opts.reduce!r}")
        before = api.last_report()
        try:
            with _magic_errors(parser, _compare_finished(opts.compare, before)):
                values = api.parallel(
                    cell,
                    workers=opts.workers,
                    namespace=self._user_ns,
                    compare=opts.compare,
                    timeout=opts.timeout,
                    gather=gather,
                    label_output=not opts.no_label,
                    seed=opts.seed,
                    keep=opts.keep,
                    reset=opts.reset,
                    **config.run_kwargs(opts),
                )
            _finished("%%parallel", "values", "the ranks' values are", values)
            for name, per_rank in values.gathered.items():
                self._user_ns[name] = per_rank
            if opts.output:
                self._user_ns[opts.output] = values
            # Reduced before the report shows: --compare's verdict (results equal) is of the reduced value.
            reduced = _reduced(parser, opts, reducer, values, cell) if reducer is not None else None
        finally:
            _show_report(opts, api.last_report(), before, self.shell)
        if reducer is not None:
            return None if _without_final_semicolon(cell)[1] else reduced
        if not api.cell_has_value(cell) or all(v is None for v in values):
            return None  # like a cell ending in print(): nothing to show
        if _without_final_semicolon(cell)[1]:
            return None  # a cell ending in `rank * 10;` shows nothing, as a plain cell does (-o keeps them)
        return values

    @line_cell_magic
    @_one_line_interrupts("%pool")
    def pool(self, line: str = "", cell: str | None = None) -> Any:
        __tracebackhide__ = True
        if cell is not None:
            _now(_POOL_BEFORE.format(magic="%%pool"))
        else:
            _now(_POOL_BEFORE.format(magic="%pool"))
        parser = _pool_parser()
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # shlex: an unclosed quote
            raise parser.usage_error(str(exc)) from None
        opts = parser.parse_args(tokens)
        if opts.help:
            return _show_help(MPMagics.pool)
        if opts.action not in _POOL_ACTIONS:
            raise parser.usage_error(_unknown_pool_action(opts.action))
        if cell is not None and opts.action != "setup":
            raise parser.usage_error("only %%pool setup takes a cell (the code every worker runs at start)")
        _check_pool_line(parser, opts, tokens)
        _now(_POOL_DURING.get(opts.action, _POOL_DURING_ANY).format(
            magic="%%pool" if cell is not None else "%pool", action=opts.action,
            clear=" clear" if opts.target == "clear" else ""))
        try:
            if opts.action == "setup":
                return _pool_setup(opts.target, cell, self.shell)
            return self._pool(opts)
        except (RunsInFlight, SetupRefused) as exc:  # not a mistake in the line: no usage line under it
            raise IPythonUsageError(str(exc)) from None
        except UsageError as exc:  # (a size refused as the line gave it: -n 1000, or resize 1000)
            given = "resize" if opts.action == "resize" and opts.target and not opts.workers else "-n"
            raise parser.usage_error(size_said_as(exc, given)) from None
        except KeyboardInterrupt as exc:
            if opts.action not in ("start", "restart", "resize", "local", "dask") or hasattr(exc, "_render_traceback_"):
                raise  # (one line already: what the interrupted start or stop finished first)
            # (a bare KeyboardInterrupt from a Condition.wait deep in the start)
            raise _interrupted("%pool", f"%pool {opts.action} interrupted while it waited for the workers; "
                               "they go on starting, and %pool shows their state") from None

    def _pool(self, opts: argparse.Namespace) -> Any:
        action = opts.action
        if opts.gpus is not None and getattr(pool.current_pool(), "name", "local") != "local":
            raise UsageError("--gpus is for the local pool (%pool local first); Dask workers pick their own devices")
        current = pool.current_pool()
        if action in ("start", "restart") and (current is None or current.name == "local"):
            # What %config changed and no run applied yet goes with this start or restart
            # (the status it shows said the old start method, and the next run restarted again).
            workers, method = config.current().take_pool_settings()
            opts.workers, opts.start_method = opts.workers or workers, opts.start_method or method
        if action == "start":
            with pool.said_as("%pool start"):
                pool.start_pool(opts.workers, opts.start_method, opts.max_tasks_per_child, wait=True,
                                max_memory=opts.max_memory, gpus=opts.gpus)
        elif action == "stop":
            with pool.said_as("%pool stop"):
                pool.stop_pool()
        elif action == "restart":
            with pool.said_as("%pool restart"):
                pool.restart_with(opts.workers, opts.start_method, opts.max_tasks_per_child, opts.max_memory)
        elif action == "resize":
            if opts.workers and opts.target:
                raise UsageError(f"resize takes N or -n N, not both: %pool resize {opts.target}")
            try:
                n = opts.workers or (_pool_size_int(opts.target) if opts.target else None)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"resize N: {exc}; for example %pool resize 4") from None
            if not n:
                raise UsageError("resize needs a number of workers: %pool resize 4")
            pool.get_pool().resize(n)
        elif action == "local":
            before = pool.current_pool()
            size_before = before.workers if before is not None else None
            # The %config MPMagic settings for what the line did not say: leaving Dask
            # made the local pool at the defaults (2 workers, forkserver), not the settings'.
            settings = config.current()
            with pool.said_as("%pool local"):
                now = pool.use_local(opts.workers or settings.workers, opts.start_method or settings.start_method,
                                     opts.max_tasks_per_child, max_memory=opts.max_memory)
            status = pool.pool_status()
            status.notice = _switched(before, now, size_before)
            return status
        elif action == "dask":
            kwargs = {k: v for k, v in vars(opts).items()
                      if k in ("workers", "scheduler_file", "tls_ca_file", "tls_cert", "tls_key", "timeout") and v is not None}
            before = pool.current_pool()
            size_before = before.workers if before is not None and before.name == "dask" and before.running else None
            with pool.said_as("%pool dask"):
                now = pool.use_dask(opts.target, **kwargs)
            status = pool.pool_status()
            if now is before:
                status.notice = _kept_dask(now, size_before)
            return status
        elif action == "runs":
            from . import background

            return background.runs()
        elif action == "cancel":
            from . import background

            if not opts.target:
                raise UsageError("cancel needs a run's ID: for example %pool cancel 3 (%pool runs lists them)")
            if not opts.target.isdigit() or int(opts.target) == 0:  # (IDs count from 1: 0 is none of them)
                raise UsageError(f"cancel needs a run's ID (a whole number from 1), not {opts.target!r}: "
                                 "for example %pool cancel 3 (%pool runs lists them)")
            run = background.get_run(int(opts.target))
            ended = run.done()  # (cancel() is True again for a run cancelled already, as a Future's)
            stopped = run.cancel() and not ended
            return run if stopped else f"run {run.id} had already ended ({run.state}); nothing to cancel"
        elif action == "checkpoints":
            from . import checkpoint

            return checkpoint.manage(opts.target, opts.name)
        return pool.pool_status()


# What each %pool subcommand takes beyond its name: its options (argparse
# dests) and its words (``target``, ``name``). Anything else is a usage error
# naming it: an option a subcommand silently ignored (``%pool restart -n 3``
# keeping 2 workers) reads as one that worked.
_POOL_OPTIONS = {
    "start": ("workers", "start_method", "max_tasks_per_child", "max_memory", "gpus"),
    "restart": ("workers", "start_method", "max_tasks_per_child", "max_memory"),
    "resize": ("workers",),
    "local": ("workers", "start_method", "max_tasks_per_child", "max_memory"),
    "dask": ("workers", "scheduler_file", "tls_ca_file", "tls_cert", "tls_key", "timeout"),
}
_POOL_WORDS = {"resize": ("N",), "dask": ("ADDRESS",), "cancel": ("ID",), "setup": ("clear",),
               "checkpoints": ("clear", "NAME")}


def _check_pool_line(parser: _Parser, opts: argparse.Namespace, tokens: list[str]) -> None:
    """A usage error for an option or a word ``opts.action`` does not take (see ``_POOL_OPTIONS``)."""
    action = opts.action
    # The options written on the line (not those left at their default: --timeout has one),
    # as argparse read them: -n2 and -n 2 alike (matching words missed a value attached).
    given = _given_options(_pool_parser.__wrapped__, tokens)
    written = [a for a in parser._actions if a.option_strings and a.dest in given]  # noqa: SLF001
    for option in written:
        if option.dest not in _POOL_OPTIONS.get(action, ()):
            takers = [a for a, dests in _POOL_OPTIONS.items() if option.dest in dests]
            where = ", ".join(takers[:-1]) + " and " + takers[-1] if len(takers) > 1 else takers[0]
            hint = ": %pool start --gpus 0,1" if option.dest == "gpus" else ""
            raise parser.usage_error(f"{'/'.join(option.option_strings)} goes with {where}, not {action}{hint}")
    takes = _POOL_WORDS.get(action, ())
    words = [w for w in (opts.target, opts.name) if w is not None]
    if len(words) > len(takes):
        raise parser.usage_error(f"unexpected argument {words[len(takes)]!r}: "
                                 f"%pool {action} takes {' '.join(takes) or 'none'}")


def _has_no_code(cell: str) -> bool:
    """Is ``cell`` only blank lines and comments (a setup that would run nothing,
    installed in place of the one before)? A cell that does not parse has code:
    its syntax error is said where the code is run."""
    try:
        return not astlock.parse(cell).body
    except (SyntaxError, ValueError):
        return False


# What to write instead of IPython syntax in plain Python (a rank, a worker setup), by
# the call IPython turns it into; {pmap}: what a rank may call instead of a %pmap.
_IPYTHON_SYNTAX = {
    "run_line_magic": ("a magic", "call the function instead{pmap}"),
    "run_cell_magic": ("a cell magic", "put the code itself in the cell"),
    "system": ("a shell command", "use subprocess.run([...]) there"),
    "getoutput": ("a shell command", "use subprocess.run([...], capture_output=True, text=True).stdout there"),
}


def _ipython_syntax(cell: str, shell: Any) -> tuple[int, str, str, str] | None:
    """The first line of ``cell`` that is Python only after IPython's transforms:
    (its number in the notebook cell, its text, what it is, what to write instead), or None.

    IPython's own transformer finds them: the transformed cell calls
    ``get_ipython().<method>`` on the same line. None also when the cell is
    Python, or not valid IPython either (a plain syntax error).
    """
    try:
        astlock.parse(cell)
        return None
    except SyntaxError:
        pass
    transformer = getattr(shell, "input_transformer_manager", None)
    if transformer is None:
        return None
    try:
        tree = astlock.parse(transformer.transform_cell(cell))
    except (SyntaxError, ValueError):  # not valid IPython either
        return None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _IPYTHON_SYNTAX and isinstance(node.func.value, ast.Call)
                and getattr(node.func.value.func, "id", None) == "get_ipython"):
            what, instead = _IPYTHON_SYNTAX[node.func.attr]
            lines = cell.splitlines()
            text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
            return _cell_lineno(cell, node.lineno), text, what, instead
    return None


def _cell_lineno(cell: str, lineno: int) -> int:
    """Line ``lineno`` of a cell magic's body, numbered as IPython numbers the
    cell (the ``%%`` line is line 1), as the ranks' tracebacks are."""
    return lineno + _lines_above(cell)


def _lines_above(cell: str) -> int:
    """The lines of the running notebook cell above the cell magic's body ``cell``:
    its ``%%`` line (or lines, ``%%time`` above it) and blank lines before them."""
    origin = cell_origin(cell)
    return origin.offset if origin is not None else 1


def _check_plain_python(parser: _Parser, cell: str, shell: Any) -> None:
    """A usage error naming the line when the cell is Python only after IPython's transforms.

    Ranks compile the cell as Python, so ``x = %pmap f, xs`` or ``!hostname``
    there is a syntax error; saying "invalid syntax" hides why. Any other
    syntax error is left to the run, which reports it.
    """
    found = _ipython_syntax(cell, shell)
    if found is not None:
        lineno, text, what, instead = found
        instead = instead.format(pmap=" (mpmagic.pmap(f, xs) works there, serially in that rank)")
        raise parser.usage_error(f"line {lineno} of the cell ({text!r}) is IPython syntax ({what}); "
                                 f"a rank runs plain Python: {instead}")


#: What a Report shows itself as (``_repr_pretty_``, ``_repr_html_``).
_REPORT_FORMATS = ("text/plain", "text/html")


def _report_formats(report: api.Report, shell: Any = None) -> tuple[str, ...]:
    """The MIME types the report is shown in: its own two, and each other one
    whose formatter the user gave a function for the Report type
    (``formatters['text/markdown'].for_type(Report, ...)``, or ``for_type_by_name``),
    as ``display(report)`` asks every formatter. Only those two were asked, so
    such a formatter was never used.

    Asking every formatter cost ~30 us a %pmap, and so did reading each one's
    printers (traitlets attributes): the formatters' printer dicts are kept
    (``for_type`` adds to them in place) while the shell's formatters are the
    same objects, and looked in at each call (~1.5 us)."""
    global _printers
    if shell is None:
        from IPython.core.getipython import get_ipython

        shell = get_ipython()
        if shell is None:
            return _REPORT_FORMATS
    formatters = shell.display_formatter.formatters
    kept_for, kept = _printers
    if kept_for is None or kept_for[0] is not formatters or kept_for[1] != tuple(formatters.values()):
        kept = tuple((mime, f.type_printers, f.deferred_printers) for mime, f in formatters.items()
                     if mime not in _REPORT_FORMATS and hasattr(f, "type_printers"))
        _printers = ((formatters, tuple(formatters.values())), kept)
    cls = type(report)  # (a Report's only base is object: a formatter for every object is not one for ours)
    name = (cls.__module__, cls.__name__)
    extra = [mime for mime, types_, deferred in kept if cls in types_ or name in deferred]
    return (*_REPORT_FORMATS, *extra) if extra else _REPORT_FORMATS


# The shell's formatters (the dict, and its formatters) and, for each but the
# Report's own two, (MIME type, its type printers, its deferred printers).
_printers: tuple[tuple | None, tuple] = (None, ())


def _show_report(opts: argparse.Namespace, report: api.Report | None, before: api.Report | None,
                 shell: Any = None) -> None:
    """This run's report (never an older one); with -q, which hides the timing
    report, only what --insights recorded (its table and timeline), as asked.
    ``shell``: the magic's (None: the current one, if any)."""
    if report is None or report is before:
        return
    if not opts.quiet:
        # (the two formats a Report has, and those the user registered for it: IPython's other
        # formatters each looked it up in vain; both formats read the line and the advice, worked out once)
        with report.shown_once():
            display(report, include=_report_formats(report, shell))
    elif report.insights is not None:
        display(report.insights)


def _reduced(parser: _Parser, opts: argparse.Namespace, reducer: Callable, values: Any, cell: str) -> Any:
    """``--reduce FUNC`` applied to the ranks' values (``api.reduce_values``, as ``parallel(reduce=)``);
    the values are in ``-o NAME`` when given (stored before reducing) and always in the error's ``.values``."""
    __tracebackhide__ = True
    kept = (f"in {opts.output} (-o)" if opts.output else
            "in this error's .values (sys.last_value.values in the next cell; -o NAME keeps them in NAME)")
    return api.reduce_values(reducer, values, cell, f"--reduce {opts.reduce}", kept)


def _pool_setup(target: str | None, cell: str | None, shell: Any = None) -> Any:
    """``%%pool setup`` (set it, run it in every worker), ``%pool setup`` (show), ``%pool setup clear``."""
    from . import setup_api, worker_setup

    if target not in (None, "clear"):
        raise UsageError(f"setup takes nothing or 'clear', not {target!r}: %pool setup clear")
    if target == "clear":
        if cell is not None:
            raise UsageError("%%pool setup clear takes no cell: run %pool setup clear on its own")
        setup_api.clear()  # (prints that it was removed, and what running workers keep)
        return None
    if cell is None:
        print(worker_setup.describe())
        return None
    if _has_no_code(cell):  # (a cell with nothing under the line never gets here: IPython refuses it)
        raise UsageError("%%pool setup needs code in the cell: it has only comments or blank lines "
                         "(or %pool setup clear to remove the setup)")
    try:
        # (refused while runs are in flight: their workers would switch setups; a failure's
        # line is counted from the %%pool setup line, as a syntax error's is)
        errors = setup_api.set_code(cell, _lines_above(cell))
    except SyntaxError as exc:
        found = _ipython_syntax(cell, shell)  # (as %%parallel says it: the workers run plain Python)
        if found is not None:
            lineno, text, what, instead = found
            raise UsageError(f"line {lineno} of the cell ({text!r}) is IPython syntax ({what}); "
                             f"the setup runs plain Python in every worker: {instead.format(pmap='')}") from None
        where = f" on line {_cell_lineno(cell, exc.lineno)}" if exc.lineno else ""  # (the %%pool line is line 1)
        hint = ("; the setup runs as plain Python in every worker, without IPython's top-level await: put the "
                "awaits in an async def and run it with asyncio.run(main())") if "'await' outside" in exc.msg else ""
        raise UsageError(f"the setup cell has a syntax error{where}: {exc.msg}{hint}") from None
    if errors:
        more = f" (and on {len(errors) - 1} more worker{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise MPMagicError(errors[0] + more + _notebook_name_hint(errors[0], shell))
    return None


def _notebook_name_hint(error: str, shell: Any) -> str:
    """The line to add to a setup failure that is a ``NameError`` for a notebook variable:
    a ``%%parallel`` cell gets the notebook's names, a setup cell does not (it runs
    again, alone, in every worker started later), and a bare ``NameError`` for a name
    the notebook plainly has did not say why."""
    import re

    found = re.search(r"NameError: name '(\w+)' is not defined", error)
    ns = getattr(shell, "user_ns", None)
    if found is None or not isinstance(ns, dict) or found.group(1) not in ns:
        return ""
    name = found.group(1)
    return (f"\nmpmagic: {name} is a notebook variable: a %%pool setup cell runs in the workers without the "
            "notebook's names (it runs again, on its own, in every worker started later); define it in the setup "
            f"cell, or pass its value to a setup function: mpmagic.on_worker_start(functools.partial(init, {name}))")


def _switched(before: Any, now: Any, size_before: int | None = None) -> str:
    """What ``%pool local`` did, in one line: the backend it stopped, the workers it added
    or stopped (``-n`` on the running local pool, ``size_before`` its size before), or that
    nothing changed."""
    if before is now:
        if size_before is not None and now.workers != size_before:
            what = "stopped" if now.workers < size_before else "started"
            return (f"%pool local: already on local worker processes; resized from {size_before} to "
                    f"{now.workers} workers ({what} {abs(now.workers - size_before)})")
        return "%pool local: already on local worker processes; nothing was stopped"
    if before is None:
        return "%pool local: started local worker processes"
    if getattr(before, "name", None) == "dask":
        # The cluster mpmagic starts has no address given: its scheduler's
        # (``scheduler_address``, kept after the stop) is the one to show.
        where = (getattr(before, "address", None) or getattr(before, "scheduler_address", None)
                 or getattr(before, "scheduler_file", None))
        if getattr(before, "owns_cluster", False):
            what = "stopped the local Dask cluster mpmagic had started" + (f" ({where})" if where else "")
        else:
            what = f"disconnected from the Dask scheduler at {where or 'an unknown address'} (its workers keep running)"
        return f"%pool local: {what}; now on local worker processes"
    return (
        f"%pool local: stopped the previous local workers ({getattr(before, 'start_method', '?')}) "
        "and started new ones with the settings given"
    )


def _kept_dask(now: Any, size_before: int | None) -> str:
    """What ``%pool dask`` did when it kept the Dask pool it was on (``use_dask``'s
    ``kept_for``: the same cluster asked for again), in one line: a cell run twice
    must not leave the user wondering whether their cluster, its workers' state and
    the runs in flight were thrown away. ``size_before``: its workers before, if running."""
    if not now.owns_cluster:
        where = f"the Dask scheduler at {now.address}" if now.address else now.where
        return f"%pool dask: already connected to {where}; kept the connection (nothing was stopped)"
    where = f" ({now.scheduler_address})" if now.scheduler_address else ""
    workers = f"{now.workers} {noun('workers', now.workers)}"
    if size_before is None:
        return f"%pool dask: started mpmagic's local Dask cluster again{where} with {workers}"
    head = f"%pool dask: already on the local Dask cluster mpmagic started{where}"
    if now.workers != size_before:
        what = "stopped" if now.workers < size_before else "started"
        return f"{head}; resized from {size_before} to {workers} ({what} {abs(now.workers - size_before)})"
    return f"{head}; kept it with its {workers} (nothing was restarted)"


def _show_help(magic: Callable) -> None:
    """``--help`` / ``-h``: print the help ``%pmap?`` shows (the magic's docstring); nothing runs."""
    print(magic.__doc__)


def _help(parser: argparse.ArgumentParser) -> str:
    return "\n".join(
        line for line in parser.format_help().splitlines() if not line.startswith("usage:")
    )


MPMagics.pmap.__doc__ = f"""Parallel map() of a notebook function on the managed worker pool.

Usage::

  %pmap [options] FUNC, ITERABLE [, ITERABLE ...]

Everything after the options is exactly the argument list of Python's map(),
evaluated in the notebook. The results come back as a list in input order,
followed by one line of timing against serial ("estimated" from the workers'
task times, or "measured" with --compare).

Examples::

  %pmap work, range(8)
  squares = %pmap lambda x: x * x, range(10)
  %pmap pow, range(10), [2] * 10             # several iterables, as map() takes
  %pmap --star compute_range, [(1, 250001), (250001, 500001)]
  %pmap -n 4 --compare work, [3_000_000] * 8
  res = %pmap --errors collect risky, items  # failures stay in place as Failed
  run = %pmap --bg work, range(100)         # at once: run.result() later

With --bg the map runs in the background and the magic returns its handle
(``done()``, ``result()``, ``cancel()``, ``report()``); this cell shows its
progress, output and report as they come while other cells run. The
kernel's interrupt stops the foreground cell only: background runs go on
(``%pool cancel ID`` or ``run.cancel()`` stops one).
{_help(_pmap_parser())}
"""

MPMagics.parallel.__doc__ = f"""Run the cell in N worker processes at once (SPMD, like MPI).

Usage::

  %%parallel [options]

Each copy sees ``rank`` (0..size-1), ``size`` and the notebook names the cell
uses. The last expression's value of every rank comes back as a list in rank
order; what each rank prints is shown labelled ``[rank N]``.

Example::

  %%parallel -n 4 --compare
  N = 10_000_000
  lo, hi = rank * N // size, (rank + 1) * N // size
  sum(x * x for x in range(lo, hi))

With --bg the cell runs in the background: its value is a run handle whose
``result()`` is the list of values; the kernel's interrupt does not stop it.
With --bg --gather the gathered lists are ``h.result().gathered`` (a dict:
name to its per-rank list), not notebook variables, as with
``mpmagic.parallel(code, gather=..., block=False)``.

The line is taken as written: IPython's ``$name`` / ``{{expr}}`` expansion is
off for it (--reduce's text is Python), so write values themselves
(``-n 4``) or call ``mpmagic.parallel(code, workers=n)`` with a variable.
{_help(_parallel_parser())}
"""

MPMagics.pool.__doc__ = f"""Show and manage the worker pool.

Usage::

  %pool                         status: backend, workers, pids, memory, tasks
  %pool start -n 4 --start-method spawn
  %pool stop | restart | resize 4
  %pool dask                    a local Dask cluster
  %pool dask tcp://host:8786    a running Dask scheduler
  %pool local                   back to processes on this machine
  %pool checkpoints             stored runs of --checkpoint (function, items, size, last used)
  %pool checkpoints clear [NAME]  delete them (only NAME's)
  %pool runs                    background runs in flight and recently finished
  %pool cancel ID               stop background run ID
  %%pool setup                  (a cell) code every worker runs once at start, also workers
                                started later; its names are globals of mapped functions
  %pool setup | setup clear     show the setup | remove it
  %pool start --gpus 0,1        CUDA_VISIBLE_DEVICES=0, 1, 0, ... for the workers
{_help(_pool_parser())}
"""
