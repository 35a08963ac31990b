"""Key maps between diffusers and LDM (single-file) names, one table per model used both ways.

The U-Net's map is `layouts`' (the one source of truth for layouts). The VAE's and the text
encoders' are built here from the number of levels / layers found in the weights, so any size
(including the tiny test models) converts. Keys in LDM form are relative to the component's prefix
in a checkpoint (`first_stage_model.`, `cond_stage_model.`, `model.diffusion_model.`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .. import layouts
from ..errors import BKSDMError
from ..layouts import _rename as rename_prefix  # the U-Net map's longest-prefix renaming

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KeyTable:
    """(diffusers, LDM) name pairs: prefixes ending in '.' or whole keys; longest match wins.

    `conv_1x1` are LDM prefixes whose weight is a 1x1 conv where diffusers has a Linear (the VAE's
    mid-block attention); `fused` are (LDM key, its diffusers q/k/v keys) concatenated along dim 0
    (OpenCLIP's `in_proj`).
    """

    name: str
    pairs: tuple[tuple[str, str], ...]
    conv_1x1: frozenset[str] = frozenset()
    fused: tuple[tuple[str, tuple[str, str, str]], ...] = ()

    def _direction(self, to_ldm: bool) -> dict[str, str]:
        return {d: l for d, l in self.pairs} if to_ldm else {l: d for d, l in self.pairs}

    def to_ldm(self, tensors: StateDict) -> StateDict:
        parts = {part: ldm for ldm, qkv in self.fused for part in qkv}
        out = {ldm: torch.cat([tensors[k] for k in qkv]) for ldm, qkv in self.fused if qkv[0] in tensors}
        out.update(self._rename({k: v for k, v in tensors.items() if k not in parts}, True))
        return out

    def to_diffusers(self, tensors: StateDict) -> StateDict:
        out = {}
        for ldm, qkv in self.fused:
            if ldm in tensors:
                out.update(zip(qkv, tensors[ldm].chunk(3)))
        fused = {ldm for ldm, _ in self.fused}
        out.update(self._rename({k: v for k, v in tensors.items() if k not in fused}, False))
        return out

    def _rename(self, tensors: StateDict, to_ldm: bool) -> StateDict:
        table = self._direction(to_ldm)
        out, unplaced = {}, []
        for key, value in tensors.items():
            new = table.get(key) or rename_prefix(key, table)
            if new is None:
                unplaced.append(key)
                continue
            ldm_key = new if to_ldm else key
            if ldm_key.endswith(".weight") and ldm_key[: -len("weight")] in self.conv_1x1:
                value = value[:, :, None, None] if to_ldm else value[:, :, 0, 0]
            out[new] = value
        if unplaced:
            raise BKSDMError(f"{len(unplaced)} {self.name} tensors have no place in the "
                             f"{'LDM' if to_ldm else 'diffusers'} form, e.g. {', '.join(unplaced[:3])}.")
        return out


# --- U-Net --------------------------------------------------------------------------------------


def unet_to_ldm(tensors: StateDict, layout: str) -> StateDict:
    return {layouts.unet_key_to_ldm(k, layout): v for k, v in tensors.items()}


def unet_to_diffusers(tensors: StateDict, layout: str) -> StateDict:
    return {layouts.unet_key_to_diffusers(k, layout): v for k, v in tensors.items()}


# --- VAE ----------------------------------------------------------------------------------------

_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))
# diffusers before 0.14 saved the VAE attention under these names (CompVis' SD-1.4 folder still does)
_OLD_VAE_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def vae_table(levels: int, layers: int) -> KeyTable:
    """AutoencoderKL with `levels` resolution levels and `layers` resnets per encoder level."""
    pairs, conv_1x1 = [], set()

    def resnet(d: str, l: str) -> None:
        pairs.extend([(d, l), (d + "conv_shortcut.", l + "nin_shortcut.")])

    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.conv_out.", f"{side}.conv_out."),
                  (f"{side}.conv_norm_out.", f"{side}.norm_out.")]
        resnet(f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1.")
        resnet(f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2.")
        for d, l in _VAE_ATTENTION:
            pairs.append((f"{side}.mid_block.attentions.0.{d}", f"{side}.mid.attn_1.{l}"))
            if l != "norm.":
                conv_1x1.add(f"{side}.mid.attn_1.{l}")
    for i in range(levels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        level = levels - 1 - i  # diffusers counts decoder levels from the innermost
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.")
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv."))
    pairs += [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    return KeyTable("VAE", tuple(pairs), frozenset(conv_1x1))


def vae_shape(tensors: StateDict, naming: str) -> tuple[int, int]:
    """(levels, resnets per encoder level) of a VAE state dict in either naming."""
    pattern = (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." if naming == "diffusers"
               else r"encoder\.down\.(\d+)\.block\.(\d+)\.")
    found = [tuple(map(int, m.groups())) for k in tensors if (m := re.match(pattern, k))]
    if not found:
        raise BKSDMError("The VAE has no encoder blocks: it is incomplete or not an SD VAE.")
    return max(i for i, _ in found) + 1, max(j for _, j in found) + 1


def modern_vae_names(tensors: StateDict) -> StateDict:
    def rename(key: str) -> str:
        head, _, tail = key.rpartition("attentions.0.")
        for old, new in _OLD_VAE_ATTENTION.items():
            if head and tail.startswith(old):
                return head + "attentions.0." + new + tail[len(old):]
        return key

    return {rename(k): v for k, v in tensors.items()}


def vae_to_ldm(tensors: StateDict) -> StateDict:
    tensors = modern_vae_names(tensors)
    return vae_table(*vae_shape(tensors, "diffusers")).to_ldm(tensors)


def vae_to_diffusers(tensors: StateDict) -> StateDict:
    return vae_table(*vae_shape(tensors, "ldm")).to_diffusers(tensors)


# --- text encoders ------------------------------------------------------------------------------

# SD-1.x: the WebUI's FrozenCLIPEmbedder wraps the same transformers CLIPTextModel.
CLIP_TABLE = KeyTable("CLIP text encoder", (("text_model.", "transformer.text_model."),))

_OPENCLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                   ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))


def openclip_table(layers: int) -> KeyTable:
    """HF CLIPTextModel <-> the OpenCLIP text tower of SD-2.x (`cond_stage_model.model.*`)."""
    pairs = [("text_model.embeddings.token_embedding.", "model.token_embedding."),
             ("text_model.embeddings.position_embedding.weight", "model.positional_embedding"),
             ("text_model.final_layer_norm.", "model.ln_final.")]
    fused = []
    for i in range(layers):
        d, l = f"text_model.encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
        pairs += [(d + dp, l + lp) for dp, lp in _OPENCLIP_LAYER]
        for kind in ("weight", "bias"):
            fused.append((f"{l}attn.in_proj_{kind}", tuple(f"{d}self_attn.{p}_proj.{kind}" for p in "qkv")))
    return KeyTable("OpenCLIP text encoder", tuple(pairs), fused=tuple(fused))


def text_layers(tensors: StateDict, naming: str) -> int:
    pattern = (r"text_model\.encoder\.layers\.(\d+)\." if naming == "diffusers"
               else r"model\.transformer\.resblocks\.(\d+)\.")
    return max((int(m.group(1)) for k in tensors if (m := re.match(pattern, k))), default=-1) + 1
