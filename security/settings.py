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
The TOML writer and the generator of `docs/CONFIG.md` are in security/settings_render.py.

Stdlib only and small: `edge-agent run` imports this module, and its start time and memory
must not grow (so plain slotted classes, not dataclasses, for the declarations themselves).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PRECEDENCE = "command-line flags > environment > TOML file > stored state > defaults"
DEFAULT = "default"  # origin of a value nobody set


class SettingsError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message is one line with the fix."""


class Rule:
    """What a setting accepts, beyond its type. Kept in the dataclass field's metadata."""

    __slots__ = ("help", "min", "above", "max", "choices", "prefixes", "env", "file", "non_empty", "fold_case", "unit")

    def __init__(self, help: str, min: float | None = None, above: bool = False, max: float | None = None,
                 choices: tuple[str, ...] = (), prefixes: tuple[str, ...] = (), env: bool = True, file: bool = True,
                 non_empty: bool = False, fold_case: bool = False, unit: str = "") -> None:
        self.help = help
        self.min = min  # inclusive lower bound ...
        self.above = above  # ... or, when True, exclusive (value > min)
        self.max = max  # inclusive upper bound
        self.choices = choices
        self.prefixes = prefixes  # a non-empty value must start with one of these
        self.env = env  # settable from the environment
        self.file = file  # settable in the TOML file
        self.non_empty = non_empty  # strings and lists: not empty
        self.fold_case = fold_case  # strings: compared and kept in upper case (log levels)
        self.unit = unit  # "s" for seconds (docs only)

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


class Spec:
    """One declared setting of one tool, flattened (`broker.port`)."""

    __slots__ = ("key", "env", "kind", "optional", "default", "rule")

    def __init__(self, key: str, env: str, kind: str, optional: bool, default: Any, rule: Rule) -> None:
        self.key = key
        self.env = env
        self.kind = kind  # a key of _KINDS
        self.optional = optional  # None allowed (unset)
        self.default = default
        self.rule = rule

    @property
    def kind_name(self) -> str:
        return _KINDS[self.kind]


class Face:
    """One tool's settings: the schema dataclass plus how the tool names things."""

    __slots__ = ("tool", "env_prefix", "schema", "file", "flags", "other_env", "notes")

    def __init__(self, tool: str, env_prefix: str, schema: type, file: str, flags: Mapping[str, str] | None = None,
                 other_env: Mapping[str, str] | None = None, notes: str = "") -> None:
        self.tool = tool  # "edge-agent"
        self.env_prefix = env_prefix  # "EDGE_AGENT_"
        self.schema = schema  # the dataclass whose setting() fields are the settings
        self.file = file  # where the TOML file is, in words (docs and help)
        self.flags = dict(flags or {})  # key -> "--flag" (docs, messages)
        self.other_env = dict(other_env or {})  # recognised variables that are not settings
        self.notes = notes  # extra paragraph in docs/CONFIG.md

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

class Resolved:
    """The loaded values (flat, by dotted key) and where each came from."""

    __slots__ = ("values", "origins")

    def __init__(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        self.values = values
        self.origins = origins


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
