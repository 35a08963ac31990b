"""The WebUI adapter on stand-ins of the Lora extension: an SD LoRA applied to a BK model through the
extension's own loading lands where the block map puts it, on both of its loading paths."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file, save_file

from bksdm_ext import layouts
from bksdm_ext.addons import lora
from bksdm_ext.student import student_state_dict
from bksdm_ext.webui.lora import LoraPatch, infotext
from lora_helpers import kohya_names, lora_layers, merge, random_lora
from tiny import tiny_unet, tiny_unet_config
from webui_standins import NetworkOnDisk, Processing, applied_weights, ldm_unet, lora_extension, sd_model_with


@functools.lru_cache(maxsize=None)
def teacher():
    unet = tiny_unet("teacher", "v1", seed=5)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}, lora_layers(unet)


def ldm_names(layers, layout):
    return {n: "lora_unet_" + layouts.unet_key_to_ldm(n + ".weight", layout)[: -len(".weight")].replace(".", "_")
            for n in layers}


def bk_model(layout):
    """The BK model as the WebUI holds it: an LDM U-Net with the student's weights (not retrained)."""
    weights, _ = teacher()
    unet = ldm_unet(tiny_unet_config(layout))
    keys = [layouts.unet_key_to_diffusers(k, layout) for k in unet.state_dict()]
    student = student_state_dict(weights, keys, layout)
    unet.load_state_dict({layouts.unet_key_to_ldm(k, layout): v for k, v in student.items()})
    return sd_model_with(unet), keys


def sd_lora_file(tmp_path, naming, name="sd-lora"):
    weights, layers = teacher()
    names = kohya_names(layers) if naming == "kohya" else ldm_names(layers, "teacher")
    tensors = random_lora(layers, names, seed=11)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path, tensors, names


def extension(sd_model, layout, **kwargs):
    said = []
    networks, sd_models = lora_extension(sd_model, lambda filename: load_file(str(filename)))
    current = {"layout": layout}
    patch = LoraPatch(networks, sd_models, lambda: current["layout"], say=said.append, **kwargs)
    return networks, sd_models, patch, current, said


@pytest.mark.parametrize("layout,naming", [("small", "kohya"), ("small", "ldm"), ("tiny", "kohya"), ("tiny", "ldm"),
                                           ("base", "ldm")])
def test_sd_lora_through_the_extension_equals_the_student_of_the_merged_teacher(tmp_path, layout, naming):
    sd_model, keys = bk_model(layout)
    path, tensors, names = sd_lora_file(tmp_path, naming)
    networks, _, patch, _, said = extension(sd_model, layout)
    patch.install()
    networks.available_networks["sd-lora"] = NetworkOnDisk("sd-lora", str(path))
    networks.load_networks(["sd-lora"])
    got = applied_weights(sd_model, networks.loaded_networks[0])

    weights, layers = teacher()
    expected = student_state_dict(merge(weights, tensors, names), keys, layout)
    worst = max((got[layouts.unet_key_to_ldm(k, layout)] - v).abs().max().item() for k, v in expected.items())
    assert worst <= 1e-6
    placement = lora.remap(tensors, "teacher", layout)
    assert said == [f"[BK-SDM] LoRA {placement.summary('sd-lora')} (made for SD, from its keys)"]
    p = Processing()
    infotext(networks, p)
    assert p.extra_generation_params == {"BK-SDM LoRA": placement.summary("sd-lora")}
    assert ", " in placement.summary("sd-lora") and "in removed blocks" in placement.summary("sd-lora")


def test_without_the_patch_an_ldm_named_sd_lora_lands_on_other_blocks(tmp_path):
    # the control for the test above: the extension alone matches SD's LDM names to BK's by number,
    # so SD's output_blocks.N meets BK's output_blocks.N, another block with other channels
    sd_model, _ = bk_model("small")
    path, *_ = sd_lora_file(tmp_path, "ldm")
    networks, *_ = extension(sd_model, "small")
    networks.available_networks["sd-lora"] = NetworkOnDisk("sd-lora", str(path))
    networks.load_networks(["sd-lora"])
    assert "diffusion_model_output_blocks_5_1_proj_in" in networks.loaded_networks[0].modules
    with pytest.raises(RuntimeError, match="shape"):
        applied_weights(sd_model, networks.loaded_networks[0])


def test_a_bk_lora_is_applied_unchanged_and_an_ambiguous_one_says_so(tmp_path):
    sd_model, _ = bk_model("small")
    module = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{module}.lora_down.weight": torch.randn(2, 32), f"{module}.lora_up.weight": torch.randn(32, 2),
               f"{module}.alpha": torch.tensor(2.0)}
    save_file(tensors, str(tmp_path / "ours.safetensors"))
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    networks, sd_models, patch, _, said = extension(sd_model, "small", from_sd=lambda name: name == "forced")
    patch.install()
    networks.available_networks.update(
        ours=NetworkOnDisk("ours", str(tmp_path / "ours.safetensors"), {lora.METADATA_LAYOUT: "small"}),
        partial=NetworkOnDisk("partial", str(tmp_path / "partial.safetensors")))
    networks.load_networks(["ours", "partial"])
    ours, partial = networks.loaded_networks
    assert set(ours.modules) == set(partial.modules) == {"diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"}
    assert all(torch.equal(ours.modules[k][part], tensors[f"{module}.{part}"])
               for k in ours.modules for part in ours.modules[k])
    assert len(said) == 1 and "fit both SD and BK-SDM-Small" in said[0] and "'LoRAs made for SD'" in said[0]
    p = Processing()
    infotext(networks, p)
    assert p.extra_generation_params == {}  # nothing was moved or dropped
    assert p.comments == [f"BK-SDM: LoRA partial: {partial.bksdm_report.note()}"]
    # the file is read as it is outside load_network
    assert sd_models.read_state_dict(str(tmp_path / "ours.safetensors")).keys() == tensors.keys()


def test_a_network_loaded_for_another_model_is_loaded_again(tmp_path):
    sd_model, _ = bk_model("small")
    path, *_ = sd_lora_file(tmp_path, "kohya")
    networks, _, patch, current, _ = extension(sd_model, None)
    patch.install()
    networks.available_networks["sd-lora"] = NetworkOnDisk("sd-lora", str(path))
    networks.load_networks(["sd-lora"])  # on an SD model: the extension as it is
    on_sd = networks.loaded_networks[0]
    assert not hasattr(on_sd, "bksdm_report")
    current["layout"] = "small"  # the user switched to BK-SDM-Small
    networks.load_networks(["sd-lora"])
    on_bk = networks.loaded_networks[0]
    assert on_bk is not on_sd and on_bk.bksdm_layout == "small"
    networks.load_networks(["sd-lora"])
    assert networks.loaded_networks[0] is on_bk  # and cached again while the model stays


def test_the_name_conversion_never_falls_back_to_sd_numbering():
    sd_model, _ = bk_model("small")
    networks, _, patch, current, _ = extension(sd_model, "small")
    patch.install()
    convert = networks.convert_diffusers_name_to_compvis
    assert convert("lora_unet_up_blocks_1_attentions_1_proj_in", False) == "diffusion_model_output_blocks_3_1_proj_in"
    assert convert("lora_unet_up_blocks_1_attentions_2_proj_in", False) == "lora_unet_up_blocks_1_attentions_2_proj_in"
    assert convert("lora_te_text_model_encoder_layers_0_mlp_fc1", False) == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    current["layout"] = None
    assert convert("lora_unet_up_blocks_1_attentions_2_proj_in", False) == "diffusion_model_output_blocks_5_1_proj_in"
