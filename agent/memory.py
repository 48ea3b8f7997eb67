"""Keep the idle agent's resident memory small: fewer malloc arenas, freed pages returned.

Why: a device agent sits idle almost all the time, so what matters is the RSS it keeps
between samples. Two glibc knobs help without changing behaviour:

- `limit_arenas()` caps glibc malloc at 2 arenas (what MALLOC_ARENA_MAX=2 does). By
  default every thread that allocates may get its own arena (up to 8 x cores), each
  keeping freed memory for reuse; the agent's threads (worker, sampler, flusher)
  allocate little and rarely, so sharing arenas costs nothing. It must run before
  those threads start: an env var would be read too late (glibc reads it when the
  process starts), so it is `mallopt(M_ARENA_MAX, 2)` at the top of `edge-agent run`.
- `trim()` is `malloc_trim(0)`: start-up (imports, TLS handshakes, SQLite schema
  reads) leaves freed chunks at the top of the heap and inside arenas; this hands
  the whole free pages back to the kernel. Called when the agent goes idle.

Both are no-ops where glibc is absent (musl, macOS); neither is needed for correctness.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("edge.agent")

M_ARENA_MAX = -8  # glibc <malloc.h>
_libc: Any = None


class _Libc:
    """mallopt/malloc_trim through cffi's backend, already loaded in the agent (billiard
    and cryptography import it): ctypes would add ~0.26 MiB of imports to save ~1 MiB."""

    def __init__(self) -> None:
        import _cffi_backend as ffi  # type: ignore[import-not-found]

        lib = ffi.load_library(None)
        c_int, c_size = ffi.new_primitive_type("int"), ffi.new_primitive_type("size_t")
        self.mallopt = lib.load_function(ffi.new_function_type((c_int, c_int), c_int, False), "mallopt")
        self.malloc_trim = lib.load_function(ffi.new_function_type((c_size,), c_int, False), "malloc_trim")


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = _Libc()
        except (ImportError, OSError, AttributeError, KeyError) as exc:  # no cffi, or not glibc
            log.debug("malloc tuning unavailable: %s", exc)
            _libc = False
    return _libc


def limit_arenas(arenas: int = 2) -> bool:
    """Cap the number of malloc arenas; True when glibc accepted it."""
    lib = _glibc()
    return bool(lib) and lib.mallopt(M_ARENA_MAX, int(arenas)) == 1


def trim() -> bool:
    """Return free heap pages to the kernel; True when some memory was released."""
    lib = _glibc()
    return bool(lib) and lib.malloc_trim(0) == 1
