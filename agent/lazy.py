"""Defer stdlib modules that third-party packages import at module level but the agent never uses.

Why: paho-mqtt imports `urllib.request` (which pulls http.client, the email package's parser,
tempfile, mimetypes, ...) only for its optional PySocks proxy support, and importlib.metadata
imports `csv` only for reading RECORD files. (`zipfile`, which importlib.metadata imports too,
is used at import time by the stack, so deferring it saves nothing.) The running agent
calls none of them, yet their code objects and module dicts stay in its heap for its whole
life (measured in docs/BENCHMARKS.md, agent section).

How: `defer(name)` puts a placeholder module in sys.modules whose `__spec__` is the real spec,
so `import name` statements elsewhere succeed without running the module; the first access
to any other attribute executes the real module in that same module object (the one every
importer holds). Nothing of the third-party packages is changed: if a future version uses
one of these modules at import time, the module just loads then (the saving is lost, nothing
breaks). `importlib.util.LazyLoader` is not enough on Python 3.11: the `import` statement of
the next importer reads `__spec__`, which makes LazyLoader load the module at once.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types

# Modules imported at module level by paho-mqtt / importlib.metadata but used only inside
# functions the agent never calls (PySocks proxy lookup; reading RECORD files).
AGENT_DEFERRED = ("urllib.request", "csv")


class _Deferred(types.ModuleType):
    """Placeholder whose first missing-attribute lookup runs the real module in place."""

    def __getattr__(self, attr: str) -> object:
        spec = self.__dict__["__spec__"]
        lock = self.__dict__["_deferred_lock"]
        with lock:
            if type(self) is _Deferred:  # not yet executed (another thread may have done it)
                del self.__dict__["_deferred_lock"]
                self.__class__ = types.ModuleType
                try:
                    spec.loader.exec_module(self)
                except BaseException:
                    sys.modules.pop(spec.name, None)  # a later import retries from scratch
                    raise
        return getattr(self, attr)


def defer(name: str) -> bool:
    """Install a placeholder for `name` unless it is already imported; True if installed."""
    if name in sys.modules:
        return False
    parent, _, child = name.rpartition(".")
    if parent:
        importlib.import_module(parent)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _Deferred
    module.__dict__["_deferred_lock"] = threading.RLock()
    sys.modules[name] = module
    if parent:
        setattr(sys.modules[parent], child, module)
    return True


def is_deferred(name: str) -> bool:
    """True while `name` is a placeholder that has not run yet."""
    return type(sys.modules.get(name)) is _Deferred


def defer_unused(names: tuple[str, ...] = AGENT_DEFERRED) -> list[str]:
    """Defer each of `names`; returns those now deferred. Call before importing celery/paho."""
    return [n for n in names if defer(n)]
