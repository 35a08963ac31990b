"""A Stable Diffusion model as diffusers component state dicts <-> one LDM (single-file) state dict.

Plus what a diffusers folder needs that weights alone do not carry: component configs (our single
files keep them in the header metadata; for other files they are derived from the shapes and the
version) and the header metadata itself.
"""

from __future__ import annotations

import json

import torch

from .. import layouts
from ..detect import UNetDetection, unet_config
from ..errors import BKSDMError
from . import keymaps

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
FORMAT_VERSION = "1"
POSITION_IDS = "text_model.embeddings.position_ids"
# Parts of OpenCLIP's text tower SD-2.x never runs (it reads the penultimate block's output).
_OPENCLIP_UNUSED = ("model.text_projection", "model.logit_scale", "model.attn_mask")


# --- components -> single file ------------------------------------------------------------------


def text_encoder_to_ldm(tensors: StateDict, family: str) -> tuple[StateDict, list[str]]:
    """(LDM tensors relative to `cond_stage_model.`, full-model keys the file leaves out)."""
    if family == "v1":
        return keymaps.CLIP_TABLE.to_ldm(tensors), []
    # position_ids is a constant buffer OpenCLIP does not store; to_diffusers rebuilds it
    tensors = {k: v for k, v in tensors.items() if k != POSITION_IDS}
    layers = keymaps.text_layers(tensors, "diffusers")
    # SD-2 diffusers folders stop one block early and have no projection: say so, invent nothing
    unused = [f"{TEXT_PREFIX}model.transformer.resblocks.{layers}.*", f"{TEXT_PREFIX}model.text_projection"]
    return keymaps.openclip_table(layers).to_ldm(tensors), unused


def to_single_file(weights: dict[str, StateDict], layout: str, family: str) -> tuple[StateDict, list[str]]:
    """The LDM checkpoint of diffusers components (any of unet, vae, text_encoder), and what it omits."""
    out = {UNET_PREFIX + k: v for k, v in keymaps.unet_to_ldm(weights["unet"], layout).items()}
    unused: list[str] = []
    if "vae" in weights:
        out.update({VAE_PREFIX + k: v for k, v in keymaps.vae_to_ldm(weights["vae"]).items()})
    if "text_encoder" in weights:
        text, unused = text_encoder_to_ldm(weights["text_encoder"], family)
        out.update({TEXT_PREFIX + k: v for k, v in text.items()})
    return out, unused


# --- single file -> components ------------------------------------------------------------------


def text_encoder_to_diffusers(tensors: StateDict) -> tuple[StateDict, list[str]]:
    """HF CLIPTextModel tensors from the LDM text encoder (relative to `cond_stage_model.`), and dropped keys."""
    if any(k.startswith("transformer.") for k in tensors):
        return keymaps.CLIP_TABLE.to_diffusers(tensors), []
    dropped = [k for k in tensors if k in _OPENCLIP_UNUSED]
    if "model.text_projection" in tensors:
        # a full OpenCLIP tower (SD-2's own checkpoints): diffusers keeps all but the last block
        last = keymaps.text_layers(tensors, "ldm") - 1
        dropped += [k for k in tensors if k.startswith(f"model.transformer.resblocks.{last}.")]
    kept = {k: v for k, v in tensors.items() if k not in dropped}
    out = keymaps.openclip_table(keymaps.text_layers(kept, "ldm")).to_diffusers(kept)
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out[POSITION_IDS] = torch.arange(positions).expand((1, -1))  # transformers 4.30 stores this buffer
    return out, [TEXT_PREFIX + k for k in dropped]


def split_single_file(tensors: StateDict, detection: UNetDetection) -> tuple[dict[str, StateDict], list[str]]:
    """Diffusers component state dicts of a checkpoint, and the keys that belong to none."""
    unet = {k[len(detection.prefix):]: v for k, v in tensors.items() if k.startswith(detection.prefix)}
    if detection.naming == "ldm":
        unet = keymaps.unet_to_diffusers(unet, detection.layout)
    weights = {"unet": unet}
    if not detection.prefix:
        return weights, []
    vae = {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    text = {k[len(TEXT_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    dropped = [k for k in tensors if not k.startswith((detection.prefix, VAE_PREFIX, TEXT_PREFIX))]
    if vae:
        weights["vae"] = keymaps.vae_to_diffusers(vae)
    if text:
        weights["text_encoder"], unused = text_encoder_to_diffusers(text)
        dropped += unused
    return weights, dropped


# --- configs ------------------------------------------------------------------------------------


def scheduler_config(version: str) -> dict:
    """SD's PNDM scheduler (what BK-SDM evaluates with) for `version`'s prediction type."""
    return {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "timestep_spacing": "leading",
        "prediction_type": layouts.get_version(version).prediction_type,
    }


def vae_config(tensors: StateDict, version: str) -> dict:
    """An AutoencoderKL config read from a VAE's shapes (diffusers names)."""
    levels, layers = keymaps.vae_shape(tensors, "diffusers")
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": 0.18215,
        "block_out_channels": [tensors[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                               for i in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "in_channels": tensors["encoder.conv_in.weight"].shape[1],
        "out_channels": tensors["decoder.conv_out.weight"].shape[0],
        "latent_channels": tensors["post_quant_conv.weight"].shape[0], "layers_per_block": layers,
        "sample_size": layouts.get_version(version).sample_size * 8,
    }


def text_encoder_config(tensors: StateDict, family: str) -> dict:
    """A CLIPTextConfig read from the shapes; heads are not in the shapes: 64-wide, as CLIP-L and OpenCLIP-H."""
    from transformers import CLIPTextConfig

    vocab, hidden = tensors["text_model.embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
        intermediate_size=tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=keymaps.text_layers(tensors, "diffusers"),
        max_position_embeddings=tensors["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if family == "v1" else "gelu", projection_dim=768 if family == "v1" else 512,
    ).to_dict()
    config["architectures"] = ["CLIPTextModel"]
    return config


def model_index(components) -> dict:
    classes = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "PNDMScheduler"]}
    return {"_class_name": "StableDiffusionPipeline", "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False,
            **{name: classes[name] for name in classes if name in components}}


def written_model_index(index: dict) -> dict:
    """`index` with the parts a converted folder does not carry (nota-ai's safety checker and its
    feature extractor) set to None, so diffusers does not look for them."""
    kept = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    return {k: [None, None] if isinstance(v, list) and len(v) == 2 and k not in kept else v for k, v in index.items()}


def complete_configs(configs: dict, weights: dict[str, StateDict], detection: UNetDetection, version: str) -> dict:
    """`configs` with every missing one a diffusers folder of `weights` needs derived."""
    configs = dict(configs)
    configs.setdefault("unet", unet_config(detection, version))
    if "scheduler" in configs:  # a --version given by the user outranks the folder's scheduler
        configs["scheduler"] = {**configs["scheduler"], "prediction_type": layouts.get_version(version).prediction_type}
    if "vae" in weights:
        configs.setdefault("vae", vae_config(weights["vae"], version))
    if "text_encoder" in weights:
        configs.setdefault("text_encoder", text_encoder_config(weights["text_encoder"], detection.family))
    if "vae" in weights or "text_encoder" in weights:
        configs.setdefault("scheduler", scheduler_config(version))
        configs.setdefault("model_index", model_index([*weights, "scheduler", "tokenizer"]))
    return configs


# --- header metadata ----------------------------------------------------------------------------


def header(layout: str, version: str, source: str, unused: list[str], configs: dict) -> dict[str, str]:
    return {
        "bksdm.format_version": FORMAT_VERSION,
        "bksdm.layout": layout,
        "bksdm.version": version,
        "bksdm.prediction_type": layouts.get_version(version).prediction_type,
        "bksdm.source": source,
        "bksdm.unused": json.dumps(unused),
        "bksdm.diffusers_configs": json.dumps(configs, sort_keys=True),  # makes the way back exact
    }


def configs_from_header(metadata: dict[str, str]) -> dict:
    text = metadata.get("bksdm.diffusers_configs")
    if not text:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        raise BKSDMError("The file's bksdm.diffusers_configs metadata is not valid JSON; the header was edited "
                         "or damaged. Convert from the original again.") from None
