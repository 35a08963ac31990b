"""The base of every job kind's config: one field description, one serialiser (TOML/JSON), one check.

A kind's config is a dataclass deriving from `JobConfig` whose fields are declared with `setting(...)`:
default, help, and what the CLI and the tab need to show it (label, group, choices, range, whether it
is a positional argument, what a string names). `Config.settings()` lists those descriptions; the
CLI flags (`bksdm_ext.commands.train`) and the tab's form (`bksdm_ext.ui.tab`) are both generated
from it, so they cannot disagree. `validate()` checks type, choices and range of every setting
generically; a kind adds its own checks (files exist, prompts hold the identifier) on top.

`config.toml` always holds `kind = "..."` beside the settings, whoever writes it.

Core level: imports nothing from train/, jobs/, ui/ or webui/, and not torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from .errors import BKSDMError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, the WebUI's
    import tomli as tomllib

GROUPS = ("Model", "Data", "Losses", "Recipe", "Speed & memory", "Output")
# what a string setting names; the safety checks (issue 12) and the tab's widgets read it
STRING_KINDS = ("path", "model", "folder", "name", "prompt", "text")
_META = "bksdm_setting"


def setting(default: Any, help: str, *, label: str | None = None, group: str | None = None, advanced: bool = False,
            choices: tuple | Callable[[], tuple] | None = None, min: float | None = None, max: float | None = None,
            multiple_of: int | None = None, positional: bool = False, nargs: str | None = None,
            kind: str | None = None, custom: bool = False):
    """A dataclass field of a job config with its description in the field's metadata.

    `choices` may be a function (read when asked, e.g. the layouts known now); `custom`: they are
    suggestions, other values are the kind's `validate()` to check (a layout spec). `positional` makes it a
    positional CLI argument (`nargs` "+" / "*" / "?" for several or optional ones). `kind` says what a
    string names: "path", "model" (a model source), "folder", "name" (a plain file name), "prompt".
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    if kind is not None and kind not in STRING_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {STRING_KINDS}")
    meta = {"help": help, "label": label, "group": group, "advanced": advanced, "choices": choices, "min": min,
            "max": max, "multiple_of": multiple_of, "positional": positional, "nargs": nargs, "kind": kind,
            "custom": custom}
    metadata = {_META: meta, "help": help}
    if isinstance(default, (list, tuple)):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One setting of a job config as the CLI and the tab show it."""

    name: str
    type: str  # "bool", "int", "float", "str", "list"
    default: Any
    help: str
    label: str
    group: str
    advanced: bool = False
    choices: tuple | None = None
    custom: bool = False  # the choices are suggestions: other values are allowed (the kind checks them)
    min: float | None = None
    max: float | None = None
    multiple_of: int | None = None
    positional: bool = False
    nargs: str | None = None
    kind: str | None = None  # what a string names (STRING_KINDS)
    optional: bool = False  # None (empty) is a valid value
    own: bool = True  # declared by the kind itself rather than by a shared base (e.g. TrainConfig)
    labelled: bool = False  # the label was given (not derived from the name)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class JobConfig:
    """Base of the config dataclasses of job kinds: description, dict/TOML/JSON forms, generic checks."""

    kind: ClassVar[str] = ""

    # --- description ---------------------------------------------------------------------------

    @classmethod
    def settings(cls) -> list[Setting]:
        """Every setting, the kind's own first (model, data), then the shared ones, in declaration order; the
        settings a mixin lends (`_shared_names`) follow the kind's leading Model settings."""
        shared = _shared_names(cls)
        out = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            meta = f.metadata.get(_META, {})
            type_name, optional = _type_of(f)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = meta.get("choices")
            if callable(choices):
                choices = choices()
            label = meta.get("label")
            out.append(Setting(
                name=f.name, type=type_name, default=None if default is dataclasses.MISSING else default,
                help=meta.get("help", f.metadata.get("help", "")), label=label or f.name.replace("_", " "),
                group=meta.get("group") or "Recipe", advanced=bool(meta.get("advanced")),
                choices=tuple(choices) if choices else None, custom=bool(meta.get("custom")),
                min=meta.get("min"), max=meta.get("max"),
                multiple_of=meta.get("multiple_of"), positional=bool(meta.get("positional")),
                nargs=meta.get("nargs"), kind=meta.get("kind"), optional=optional or default is None,
                own=f.name not in shared, labelled=bool(label)))
        lent = _mixin_names(cls)
        own = [s for s in out if s.own and s.name not in lent]
        first_other = next((i for i, s in enumerate(own) if s.group != "Model"), len(own))
        return (own[:first_other] + [s for s in out if s.name in lent] + own[first_other:]
                + [s for s in out if not s.own])

    @classmethod
    def setting(cls, name: str) -> Setting:
        for s in cls.settings():
            if s.name == name:
                return s
        raise KeyError(name)

    # --- dict, TOML and JSON -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (None left out: TOML has no null, from_dict restores the default)."""
        values = {s.name: getattr(self, s.name) for s in self.settings()}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """The config of `data` (a `kind` key must name this kind), each value coerced to its setting's type."""
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise BKSDMError(f"This is a {kind!r} job config, not a {cls.kind!r} one.")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise BKSDMError(f"Unknown {cls.kind} settings: {', '.join(unknown)}. Known: {', '.join(fields)}.")
        return cls(**{name: _coerce(fields[name], value) for name, value in data.items()})

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a config from a .toml or .json file."""
        path = Path(path)
        if not path.is_file():
            raise BKSDMError(f"Config file {path} does not exist.")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise BKSDMError(f"Config file {path} cannot be read: {error}") from None
        else:
            data = read_toml(path)
        if not isinstance(data, dict):
            raise BKSDMError(f"Config file {path} does not hold settings (name = value).")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config, with its kind, as TOML (JSON for a .json path), atomically."""
        from .io import write_text

        path = Path(path)
        data = {"kind": self.kind, **self.to_dict()}
        return write_text(path, json.dumps(data, indent=2) + "\n" if path.suffix.lower() == ".json" else dumps(data))

    # --- checks --------------------------------------------------------------------------------

    def validate(self) -> None:
        """Type, choices, range and multiple of every setting; a kind extends this with its own checks."""
        for s in self.settings():
            check_value(s, getattr(self, s.name))


def check_value(s: Setting, value: Any) -> None:
    """Raise BKSDMError when `value` does not fit setting `s` (its type, choices, min/max, multiple_of)."""
    if value is None:
        if s.optional:
            return
        raise BKSDMError(f"Set {s.name} ({s.label}).")
    expected = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,), "list": (list, tuple)}
    if s.type in expected and (not isinstance(value, expected[s.type])
                               or (s.type in ("int", "float") and isinstance(value, bool))):
        raise BKSDMError(f"{s.name} must be a {s.type}, not {value!r}.")
    if s.type == "float" and not math.isfinite(value):
        raise BKSDMError(f"{s.name} must be a finite number, not {value!r}.")
    if s.kind == "name":
        from .io import check_name

        check_name(value, s.name)
    if s.choices and not s.custom and value not in s.choices:
        raise BKSDMError(f"{s.name} must be one of {', '.join(map(str, s.choices))}, not {value!r}.")
    if s.type in ("int", "float"):
        if s.min is not None and value < s.min:
            raise BKSDMError(f"{s.name} must be at least {s.min}.")
        if s.max is not None and value > s.max:
            raise BKSDMError(f"{s.name} must be at most {s.max}.")
        if s.multiple_of and value % s.multiple_of:
            raise BKSDMError(f"{s.name} must be a multiple of {s.multiple_of}, not {value}.")


def _shared_names(cls) -> set[str]:
    """Fields declared by a config base class of `cls` (not by the kind's own class).

    A dataclass mixin that is no JobConfig (e.g. `train.config.CaptionedImages`) lends several kinds the
    same settings as their own: they are not counted here."""
    names: set[str] = set()
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base) and issubclass(base, JobConfig):
            names |= {f.name for f in dataclasses.fields(base)}
    return names


def _mixin_names(cls) -> set[str]:
    """Fields a dataclass mixin that is no JobConfig lends `cls` (declared before the kind's own fields)."""
    return {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) and not issubclass(base, JobConfig)
            for f in dataclasses.fields(base)}


def _type_of(f: dataclasses.Field) -> tuple[str, bool]:
    """("bool" | "int" | "float" | "str" | "list", whether None is allowed) of a field's annotation."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    text = text.replace("typing.", "").replace(" ", "")
    optional = "None" in text.split("|") or text.startswith("Optional[")
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    base = [part for part in text.split("|") if part != "None"][0].split("[")[0]
    base = {"tuple": "list", "List": "list", "Path": "str"}.get(base, base)
    return base, optional


def _coerce(f: dataclasses.Field, value):
    kind, optional = _type_of(f)
    if value is None and not (optional or f.default is None):  # JSON's null for a setting that needs a value
        raise BKSDMError(f"Set {f.name}: it cannot be empty (null).")
    try:
        if value is None:
            return None
        if kind == "list":
            if isinstance(value, str):
                raise ValueError(value)
            return list(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (int, float)) and value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, str) and not re.fullmatch(r"\s*[-+]?\d+(\.0*)?\s*", value):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) else int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(value)
            return value
        if isinstance(value, (dict, list, tuple)):
            raise ValueError(value)
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    except (TypeError, ValueError):
        raise BKSDMError(f"Setting {f.name} must be a {kind}, not {value!r}.") from None


# --- TOML ---------------------------------------------------------------------------------------
# Python 3.11 reads TOML with `tomllib`; 3.10 (the WebUI's) needs `tomli`. None has no TOML form:
# such keys are left out, so `from_dict` gives them their default.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX) are all valid TOML basic-string escapes; TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return _string(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item, where) for item in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_key(k)} = {_value(v, where)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(pairs) + " }"
    raise BKSDMError(f"Cannot write {where} = {value!r} to TOML: use text, numbers, true/false or lists.")


def dumps(data: dict[str, Any]) -> str:
    """TOML text for `data`: plain keys first, then one [table] per nested dict."""
    lines: list[str] = []

    def table(mapping: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in mapping.items() if v is not None and not isinstance(v, dict)}
        tables = {k: v for k, v in mapping.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{_key(key)} = {_value(value, prefix + key)}")
        for key, value in tables.items():
            table(value, f"{prefix}.{_key(key)}" if prefix else _key(key))

    table(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def loads(text: str) -> dict[str, Any]:
    return tomllib.loads(text)


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BKSDMError(f"{path} does not exist.") from None
    except UnicodeDecodeError as error:
        raise BKSDMError(f"{path} is not valid TOML ({error}); fix or delete it.") from None
    except tomllib.TOMLDecodeError as error:
        raise BKSDMError(f"{path} is not valid TOML ({error}); fix or delete it.") from None


def write_toml(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as TOML atomically (a crash leaves the old file or the new one)."""
    from .io import write_text

    return write_text(path, dumps(data))
