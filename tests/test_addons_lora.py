"""SD LoRAs on BK layouts: teacher + LoRA, made a student, equals the student + the remapped LoRA."""

from __future__ import annotations

import functools

import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.addons import lora
from bksdm_ext.errors import BKSDMError
from bksdm_ext.student import student_state_dict
from lora_helpers import kohya_names, lora_layers, merge, peft_names, random_lora
from tiny import tiny_unet, tiny_unet_config

STUDENTS = ("base", "small", "tiny")


def ldm_names(layers, layout) -> dict[str, str]:
    return {n: "lora_unet_" + layouts.unet_key_to_ldm(n + ".weight", layout)[: -len(".weight")].replace(".", "_")
            for n in layers}


NAMES = {"kohya": lambda layers, layout: kohya_names(layers), "ldm": ldm_names,
         "peft": lambda layers, layout: peft_names(layers)}


@pytest.fixture(scope="module", params=["v1", "v2-base"])
def teacher(request):
    unet = tiny_unet("teacher", request.param, seed=3)
    return request.param, {k: v.detach().clone() for k, v in unet.state_dict().items()}, lora_layers(unet)


@functools.lru_cache(maxsize=None)
def student_layers(layout: str, version: str) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return lora_layers(UNet2DConditionModel(**tiny_unet_config(layout, version)))


@pytest.mark.parametrize("naming", ["kohya", "ldm", "peft"])
@pytest.mark.parametrize("layout", STUDENTS)
def test_student_of_merged_teacher_equals_student_plus_remapped_lora(teacher, layout, naming):
    version, teacher_weights, teacher_layers = teacher
    layers = student_layers(layout, version)
    file_names = NAMES[naming](teacher_layers, "teacher")
    sd_lora = random_lora(teacher_layers, file_names, seed=7, peft=naming == "peft")
    student_keys = tiny_student_keys(layout, version)
    # the student built (as `build_student` does) from the teacher with the LoRA merged in
    expected = student_state_dict(merge(teacher_weights, sd_lora, file_names), student_keys, layout)
    out = "ldm" if naming == "ldm" else "kohya"
    placement = lora.remap(sd_lora, "teacher", layout, out)
    placed = merge(student_state_dict(teacher_weights, student_keys, layout), placement.tensors,
                   NAMES[out](layers, layout))

    assert placed.keys() == expected.keys()
    worst = max((placed[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6
    # every layer the student kept got its LoRA (LoCon on every conv included) ...
    assert len(placement.placed) == len(layers) and not placement.unknown
    # ... and the dropped modules are exactly those of the teacher blocks the student removed
    kept = {layouts.teacher_key(n + ".weight", layout)[: -len(".weight")] for n in layers}
    removed = set(teacher_layers) - kept
    assert removed and {m for m, k in file_names.items() if k in placement.removed} == removed
    assert placement.summary("x") == f"x {len(layers)} of {len(teacher_layers)} modules placed, " \
                                     f"{len(removed)} in removed blocks"


@functools.lru_cache(maxsize=None)
def tiny_student_keys(layout: str, version: str) -> tuple[str, ...]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return tuple(UNet2DConditionModel(**tiny_unet_config(layout, version)).state_dict())


def test_lyco_modules_are_renamed_with_their_tensors_untouched():
    hada = {f"lora_unet_up_blocks_1_attentions_2_proj_out.{part}": torch.randn(3, 3)
            for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha")}
    placement = lora.remap(hada, "teacher", "small", "kohya")
    assert {k.split(".", 1)[0] for k in placement.tensors} == {"lora_unet_up_blocks_1_attentions_1_proj_out"}
    for key, tensor in placement.tensors.items():
        assert tensor is hada["lora_unet_up_blocks_1_attentions_2_proj_out." + key.split(".", 1)[1]]


def test_a_bk_trained_lora_is_unchanged():
    from bksdm_ext.train.dreambooth import UNET_LORA_TARGETS
    from bksdm_ext.train.lora import add_lora, webui_lora_state_dict

    student = tiny_unet("small", "v1", seed=1)
    add_lora(student, 4, 4.0, UNET_LORA_TARGETS)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    tensors = webui_lora_state_dict(student, None, "small")
    decided = lora.made_for(tensors, {lora.METADATA_LAYOUT: "small"}, "small")
    assert (decided.layout, decided.reason) == ("small", "metadata")
    placement = lora.remap(tensors, decided.layout, "small", "ldm")
    assert placement.tensors.keys() == tensors.keys() and not placement.changed
    assert all(placement.tensors[k] is tensors[k] for k in tensors)
    # without our metadata its keys name blocks only Small has; a part of it fits SD too: Small, with a note
    assert lora.made_for(tensors, {}, "small") == lora.MadeFor("small", "keys")
    partial = {k: v for k, v in tensors.items() if k.startswith("lora_unet_input_blocks_1_1_")}
    guessed = lora.made_for(partial, {}, "small")
    assert guessed.layout == "small" and guessed.ambiguous and "fit both SD and BK-SDM-Small" in guessed.note
    assert lora.made_for(partial, {}, "small", from_sd=True).layout == "teacher"


def _sd_lora_keys(*modules) -> dict:
    return {f"lora_unet_{m}.{part}": torch.zeros(1) for m in modules for part in ("lora_down.weight", "alpha")}


def test_the_layout_a_lora_was_made_for():
    full_sd = _sd_lora_keys("down_blocks_0_attentions_1_proj_in", "up_blocks_1_attentions_2_proj_out")
    assert lora.made_for(full_sd, {}, "small") == lora.MadeFor("teacher", "keys")
    assert lora.made_for(_sd_lora_keys("mid_block_attentions_0_proj_in"), {}, "small").layout == "teacher"
    assert lora.made_for(_sd_lora_keys("mid_block_attentions_0_proj_in"), {}, "base").layout == "base"  # fits both
    assert lora.made_for(_sd_lora_keys("up_blocks_0_resnets_2_conv1"), {}, "tiny").layout == "teacher"
    ldm_sd = _sd_lora_keys("output_blocks_11_1_proj_in", "input_blocks_1_1_proj_in")
    assert lora.made_for(ldm_sd, {}, "small").layout == "teacher"
    # a kohya base-model hash names a model; the caller knows its layout
    assert lora.made_for(full_sd, {"ss_sd_model_hash": "ABCD1234"}, "small", base_layout="tiny").layout == "tiny"
    assert lora.base_model_hashes({"ss_sd_model_hash": "ABCD1234", "ss_new_sd_model_hash": "ff"}) == ["ff", "abcd1234"]
    # a published SD checkpoint's hash (sha256 or the legacy one) marks SD's layout, also for a partial LoRA
    # whose keys alone would be taken as made for the BK layout
    partial = _sd_lora_keys("down_blocks_0_attentions_0_proj_in")
    assert lora.made_for(partial, {}, "small").layout == "small"
    for sd15 in ({"ss_new_sd_model_hash": "6CE0161689B3853ACAA03779EC93EAFE75A02F4CED659BEE03F50797806FA2FA"},
                 {"ss_sd_model_hash": "81761151"}):
        assert lora.published_base_model(sd15).startswith("SD-v1.5")
        assert lora.made_for(partial, sd15, "small") == lora.MadeFor("teacher", "base model")
    assert lora.published_base_model({"ss_sd_model_hash": "12345678"}) is None
    assert lora.made_for(partial, {"ss_sd_model_hash": "81761151"}, "small", base_layout="tiny").layout == "tiny"
    assert lora.made_for(full_sd, {lora.METADATA_LAYOUT: "Base"}, "small") == lora.MadeFor("base", "metadata")
    # a Tiny-trained LoRA on Small goes through the teacher blocks both come from
    tiny_lora = _sd_lora_keys("up_blocks_0_attentions_1_proj_in")
    assert lora.made_for(tiny_lora, {}, "small").layout in ("small", "tiny")
    text_only = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.zeros(1)}
    assert lora.made_for(text_only, {}, "small").layout == "small"


def test_tiny_lora_on_small_goes_through_the_teacher_block():
    placement = lora.remap(_sd_lora_keys("up_blocks_0_attentions_1_proj_in"), "tiny", "small", "kohya")
    # Tiny's up_blocks.0 is the teacher's up_blocks.1, its attentions.1 the teacher's attentions.2
    assert set(placement.tensors) == {f"lora_unet_up_blocks_1_attentions_1_proj_in.{p}" for p in ("lora_down.weight",
                                                                                                 "alpha")}


def test_text_encoder_and_unknown_keys():
    tensors = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.ones(1),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1),
               "lora_unet_no_such_block_0.alpha": torch.ones(1),
               "bundle_emb.cat.string_to_param.*": torch.ones(1)}
    placement = lora.remap(tensors, "teacher", "small", "kohya")
    assert placement.unknown == ["lora_unet_no_such_block_0"]
    assert set(placement.tensors) == {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                                      "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                                      "bundle_emb.cat.string_to_param.*"}
    assert placement.summary("n") == "n 0 of 1 modules placed, 1 not understood"


def test_mixed_namings_and_unknown_layouts_are_refused():
    mixed = _sd_lora_keys("up_blocks_1_attentions_2_proj_out", "output_blocks_5_1_proj_out")
    with pytest.raises(BKSDMError, match="mixes"):
        lora.remap(mixed, "teacher", "small")
    with pytest.raises(BKSDMError, match="Unknown layout"):
        lora.remap({}, "teacher", "medium")
    with pytest.raises(BKSDMError, match="naming"):
        lora.remap(_sd_lora_keys("conv_in"), "teacher", "small", "comfy")
