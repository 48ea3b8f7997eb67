"""Settings written out: TOML files (the one writer, tomli-w) and docs/CONFIG.md.

Why apart from security.settings: `edge-agent run` loads settings but never writes them;
this module (and tomli-w) stays out of its memory. `python -m security.settings_render
agent.config coordinator.config ledger.audit_config` prints docs/CONFIG.md (`make config-doc`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .settings import PRECEDENCE, Face

# -- writing TOML (the one writer) ----------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_toml(data: Mapping[str, Any], *, header: str = "", notes: Mapping[str, str] | None = None) -> str:
    """TOML text via tomli-w; `notes` ({"broker.acl_mode": "..."}) become comments above their keys."""
    import tomli_w  # lazily: only the commands that write TOML load it

    text = tomli_w.dumps(_plain(data))
    lines: list[str] = [f"# {line}" if line else "#" for line in header.splitlines()]
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        elif " = " in line and notes:
            note = notes.get(section + line.split(" = ", 1)[0].strip())
            if note:
                lines.append(f"# {note}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: Mapping[str, Any], *, header: str = "", notes: Mapping[str, str] | None = None,
               mode: int | None = None) -> Path:
    """Write `data` as TOML atomically (temp file + rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_toml(data, header=header, notes=notes))
    if mode is not None:
        tmp.chmod(mode)
    os.replace(tmp, path)
    return path


def to_toml_data(face: Face, obj: Any, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """A schema instance as nested TOML data (every file-settable key, None left out)."""
    out: dict[str, Any] = {}
    for spec in face.specs():
        if not spec.rule.file or spec.key in skip:
            continue
        value: Any = obj
        for part in spec.key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        head, _, tail = spec.key.rpartition(".")
        (out.setdefault(head, {}) if head else out)[tail] = value
    return out


# -- docs/CONFIG.md -------------------------------------------------------------

MARKDOWN_INTRO = f"""# Configuration

<!-- Generated from the settings declarations (each tool's config module) by
security/settings_render.py; do not edit by hand: run `make config-doc`. tests/security/test_settings.py fails
when this file differs from the generated text. -->

All three tools read their settings with one loader (`security/settings.py`) and one
precedence:

    {PRECEDENCE}

- **TOML file**: flat keys for edge-agent and edge-audit, `[section]` tables for
  edge-coordinator (key `broker.port` is `port` under `[broker]`).
- **Environment**: the tool's prefix plus the key in upper case, dots as underscores
  (`broker.port` -> `EDGE_COORDINATOR_BROKER_PORT`). Lists are comma-separated
  (`a,b`), tables `name=value,name2=value2`, booleans `1/true/yes/on` or `0/false/no/off`.
- **Stored state**: values a running tool keeps for itself, e.g. the agent's sampling
  interval set by the coordinator's `set_interval` command; any TOML, environment or flag
  value for the same key wins over it at the next start.
- **Checks**: every value is type- and range-checked when it is read. A bad value, an
  unknown TOML key or an unknown environment variable under the tool's prefix stops the
  tool with one line naming the key, file, variable or flag, and the fix.
"""


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "(unset)"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list):
        return "`[" + ", ".join(f'"{v}"' for v in value) + "]`" if value else "`[]`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f'"{k}" = "{v}"' for k, v in value.items()) + "}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value}`"


def render_markdown(faces: Sequence[Face]) -> str:
    """docs/CONFIG.md: every key, its environment variable, type, default and range."""
    out = [MARKDOWN_INTRO]
    for face in faces:
        out.append(f"## {face.tool}\n")
        out.append(f"File: {face.file}. Environment prefix: `{face.env_prefix}`.\n")
        if face.notes:
            out.append(face.notes.strip() + "\n")
        out.append("| key | environment variable | flag | type | default | range | meaning |")
        out.append("|---|---|---|---|---|---|---|")
        for spec in face.specs():
            rule = spec.rule
            key = f"`{spec.key}`" if rule.file else f"`{spec.key}` (not in the file)"
            env = f"`{spec.env}`" if rule.env else "-"
            flag = f"`{face.flags[spec.key]}`" if spec.key in face.flags else "-"
            kind = spec.kind_name + (f" ({rule.unit})" if rule.unit else "")
            help_text = rule.help.replace("|", "\\|")
            out.append(f"| {key} | {env} | {flag} | {kind} | {_cell(spec.default)} | {rule.describe() or '-'} | {help_text} |")
        if face.other_env:
            out.append("\nOther environment variables under the prefix (not settings):\n")
            for name, what in face.other_env.items():
                out.append(f"- `{name}`: {what}")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def faces_from_modules(modules: Sequence[str]) -> list[Face]:
    """The `FACE` of each named config module (named at run time: security imports no tool)."""
    import importlib

    return [importlib.import_module(name).FACE for name in modules]


def main(argv: Sequence[str] | None = None, write: Callable[[str], Any] = sys.stdout.write) -> int:
    """`python -m security.settings_render MODULE...`: print docs/CONFIG.md for these config modules."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m security.settings_render agent.config coordinator.config ledger.audit_config", file=sys.stderr)
        return 2
    write(render_markdown(faces_from_modules(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
