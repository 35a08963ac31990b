"""Recipe presets of the tab's training forms: the built-in ones as data, here only, and the user's own.

A preset sets some settings of a kind's config in one choice; it is applied through the kind's config
class (`from_dict`), so a preset naming a setting the kind does not have is an error, never ignored.
The user's presets are small TOML files in the data folder (`presets/<kind>/<name>.toml`), written
through io; a preset's name is a plain name, never a path.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import kinds
from ..errors import BKSDMError
from ..job_config import read_toml, write_toml

# the settings the built-in presets decide; "Paper recipe" is the config class's own defaults of these
RECIPE = ("max_steps", "resolution", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
          "gradient_checkpointing", "optimizer", "mixed_precision", "cache", "teacher_half", "checkpoint_every",
          "sample_every", "sample_steps", "log_every")
PAPER = "Paper recipe"
ESTIMATE = ("The memory figure is an estimate from the paper's setup, not yet measured on a GPU with this "
            "extension: if the job runs out of memory, lower the batch size and raise the accumulation.")


@dataclass(frozen=True)
class Preset:
    title: str
    help: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> settings; empty for PAPER


PRESETS: tuple[Preset, ...] = (  # what each sets is the kind's own: its config class's `presets`
    Preset("Quick test", "64 steps at 256 px, batch 4: a few minutes on a GPU, to see that data, teacher and "
           "output work before a long run. The model it makes is not useful yet."),
    Preset(PAPER, "The paper's values: distillation 50,000 steps at 512 px, batch 64 x 4 accumulation "
           "(256 images per update), learning rate 5e-5, EMA; DreamBooth 800 steps, batch 1. About 80 GB of "
           "GPU memory for distillation (the paper used one A100)."),
    Preset("Single 24 GB GPU", "The paper's 256 images per update as batch 8 x 32 accumulation, with gradient "
           "checkpointing, 8-bit Adam and the latent cache (no VAE or text encoder in the training steps). "
           "About 20 GB. " + ESTIMATE),
    Preset("Single 12 GB GPU", "256 images per update as batch 2 x 128 accumulation, with gradient checkpointing, "
           "8-bit Adam, the latent cache and a half-precision teacher. About 11 GB. " + ESTIMATE),
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _+-]{0,63}$")


def has_bitsandbytes() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def builtin(kind: str) -> list[Preset]:
    """The built-in presets that apply to `kind`: those its config class gives settings for
    (`presets`, title -> settings), and the paper recipe (its own defaults) for every training kind."""
    own = getattr(kinds.get(kind).config_class(), "presets", {})
    unknown = sorted(set(own) - {p.title for p in PRESETS})
    if unknown:
        raise BKSDMError(f"The {kind} presets {', '.join(unknown)} have no description in ui/presets.py.")
    return [Preset(p.title, p.help, {kind: dict(own[p.title])} if p.title in own else {})
            for p in PRESETS if p.title in own or p.title == PAPER]


def preset_values(config_class: type, preset: Preset, bnb: bool | None = None) -> tuple[dict[str, Any], list[str]]:
    """The settings `preset` gives a `config_class` form, checked through the class, and notes to show."""
    names = {s.name for s in config_class.settings()}
    if preset.title == PAPER:
        defaults = config_class()
        values = {name: getattr(defaults, name) for name in RECIPE if name in names}
    else:
        values = dict(preset.values.get(config_class.kind, {}))
        if not values:
            raise BKSDMError(f"The preset {preset.title!r} has no {config_class.kind} settings.")
    notes = []
    if values.get("optimizer") == "adamw8bit" and not (has_bitsandbytes() if bnb is None else bnb):
        values["optimizer"] = "adamw"
        notes.append("bitsandbytes is not installed here (it has no build for e.g. Jetson/aarch64): this preset "
                     "uses AdamW instead of 8-bit Adam, which needs about 1 GB more for a BK-SDM-Small student.")
    checked = config_class.from_dict(values)  # an unknown setting is an error here
    return {name: getattr(checked, name) for name in values}, notes


def find(kind: str, title: str, data_dir: Path | None = None) -> Preset | None:
    for preset in builtin(kind):
        if preset.title == title:
            return preset
    if data_dir is not None and title in user_presets(data_dir, kind):
        return Preset(title, f"Your preset, saved in {_path(data_dir, kind, title)}.",
                      {kind: load_user(data_dir, kind, title)})
    return None


# --- the user's presets -------------------------------------------------------------------------

def check_name(name: str) -> str:
    name = (name or "").strip()
    if not _NAME.match(name):
        raise BKSDMError(f"A preset name is a plain name of letters, digits, spaces, '_', '+' or '-' (at most 64), "
                         f"not {name!r}.")
    if name in {p.title for p in PRESETS}:
        raise BKSDMError(f"{name!r} is a built-in preset: choose another name.")
    return name


def _folder(data_dir: Path, kind: str) -> Path:
    return Path(data_dir) / "presets" / kind


def _path(data_dir: Path, kind: str, name: str) -> Path:
    return _folder(data_dir, kind) / f"{check_name(name)}.toml"


def user_presets(data_dir: Path, kind: str) -> list[str]:
    folder = _folder(data_dir, kind)
    return sorted(p.stem for p in folder.glob("*.toml") if _NAME.match(p.stem)) if folder.is_dir() else []


def saved_settings(config_class: type) -> list[str]:
    """What a user preset keeps: the recipe, not the paths and names of one run."""
    return [s.name for s in config_class.settings() if s.kind not in ("path", "model", "folder", "name")]


def save_user(data_dir: Path, config_class: type, name: str, values: dict[str, Any]) -> Path:
    """Save the recipe part of `values` (checked through the config class) as preset `name`."""
    path = _path(data_dir, config_class.kind, name)
    config = config_class.from_dict({k: v for k, v in values.items() if k in saved_settings(config_class)})
    data = {k: v for k, v in config.to_dict().items() if k in saved_settings(config_class)}
    return write_toml(path, {"kind": config_class.kind, **data})


def load_user(data_dir: Path, kind: str, name: str) -> dict[str, Any]:
    data = read_toml(_path(data_dir, kind, name))
    if data.pop("kind", kind) != kind:
        raise BKSDMError(f"The preset {name!r} is not a {kind} preset.")
    return data
