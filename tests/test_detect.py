"""Layout and version detection from U-Net state dicts in both key namings (bksdm_ext.detect)."""

import pytest
import torch

from bksdm_ext import detect, layouts
from bksdm_ext.errors import BKSDMError
from tiny import CROSS_DIM, TINY_CHANNELS, tiny_unet

CASES = [(layout, family) for family in ("v1", "v2-base") for layout in layouts.LAYOUTS]


def _namings(unet: dict, layout: str) -> dict[str, dict]:
    ldm = {layouts.unet_key_to_ldm(k, layout): v for k, v in unet.items()}
    return {
        "diffusers": unet,
        "unet.": {"unet." + k: v for k, v in unet.items()},
        "ldm": ldm,
        "model.diffusion_model.": {"model.diffusion_model." + k: v for k, v in ldm.items()},
    }


@pytest.fixture(scope="module")
def tiny_unets():
    return {case: tiny_unet(*case).state_dict() for case in CASES}


@pytest.mark.parametrize("layout,version", CASES)
def test_tiny_layouts_are_detected_from_both_namings(tiny_unets, layout, version):
    stages = layouts.get_layout(layout).stages
    for form, state_dict in _namings(tiny_unets[layout, version], layout).items():
        found = detect.detect_unet(state_dict)
        assert (found.layout, found.family) == (layout, version[:2]), form
        assert found.naming == ("ldm" if "ldm" in form or "model." in form else "diffusers")
        assert found.prefix == (form if form.endswith(".") else "")
        assert found.channels == tuple(TINY_CHANNELS[:stages]) and found.cross_attention_dim == CROSS_DIM
        assert found.complete and not found.full_size


@pytest.mark.slow
@pytest.mark.parametrize("version", list(layouts.VERSIONS))
def test_full_size_layouts_are_detected_from_both_namings(version):
    from diffusers import UNet2DConditionModel

    v = layouts.get_version(version)
    for layout in layouts.LAYOUTS:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**layouts.unet_config(layout, version)).state_dict()
        for form, state_dict in _namings(unet, layout).items():
            found = detect.detect_unet(state_dict)
            assert (found.layout, found.family, found.cross_attention_dim) == (layout, v.family, v.cross_attention_dim)
            assert found.full_size and found.complete, (layout, form)


def test_key_check_reports_missing_unexpected_and_mismatched_in_the_files_naming(tiny_unets):
    state_dict = _namings(dict(tiny_unets["small", "v1"]), "small")["model.diffusion_model."]
    del state_dict["model.diffusion_model.output_blocks.3.1.proj_out.bias"]
    state_dict["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(1)
    state_dict["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    state_dict["cond_stage_model.transformer.x"] = torch.zeros(1)  # other components are not the U-Net's business
    found = detect.detect_unet(state_dict)
    assert found.layout == "small" and not found.complete
    assert found.missing == ("model.diffusion_model.output_blocks.3.1.proj_out.bias",)
    assert found.unexpected == ("model.diffusion_model.input_blocks.1.1.extra.weight",)
    assert found.mismatched == (("model.diffusion_model.out.2.weight", (4, 32, 1, 1), (4, 32, 3, 3)),)


def test_unknown_layout_names_what_was_found_and_what_is_supported(tiny_unets):
    teacher = tiny_unets["teacher", "v1"]
    # a third R-A pair in stage 0: no layout of SD's blocks has one
    extra = {**teacher, "down_blocks.0.resnets.2.conv1.weight": torch.zeros(32, 32, 3, 3)}
    with pytest.raises(BKSDMError) as error:
        detect.detect_unet(extra)
    message = str(error.value)
    assert "4 stages with [3, 2, 2, 2] R(+A) blocks per down stage and a middle block" in message
    assert "small (4 stages, 1 per down stage, no middle block)" in message
    assert "or a custom layout of SD's blocks" in message


def test_mid_removed_and_custom_layouts_are_detected_from_shapes(tiny_unets):
    teacher = tiny_unets["teacher", "v1"]
    no_mid = {k: v for k, v in teacher.items() if not k.startswith("mid_block.")}
    found = detect.detect_unet(no_mid)
    assert found.layout == "sd-nomid" and found.complete
    ldm = _namings(teacher, "teacher")["ldm"]
    # stage 0 keeps one pair: input_blocks.2 gone, the rest not renumbered, so the key check says so
    three = detect.detect_unet({k: v for k, v in ldm.items() if not k.startswith("input_blocks.2.")})
    assert three.layout == "down=1,2,2,2 mid=yes" and not three.complete


def test_non_sd_sdxl_and_inpainting_are_named(tiny_unets):
    with pytest.raises(BKSDMError, match="No Stable Diffusion U-Net found.*2 tensors like fc.weight"):
        detect.detect_unet({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})
    unet = dict(tiny_unets["teacher", "v1"])
    with pytest.raises(BKSDMError, match="SDXL"):
        detect.detect_unet({**unet, "add_embedding.linear_1.weight": torch.zeros(1)})
    with pytest.raises(BKSDMError, match="SDXL checkpoint"):
        detect.detect_unet({"conditioner.embedders.0.transformer.x": torch.zeros(1)})
    unet["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(BKSDMError, match="inpainting U-Net \\(9 input channels\\)"):
        detect.detect_unet(unet)


def test_version_sources_in_order(tiny_unets):
    v1 = tiny_unets["base", "v1"]
    assert detect.resolve_version(detect.detect_unet(v1), v1) == detect.VersionDecision("v1", "shapes")
    v2 = tiny_unets["base", "v2-base"]
    found = detect.detect_unet(v2)
    assert detect.resolve_version(found, v2, requested="v2-768") == detect.VersionDecision("v2-768", "requested")
    by_metadata = detect.resolve_version(found, v2, {"bksdm.version": "v2-768"})
    assert by_metadata == detect.VersionDecision("v2-768", "metadata")
    assert detect.resolve_version(found, v2, {"bksdm.prediction_type": "v_prediction"}).version == "v2-768"
    by_scheduler = detect.resolve_version(found, v2, scheduler_config={"prediction_type": "v_prediction"})
    assert by_scheduler == detect.VersionDecision("v2-768", "scheduler config")
    with pytest.raises(BKSDMError, match="metadata version v1 does not fit"):
        detect.resolve_version(found, v2, {"bksdm.version": "v1"})


def test_test_forward_tells_v_from_epsilon_as_the_webui_does(tiny_unets):
    unet = dict(tiny_unets["tiny", "v2-base"])
    found = detect.detect_unet(unet)
    assert detect.resolve_version(found, unet) == detect.VersionDecision("v2-base", "test forward")
    # a v model answers about minus the clean image at t=999: push the output down as one would
    unet["conv_out.bias"] = torch.full((4,), -3.0)
    assert detect.resolve_version(found, unet) == detect.VersionDecision("v2-768", "test forward")
    del unet["conv_out.bias"]
    with pytest.raises(BKSDMError, match="--version v2-base or v2-768"):
        detect.resolve_version(detect.detect_unet(unet), unet)
