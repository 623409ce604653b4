"""Add the pandas accessor (``df.mp``) the moment pandas is imported, not before.

mpmagic never imports pandas itself (about 0.3 s, and every worker imports
this package). If pandas is already imported, the accessor is registered at
once. If not, a finder on ``sys.meta_path`` waits for ``import pandas``: it
lets the normal machinery find pandas, and once pandas' module has run, it
registers the accessor. So one notebook cell can ``import pandas`` and use
``df.mp`` on its next line. The finder removes itself after that one import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("mpmagic")


def _register() -> None:
    made = sys.modules.get(f"{__package__}.pandas_accessor")
    if made is not None and getattr(made.__spec__, "_initializing", False):  # (as importlib tells it)
        # pandas was imported by that module itself (``import mpmagic``, then ``from
        # mpmagic.pandas_accessor import ...``, or a worker unpickling one of its
        # functions), which is half made: it registers at its end.
        setattr(made, "register_when_made", True)  # noqa: B010 (a name the module reads at its end)
        return
    try:
        from . import pandas_accessor

        pandas_accessor.register()
    except Exception:  # a pandas we cannot work with must not break `import pandas`
        log.warning("mpmagic could not add the pandas accessor (df.mp)", exc_info=True)


class _Loader(importlib.abc.Loader):
    """pandas' own loader, then the registration."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()


class _PandasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "pandas":
            return None
        uninstall()  # one import only; and find_spec below must not find us again
        spec = importlib.util.find_spec("pandas")
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


_finder = _PandasFinder()


def install() -> None:
    """Register the accessor now if pandas is imported, else when it is."""
    if "pandas" in sys.modules:
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Stop waiting for pandas (``%unload_ext``)."""
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
