"""Loading the Stable Diffusion parts a training job needs, and encoding images and captions."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BKSDMError
from ..io import load_pretrained
from ..tokenizer import fix_max_length

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTLESS = ("tokenizer", "scheduler")


def load_parts(source: str, parts=PARTS) -> dict:
    """{part: model} of a diffusers pipeline folder or hub id (a single-file checkpoint via diffusers)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "tokenizer": CLIPTokenizer, "scheduler": DDPMScheduler}
    root = Path(source)
    if root.is_file():
        return _single_file_parts(root, parts)
    try:
        if not root.is_dir():
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(source, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        loaded = {name: loaders[name].from_pretrained(root, subfolder=name) if name in WEIGHTLESS
                  else load_pretrained(loaders[name], root / name) for name in parts}
    except (OSError, ValueError) as error:
        raise BKSDMError(f"Cannot load the model parts from {source}: {error}") from None
    if "tokenizer" in loaded:
        config = root / "text_encoder" / "config.json"
        fix_max_length(loaded["tokenizer"], json.loads(config.read_text()) if config.is_file() else None)
    loaded["root"] = root
    return loaded


def _single_file_parts(path: Path, parts) -> dict:
    return load_parts(str(single_file_folder(path)), parts)


def single_file_folder(path: Path) -> Path:
    """Convert a single-file checkpoint once into a diffusers pipeline folder in the cache; its path.

    The file has no tokenizer: the family's published one is used when the HF cache or the hub has it,
    else the same CLIP tokenizer is built offline from open_clip's vocabulary.
    """
    import shutil
    import tempfile

    from ..convert import load_model, write_folder
    from ..tokenizer import get_family, save_hub_tokenizer
    from .cache import default_cache_dir

    stat = path.stat()
    folder = default_cache_dir().parent / "models" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / "tokenizer").is_dir():
        # earlier versions left the folder without a tokenizer when offline: convert again
        shutil.rmtree(folder, ignore_errors=True)
        model = load_model(path)
        if not model.is_pipeline:
            raise BKSDMError(f"{path} holds a U-Net alone: a job needs the whole model (VAE and text encoder "
                             "too); choose a full checkpoint or a pipeline folder.")
        family = model.detection.family
        with tempfile.TemporaryDirectory() as tmp:
            hub = save_hub_tokenizer(Path(tmp) / "tokenizer", family)
            if hub is None:
                print(f"{get_family(family).hub_repo}'s tokenizer is neither cached nor downloadable: building the "
                      "same CLIP tokenizer offline from open_clip's vocabulary.", flush=True)
            try:
                lines = write_folder(model, folder, tokenizer=hub)
            except (OSError, BKSDMError):
                if not (folder / "tokenizer").is_dir():
                    raise
                lines = [f"{folder} was converted meanwhile by another process: using it."]
            for line in model.notes + lines:
                print(line, flush=True)
    return folder


def freeze(module: torch.nn.Module, dtype: torch.dtype, device) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.to(device=device, dtype=dtype).eval()


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """The text encoder's last hidden state for padded, truncated prompts (SD's conditioning)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
    """Scaled VAE latents: a posterior sample (the official recipe) or its mean (for the cache)."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    return latents * vae.config.scaling_factor


def layout_of(unet_config) -> str:
    """The BK layout (or 'teacher' for SD itself) of a diffusers U-Net config; refuses any other."""
    from ..detect import match_layout

    config = dict(unet_config)
    stages, per_block = len(config.get("down_block_types", ())), config.get("layers_per_block")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    per_stage = tuple(per_block) if isinstance(per_block, (list, tuple)) else (per_block,) * stages
    try:
        return match_layout(stages, per_stage, mid, "diffusers config").name
    except BKSDMError:
        raise BKSDMError(f"The U-Net (layers_per_block {per_block}, mid block {mid}, {stages} stages) is neither "
                         "SD-1.x/2.x nor a BK-SDM layout: choose a BK-SDM or SD model.") from None
