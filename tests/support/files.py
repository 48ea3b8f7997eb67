"""Making a file unwritable even for root, for tests of write-failure handling.

Why chattr: the tests run as root, which ignores file modes; only the immutable
attribute (or a read-only mount) refuses root's writes. Where chattr is missing or the
file system does not support it, `immutable()` yields False and the caller skips or
falls back.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def immutable(path: Path) -> Iterator[bool]:
    """`chattr +i path` for the block (True), always undone; False when it cannot be set."""
    chattr = shutil.which("chattr")
    if chattr is None:
        yield False
        return
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0
    try:
        yield done
    finally:
        if done:
            subprocess.run([chattr, "-i", str(path)], check=True, capture_output=True)
