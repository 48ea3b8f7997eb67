"""The `edge-coordinator` command (placeholder until its issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("edge-coordinator: not yet built", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
