"""Tiny random Stable Diffusion models in the real on-disk forms, for tests. Nothing is downloaded.

A tiny U-Net keeps SD's structure (4 stages, 2 R-A pairs per stage, mid block) at 32/64 channels, so
every BK layout derives from it exactly as from the full-size teacher. The CLIP tokenizer is the real
one, built from the BPE vocabulary that the open-clip-torch wheel ships.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bksdm_ext import layouts, tokenizer

TINY_CHANNELS = [32, 64, 64, 64]
CROSS_DIM = 32
LATENT = 8  # latent side; images are 8x larger


def tiny_teacher_config(version: str = "v1") -> dict:
    config = layouts.teacher_unet_config(version)
    config.update(block_out_channels=list(TINY_CHANNELS), cross_attention_dim=CROSS_DIM, sample_size=LATENT)
    # v1: the number of heads; v2: heads per stage with one head width (32), as SD2's 64
    config["attention_head_dim"] = 2 if version == "v1" else [c // 32 for c in TINY_CHANNELS]
    return config


def tiny_unet_config(layout: str = "teacher", version: str = "v1") -> dict:
    return layouts.student_unet_config(tiny_teacher_config(version), layout)


def tiny_unet(layout: str = "teacher", version: str = "v1", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(layout, version))
    _randomize(unet)
    return unet.eval()


def _randomize(module: torch.nn.Module) -> None:
    # diffusers zero-initialises some output convs; random values make every weight matter in tests
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=LATENT * 8,
    )
    _randomize(vae)
    return vae.eval()


def tiny_text_encoder(version: str = "v1", seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=CROSS_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3 if version == "v1" else 2,  # SD2 folders ship all but the last block
        max_position_embeddings=77,
        hidden_act="quick_gelu" if version == "v1" else "gelu",
        projection_dim=CROSS_DIM,
    )
    return CLIPTextModel(config).eval()


def write_clip_tokenizer(directory: str | os.PathLike, family: str = "v1") -> Path:
    """The real CLIP BPE tokenizer (v1: openai/clip-vit-large-patch14's), as the product builds it offline."""
    return tokenizer.write_clip_tokenizer(directory, family)


def write_tiny_pipeline(directory: str | os.PathLike, layout: str = "teacher", version: str = "v1",
                        seed: int = 0, unet=None) -> Path:
    """A diffusers StableDiffusionPipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    return write_pipeline(directory, unet or tiny_unet(layout, version, seed), tiny_vae(seed),
                          tiny_text_encoder(version, seed), version)


def write_pipeline(directory: str | os.PathLike, unet, vae, text_encoder, version: str, variant=None) -> Path:
    """A pipeline folder as published (nota-ai/bk-sdm-*: unet/ vae/ text_encoder/ tokenizer/ scheduler/)."""
    from diffusers import PNDMScheduler

    directory = Path(directory)
    unet.save_pretrained(directory / "unet", variant=variant)
    vae.save_pretrained(directory / "vae", variant=variant)
    text_encoder.save_pretrained(directory / "text_encoder", variant=variant, safe_serialization=True)
    write_clip_tokenizer(directory / "tokenizer")
    prediction = layouts.get_version(version).prediction_type
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  prediction_type=prediction, steps_offset=1).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.31.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }))
    return directory


# --- full size, random: for the real-WebUI tests (shapes of the published models) ---------------

SD_VAE_CONFIG = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4,
                     norm_num_groups=32, sample_size=512)


def text_encoder_config(version: str):
    from transformers import CLIPTextConfig

    if version == "v1":  # openai/clip-vit-large-patch14's text tower
        return CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                              num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768)
    # OpenCLIP ViT-H-14's text tower as SD-2 diffusers folders ship it: 23 of its 24 blocks
    return CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                          num_hidden_layers=23, hidden_act="gelu", projection_dim=512)


def random_full_size(cls, config, seed: int, dtype=torch.float16):
    """A model of `cls` with N(0, 0.02) weights, norms at 1 and biases at 0; built without slow init."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, m in model.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    for name, param in list(model.named_parameters()):
        module, _, kind = name.rpartition(".")
        if module in norms:
            value = torch.ones(param.shape) if kind == "weight" else torch.zeros(param.shape)
        elif kind == "bias":
            value = torch.zeros(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * 0.02
        set_module_tensor_to_device(model, name, "cpu", value=value.to(dtype))
    return model.eval()


def write_full_size_pipeline(directory: str | os.PathLike, layout: str, version: str, seed: int = 0) -> Path:
    """A full-size random pipeline folder in fp16 (about 1.5-2.5 GB), as the published ones are laid out."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return write_pipeline(
        directory,
        random_full_size(UNet2DConditionModel, layouts.unet_config(layout, version), seed),
        random_full_size(AutoencoderKL, SD_VAE_CONFIG, seed + 1),
        random_full_size(CLIPTextModel, text_encoder_config(version), seed + 2),
        version, variant="fp16",
    )


def full_size_pipeline(folder: str | os.PathLike, layout: str, version: str = "v1") -> Path:
    """`folder`, holding a full-size random pipeline of `layout` in plain file names (written once, reused)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        print(f"writing a full-size random {layout} pipeline into {folder}", flush=True)
        write_full_size_pipeline(folder, layout, version)
        for variant in folder.glob("*/*.fp16.safetensors"):  # the engines read the plain file names
            variant.rename(variant.with_name(variant.name.replace(".fp16", "")))
    return folder


def load_ldm_unet_strictly(single: str | os.PathLike):
    """The LDM U-Net of the yaml beside single-file checkpoint `single`, with the file's U-Net tensors loaded
    `strict=True` (a missing, extra or misshapen tensor fails)."""
    import importlib

    import yaml

    from bksdm_ext import io
    from bksdm_ext.convert import checkpoint

    single = Path(single)
    params = yaml.safe_load(single.with_suffix(".yaml").read_text())["model"]["params"]["unet_config"]
    module, name = params["target"].rsplit(".", 1)
    unet = getattr(importlib.import_module(module), name)(**params["params"])
    tensors, _ = io.read_safetensors(single)
    prefix = checkpoint.UNET_PREFIX
    unet.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return unet
