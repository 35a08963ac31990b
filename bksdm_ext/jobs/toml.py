"""A small TOML writer for job configs (str, int, float, bool, lists, nested tables), and the reader.

Python 3.11 reads TOML with `tomllib`; 3.10 (the WebUI's tested version) needs `tomli`. `None`
has no TOML form: such keys are left out, so a config's `from_dict` must give them their default.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from ..errors import BKSDMError

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


def read(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BKSDMError(f"{path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise BKSDMError(f"{path} is not valid TOML ({error}); fix or delete it.") from None


def write(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write atomically (a crash leaves the old file or the new one; Windows' open-file case retried)."""
    from ..io import write_text  # imports torch: only when a config is written

    write_text(path, dumps(data))
