"""Prompt sets for evaluation: any caption file (csv, jsonl, txt) or the default set shipped with the package.

The paper's set is the MS-COCO val2014 30K captions as `metadata.csv` (columns file_name, text); any
csv or jsonl with a text/caption/prompt column works, and a .txt holds one prompt per line.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path

from ..errors import BKSDMError

DEFAULT = "default"  # the prompts setting's value for the shipped set
COLUMNS = ("text", "caption", "prompt", "captions")


def default_prompts() -> list[str]:
    """The project's own prompt set (bksdm_ext/evaluate/prompts.txt, package data)."""
    return _txt_lines(resources.files(__package__).joinpath("prompts.txt").read_text(encoding="utf-8"))


def _txt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_prompts(source: str | os.PathLike = DEFAULT, limit: int = 0) -> list[str]:
    """The first `limit` prompts (all for 0) of `source`: "default" or a .csv/.jsonl/.txt caption file."""
    if str(source) in ("", DEFAULT):
        prompts = default_prompts()
    else:
        prompts = _read_file(Path(source).expanduser())
    if limit:
        prompts = prompts[:limit]
    if not prompts:
        raise BKSDMError(f"The prompt set {source} is empty: give a caption file with at least one caption.")
    return prompts


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise BKSDMError(f"The prompt file {path} does not exist: give a .csv, .jsonl or .txt caption file, or "
                         "'default' for the shipped set.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise BKSDMError(f"{path} is not UTF-8 text ({error}).") from None
    if suffix == ".txt":
        return _txt_lines(text)
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        return _column(path, rows)
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise BKSDMError(f"{path} line {number} is not JSON: a .jsonl holds one object per line.") from None
        return _column(path, rows)
    raise BKSDMError(f"{path}: prompts are read from .csv, .jsonl or .txt files.")


def _column(path: Path, rows: list) -> list[str]:
    if not rows:
        return []
    if not all(isinstance(row, dict) for row in rows):
        raise BKSDMError(f"{path}: every row must be an object with a text column.")
    column = next((c for c in COLUMNS if c in rows[0]), None)
    if column is None:
        raise BKSDMError(f"{path} has no caption column: name it one of {', '.join(COLUMNS)} "
                         f"(it has {', '.join(map(str, rows[0]))}).")
    return [str(row.get(column) or "").strip() for row in rows if str(row.get(column) or "").strip()]
