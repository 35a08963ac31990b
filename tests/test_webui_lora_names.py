import importlib

import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.ldm_config import ldm_model_config
from bksdm_ext.addons.lora import module_to_ldm as lora_key_to_ldm


def ldm_module_keys(layout):
    """The Lora extension's keys for every module of the U-Net the WebUI builds from our yaml."""
    unet = ldm_model_config(layout, "v1")["model"]["params"]["unet_config"]
    module, name = unet["target"].rsplit(".", 1)
    with torch.device("meta"):
        model = getattr(importlib.import_module(module), name)(**unet["params"])
    return {"diffusion_model_" + n.replace(".", "_") for n, _ in model.named_modules() if n}


def diffusers_lora_keys(layout):
    """LoRA module keys as diffusers/kohya write them: every Linear/Conv of the diffusers U-Net."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**layouts.unet_config(layout, "v1"))
    return {n: "lora_unet_" + n.replace(".", "_") for n, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.mark.parametrize("layout", list(layouts.LAYOUTS))
def test_every_diffusers_lora_key_lands_on_its_own_module(layout):
    modules = ldm_module_keys(layout)
    for diffusers_name, key in diffusers_lora_keys(layout).items():
        ldm = lora_key_to_ldm(key, layout)
        assert ldm in modules, (key, ldm)
        expected = layouts.unet_key_to_ldm(diffusers_name + ".weight", layout)[: -len(".weight")]
        assert ldm == "diffusion_model_" + expected.replace(".", "_")


def test_sd_numbering_would_misplace_bk_blocks():
    # SD numbering puts up_blocks.1.attentions.0 at output_blocks 3; on Small it is output_blocks 2
    key = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert lora_key_to_ldm(key, "teacher") == "diffusion_model_output_blocks_3_1_transformer_blocks_0_attn1_to_q"
    assert lora_key_to_ldm(key, "small") == "diffusion_model_output_blocks_2_1_transformer_blocks_0_attn1_to_q"


def test_removed_blocks_and_foreign_keys_give_none():
    assert lora_key_to_ldm("lora_unet_mid_block_attentions_0_proj_in", "small") is None
    assert lora_key_to_ldm("lora_unet_down_blocks_0_resnets_1_conv1", "base") is None
    assert lora_key_to_ldm("lora_unet_mid_block_resnets_1_time_emb_proj", "base") == \
        "diffusion_model_middle_block_2_emb_layers_1"
    assert lora_key_to_ldm("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "small") is None
    assert lora_key_to_ldm("lora_unet_input_blocks_1_1_proj_in", "small") == "diffusion_model_input_blocks_1_1_proj_in"
    assert lora_key_to_ldm("lora_unet_input_blocks_8_1_proj_in", "small") is None  # SD's, removed on BK
