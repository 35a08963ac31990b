"""The tab's Check button: what a job would read from its data folder, through the trainers' own readers.

Nothing here reads a dataset itself: distillation's folders go through `train.data.read_metadata`,
DreamBooth's through `train.data.list_images`, the functions the jobs' `validate()` call; an empty or
unusable folder is refused with their message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THUMBNAILS = 4


@dataclass
class DataReport:
    text: str
    thumbnails: list[tuple[str, str]] = field(default_factory=list)  # (image path, caption)


def _skipped(skipped: dict) -> str:
    total = sum(skipped.values())
    if not total:
        return "nothing skipped"
    return f"{total} skipped ({', '.join(f'{n} {reason}' for reason, n in skipped.items())})"


def _captioned(values: dict[str, Any], folder_setting: str) -> DataReport:
    from ..train.data import read_metadata

    meta = read_metadata(values.get(folder_setting, ""), values.get("image_column") or "file_name",
                         values.get("caption_column") or "text")
    folder = Path(values[folder_setting])
    return DataReport(f"{len(meta.items)} images with captions in {folder}; {_skipped(meta.skipped)}.",
                      [(str(path), caption) for path, caption in meta.items[:THUMBNAILS]])


def _photos(values: dict[str, Any]) -> DataReport:
    from ..train.data import list_images

    images = list_images(values.get("instance_data", ""), "Subject photos")
    text = f"{len(images)} subject photos in {values['instance_data']} (their prompt: {values.get('instance_prompt')!r})"
    if values.get("prior_preservation") and values.get("class_data"):
        classes = list_images(values["class_data"], "Class image folder", allow_empty=True)
        text += f"; {len(classes)} class images of your own in {values['class_data']}"
    return DataReport(text + ".", [(str(p), p.name) for p in images[:THUMBNAILS]])


def data_setting(settings) -> str | None:
    """The setting a kind's Check button reads: DreamBooth's subject photos, else a folder setting named data."""
    names = {s.name: s for s in settings}
    if "instance_data" in names:
        return "instance_data"
    if "data" in names and names["data"].kind == "folder":
        return "data"
    return None


def check_data(settings, values: dict[str, Any]) -> DataReport:
    """The report of the kind's data folder in `values`; BKSDMError (the reader's) when it is unusable."""
    name = data_setting(settings)
    if name == "instance_data":
        return _photos(values)
    return _captioned(values, name)
