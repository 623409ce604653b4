"""The class of a wait's time-out: ``run.result(timeout=)``, ``run.exception(timeout=)``,
``as_completed(..., timeout=)``.

Code ported from another pool keeps the ``except`` clause it had around such a
wait: ``except TimeoutError`` (the builtin), ``except
concurrent.futures.TimeoutError`` (``Future.result(timeout)``; a class of its
own before Python 3.11) or ``except multiprocessing.TimeoutError``
(``AsyncResult.get(timeout)``, ``IMapIterator.next(timeout)``: not a builtin
``TimeoutError``). One class that derives from all of them is caught by each.
A module of its own: the class is named ``TimeoutError`` (as IPython's one
line and a traceback show it), and here that name shadows the builtin nowhere else.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import multiprocessing

# (3.10: concurrent.futures' own class; from 3.11 it is the builtin, listed once)
_futures_class: type[BaseException] = concurrent.futures.TimeoutError
_FUTURES: tuple[type[BaseException], ...] = () if _futures_class is builtins.TimeoutError else (_futures_class,)


class TimeoutError(*_FUTURES, builtins.TimeoutError, multiprocessing.TimeoutError):  # type: ignore[misc]
    """A wait ran past its ``timeout``; what it waited for goes on. An instance of
    the builtin ``TimeoutError``, of ``concurrent.futures.TimeoutError`` and of
    ``multiprocessing.TimeoutError``, so the ``except`` of a port catches it."""


__all__ = ["TimeoutError"]
