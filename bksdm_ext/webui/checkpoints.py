"""The WebUI's checkpoint list: whole checkpoints only, and a refresh never moves the user's selection.

`sd_models.list_models()` runs on every refresh (the dropdown's button, `POST /sdapi/v1/refresh-checkpoints`,
our tab when a job finishes). It walks the models folders recursively, so the parts of a diffusers folder
(`unet/diffusion_pytorch_model.safetensors`, `vae/…`) show up as checkpoints; and with `--ckpt FILE` given at
start it sets the `sd_model_checkpoint` option back to FILE, so the next generation silently loads FILE.
The wrap below drops the diffusers parts and puts the selection back. The WebUI looks `list_models` up as a
module attribute everywhere it refreshes (1.6-1.10); its first call at start, which applies `--ckpt`, runs
before extensions load and stays as it is.
"""

from __future__ import annotations

from pathlib import Path

from modules import sd_models, shared

from .patching import wrap


def in_diffusers_folder(filename: str) -> bool:
    """A component file of a diffusers pipeline folder (`NAME/unet/….safetensors`), or a file beside its
    `model_index.json`: not a WebUI checkpoint."""
    path = Path(filename)
    return any((folder / "model_index.json").is_file() for folder in list(path.parents)[:2])


def drop_entries(checkpoints_list: dict, checkpoint_aliases: dict, unwanted) -> list[str]:
    """Remove the CheckpointInfos for which `unwanted(info)` holds from both WebUI maps; their titles."""
    dropped = [info for info in checkpoints_list.values() if unwanted(info)]
    for info in dropped:
        checkpoints_list.pop(info.title, None)
    for alias in [alias for alias, info in checkpoint_aliases.items() if info in dropped]:
        del checkpoint_aliases[alias]
    return [info.title for info in dropped]


def kept_selection(before: str | None, after: str | None, aliases: dict, closest) -> str | None:
    """The title to select after a refresh: the one selected before, when it is still listed (under its
    possibly new title), else what the refresh chose."""
    if not before or before == after:
        return after
    info = aliases.get(before) or closest(before)
    return info.title if info is not None else after


def _list_models(original):
    def list_models(*args, **kwargs):
        before = shared.opts.data.get("sd_model_checkpoint")
        result = original(*args, **kwargs)
        drop_entries(sd_models.checkpoints_list, sd_models.checkpoint_aliases,
                     lambda info: in_diffusers_folder(info.filename))
        after = shared.opts.data.get("sd_model_checkpoint")
        chosen = kept_selection(before, after, sd_models.checkpoint_aliases, sd_models.get_closet_checkpoint_match)
        if chosen != after:
            # the data only, no callbacks: the selection is what it was, so nothing is (re)loaded
            shared.opts.data["sd_model_checkpoint"] = chosen
        return result

    return list_models


def install() -> None:
    """Wrap `sd_models.list_models`; idempotent (Reload UI imports our script again)."""
    wrap(sd_models, "list_models", _list_models)
