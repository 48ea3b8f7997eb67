"""One settings loader for edge-agent, edge-coordinator and edge-audit.

Why one: the three tools used to read TOML and the environment three different ways
(different env conventions, unknown keys refused by one and ignored by another, ranges
checked in some places only). Here every setting is declared once, as a dataclass field
made with `setting(...)` (type, default, range, help), and one loader applies one
precedence to all three:

    command-line flags > environment > TOML file > stored state > defaults

Every value is type- and range-checked as it is read, and a bad one is one line that
names where it came from (the environment variable, the file or the flag) and how to fix
it. Unknown TOML keys and unknown environment variables under a tool's prefix are refused
the same way by all three (a typo must not silently fall back to a default).
`docs/CONFIG.md` is generated from these declarations (`render_markdown`, or
`python -m security.settings agent.config coordinator.config ledger.audit_config`).

Stdlib only: `edge-agent run` imports this module, and its start time and memory must not
grow. The TOML writer (tomli-w) is imported only inside `dump_toml`/`write_toml`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRECEDENCE = "command-line flags > environment > TOML file > stored state > defaults"
DEFAULT = "default"  # origin of a value nobody set


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message is one line with the fix."""


@dataclass(frozen=True)
class Rule:
    """What a setting accepts, beyond its type. Kept in the dataclass field's metadata."""

    help: str
    min: float | None = None  # inclusive lower bound ...
    above: bool = False  # ... or, when True, exclusive (value > min)
    max: float | None = None  # inclusive upper bound
    choices: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()  # a non-empty value must start with one of these
    env: bool = True  # settable from the environment
    file: bool = True  # settable in the TOML file
    non_empty: bool = False  # strings and lists: not empty
    fold_case: bool = False  # strings: compared and kept in upper case (log levels)
    unit: str = ""  # "s" for seconds (docs only)

    def describe(self) -> str:
        """The accepted range in words, as used in messages and in docs/CONFIG.md."""
        parts: list[str] = []
        if self.min == 0 and self.above and self.max is None:
            parts.append("a positive number")
        elif self.min is not None and self.max is not None and not self.above:
            parts.append(f"{_num(self.min)}-{_num(self.max)}")
        else:
            if self.min is not None:
                parts.append(f"> {_num(self.min)}" if self.above else f">= {_num(self.min)}")
            if self.max is not None:
                parts.append(f"<= {_num(self.max)}")
        if self.choices:
            parts.append(" or ".join(repr(c) for c in self.choices))
        if self.prefixes:
            parts.append("empty or " + " / ".join(f"{p}..." for p in self.prefixes))
        if self.non_empty:
            parts.append("not empty")
        return ", ".join(parts)


def _num(value: float) -> str:
    return f"{value:g}"


def setting(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
            **rule: Any) -> Any:
    """A dataclass field that is a setting (see Rule for the keyword arguments)."""
    meta = {"setting": Rule(help=help, **rule)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A dataclass field holding a `[section]` of settings (a nested dataclass)."""
    return dataclasses.field(default_factory=cls, metadata={"section": help})


# -- declarations ---------------------------------------------------------------

_KINDS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "Path": "path",
          "list[str]": "list of strings", "dict[str, str]": "table of strings"}


@dataclass(frozen=True)
class Spec:
    """One declared setting of one tool, flattened (`broker.port`)."""

    key: str
    env: str
    kind: str  # a key of _KINDS
    optional: bool  # None allowed (unset)
    default: Any
    rule: Rule

    @property
    def kind_name(self) -> str:
        return _KINDS[self.kind]


@dataclass(frozen=True)
class Face:
    """One tool's settings: the schema dataclass plus how the tool names things."""

    tool: str  # "edge-agent"
    env_prefix: str  # "EDGE_AGENT_"
    schema: type  # the dataclass whose setting() fields are the settings
    file: str  # where the TOML file is, in words (docs and help)
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)  # key -> "--flag" (docs, messages)
    other_env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # recognised, not settings
    notes: str = ""  # extra paragraph in docs/CONFIG.md

    def specs(self) -> list[Spec]:
        out = list(_walk(self.schema, "", self.env_prefix))
        names = [s.env for s in out] + list(self.other_env)
        if len(set(names)) != len(names):
            raise RuntimeError(f"{self.tool}: two settings share an environment variable name")
        return out

    def spec(self, key: str) -> Spec:
        for s in self.specs():
            if s.key == key:
                return s
        raise KeyError(key)


def _default(f: dataclasses.Field) -> Any:
    """The declared default (not an instance's value: __post_init__ may derive others)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise RuntimeError(f"setting {f.name!r} has no default")


def _walk(schema: type, prefix: str, env_prefix: str) -> Iterator[Spec]:
    for f in dataclasses.fields(schema):
        if "section" in f.metadata:
            yield from _walk(type(_default(f)), f"{prefix}{f.name}.", env_prefix)
            continue
        rule = f.metadata.get("setting")
        if rule is None:
            continue
        kind, optional = _parse_type(str(f.type))
        key = prefix + f.name
        yield Spec(key=key, env=env_prefix + key.replace(".", "_").upper(), kind=kind, optional=optional,
                   default=_default(f), rule=rule)


def _parse_type(text: str) -> tuple[str, bool]:
    parts = [p.strip() for p in text.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) != 1 or parts[0] not in _KINDS:
        raise RuntimeError(f"setting type {text!r} is not supported by security.settings")
    return parts[0], optional


# -- loading --------------------------------------------------------------------

@dataclass
class Resolved:
    """The loaded values (flat, by dotted key) and where each came from."""

    values: dict[str, Any]
    origins: dict[str, str]


def _is_env_name(origin: str) -> bool:
    return bool(origin) and origin[0].isalpha() and origin.isupper() and all(c.isalnum() or c == "_" for c in origin)


def fix_hint(origin: str, key: str) -> str:
    """How to change a value, given where it came from."""
    if origin.startswith("--"):
        return f"change {origin}"
    if _is_env_name(origin):
        return f"change or unset {origin}"
    if origin == DEFAULT:
        return f"set {key}"
    return f"change {key} in {origin}"


def coerce(spec: Spec, value: Any, origin: str) -> Any:
    """Turn a TOML / environment / flag value into the declared type and check its range."""
    if spec.optional and (value is None or value == ""):
        return None  # an empty variable unsets an optional setting
    try:
        out = _convert(spec.kind, value)
        if spec.rule.fold_case and isinstance(out, str):
            out = out.upper()
    except (TypeError, ValueError):
        raise SettingsError(f"{origin}: {spec.key}={value!r} is not a valid {spec.kind}: "
                            f"{fix_hint(origin, spec.key)} to a {spec.kind_name}") from None
    check(spec, out, origin)
    return out


def _convert(kind: str, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        if isinstance(value, str):
            return int(value.strip())
        if not isinstance(value, (int, float)):
            raise TypeError(value)
        return int(value)
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(value)
        if not isinstance(value, (int, float, str)):
            raise TypeError(value)
        return float(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind == "list[str]":
        if isinstance(value, str):  # env: "a,b"
            return [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        return [str(v) for v in value]
    if kind == "dict[str, str]":
        if isinstance(value, str):  # env: "task=rate,task2=rate"
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(value)
            return {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, Mapping):
            raise TypeError(value)
        return {str(k): str(v) for k, v in value.items()}
    if kind == "Path":
        if not isinstance(value, (str, os.PathLike)) or str(value) == "":
            raise ValueError(value)
        return Path(value).expanduser()
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise TypeError(value)
    return str(value)


def check(spec: Spec, value: Any, origin: str) -> None:
    """Range / choice / format check of an already typed value; one-line SettingsError otherwise."""
    rule = spec.rule
    if value is None:
        return
    bad = False
    if spec.kind in ("int", "float"):
        bad = not math.isfinite(value)
        if rule.min is not None:
            bad = bad or (value <= rule.min if rule.above else value < rule.min)
        if rule.max is not None:
            bad = bad or value > rule.max
    if rule.choices and (str(value).upper() if rule.fold_case else value) not in rule.choices:
        bad = True
    if rule.prefixes and value and not str(value).startswith(rule.prefixes):
        bad = True
    if rule.non_empty and not value:
        raise SettingsError(f"{origin}: {spec.key} is empty: {fix_hint(origin, spec.key)} (see docs/CONFIG.md)")
    if bad:
        what = f" ({rule.help})" if rule.choices or rule.prefixes else ""
        raise SettingsError(f"{origin}: {spec.key}={value!r} must be {rule.describe()}{what}: "
                            f"{fix_hint(origin, spec.key)} (see docs/CONFIG.md)")


def load(face: Face, *, file_values: Mapping[str, Any] | None = None, file_origin: str = "",
         env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None,
         stored: Mapping[str, Any] | None = None, stored_origin: str = "stored state") -> Resolved:
    """Apply defaults < stored < TOML < environment < flags (None flags are not given)."""
    env = os.environ if env is None else env
    specs = {s.key: s for s in face.specs()}
    values = {k: s.default for k, s in specs.items()}
    origins = dict.fromkeys(specs, DEFAULT)

    def put(key: str, raw: Any, origin: str) -> None:
        values[key] = coerce(specs[key], raw, origin)
        origins[key] = origin

    for key, raw in (stored or {}).items():
        if raw is not None:
            put(key, raw, stored_origin)
    if file_values:
        for key, raw in _file_items(face, specs, file_values, file_origin):
            put(key, raw, file_origin)
    for key, raw in env_items(face, env):
        put(key, raw, specs[key].env)
    for key, raw in (flags or {}).items():
        if raw is not None:
            put(key, raw, face.flags.get(key, "command line"))
    return Resolved(values, origins)


def _file_items(face: Face, specs: Mapping[str, Spec], data: Mapping[str, Any], origin: str) -> Iterator[tuple[str, Any]]:
    sections = {k.split(".", 1)[0] for k in specs if "." in k}
    for name, value in data.items():
        if name in sections:
            if not isinstance(value, Mapping):
                raise SettingsError(f"{origin}: {name} must be a [{name}] section: fix {origin}")
            for sub, raw in value.items():
                key = f"{name}.{sub}"
                _known_in_file(face, specs, key, origin)
                yield key, raw
        else:
            _known_in_file(face, specs, name, origin)
            yield name, value


def _known_in_file(face: Face, specs: Mapping[str, Spec], key: str, origin: str) -> None:
    if key not in specs or not specs[key].rule.file:
        raise SettingsError(f"{origin}: unknown setting {key!r} for {face.tool}: remove it or fix its name "
                            f"(every setting is listed in docs/CONFIG.md)")


def env_items(face: Face, env: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    """The settings given in the environment; an unknown variable under the prefix is refused."""
    by_env = {s.env: s for s in face.specs()}
    for name in sorted(env):
        if not name.startswith(face.env_prefix) or name in face.other_env:
            continue
        spec = by_env.get(name)
        if spec is None or not spec.rule.env:
            raise SettingsError(f"unknown environment variable {name} for {face.tool}: unset it or fix its name "
                                f"(every {face.env_prefix}* variable is listed in docs/CONFIG.md)")
        yield spec.key, env[name]


def build(schema: type, values: Mapping[str, Any]) -> Any:
    """Construct the schema dataclass (and its sections) from flat, already checked values."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if "section" in f.metadata:
            prefix = f.name + "."
            sub = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
            kwargs[f.name] = build(type(_default(f)), sub)
        elif f.name in values and "setting" in f.metadata:
            kwargs[f.name] = values[f.name]
    return schema(**kwargs)


def stored_value(face: Face, origins: Mapping[str, str], key: str, raw: Any, fallback: Any,
                 origin: str = "stored state") -> Any:
    """The value of `key` once stored state is layered in: stored beats only the default."""
    if raw is None or origins.get(key, DEFAULT) != DEFAULT:
        return fallback
    return coerce(face.spec(key), raw, origin)


def check_instance(face: Face, obj: Any, origin: str = "config") -> None:
    """Range-check a schema instance built in code (not through `load`)."""
    for spec in face.specs():
        value: Any = obj
        for part in spec.key.split("."):
            value = getattr(value, part)
        check(spec, value, origin)


def read_toml(path: Path, fix: str) -> dict[str, Any]:
    """Parse a TOML file ({} if it does not exist); one line with `fix` when it is not TOML."""
    import tomllib

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read {path} ({exc.strerror}): {fix}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML ({exc}): {fix}") from None


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
    import tomli_w  # lazily: the agent's run path never writes TOML

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

<!-- Generated from the settings declarations (security/settings.py and each tool's config
module); do not edit by hand: run `make config-doc`. tests/security/test_settings.py fails
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
    """`python -m security.settings MODULE...`: print docs/CONFIG.md for these config modules."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m security.settings agent.config coordinator.config ledger.audit_config", file=sys.stderr)
        return 2
    write(render_markdown(faces_from_modules(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
