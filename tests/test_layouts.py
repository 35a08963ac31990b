import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.errors import BKSDMError
from bksdm_ext.ldm_config import ldm_model_config

# BKSDM.md §1: exact U-Net parameter counts (random init, diffusers), §6 / App. B: SD without its mid-stage
PARAMETERS = {
    "v1": {"teacher": 859_520_964, "base": 579_384_964, "small": 482_346_884, "tiny": 323_384_964,
           "sd-nomid": 762_482_884},
    "v2-base": {"teacher": 865_910_724, "base": 583_480_964, "small": 485_787_524, "tiny": 326_825_604,
                "sd-nomid": 768_217_284},
}


def meta_unet(layout, version):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**layouts.unet_config(layout, version))


@pytest.mark.parametrize("version", list(PARAMETERS))
@pytest.mark.parametrize("layout", list(layouts.LAYOUTS))
def test_full_size_parameter_counts(layout, version):
    assert sum(p.numel() for p in meta_unet(layout, version).parameters()) == PARAMETERS[version][layout]


def test_v2_768_has_v2_shapes_and_predicts_v():
    assert layouts.unet_config("small", "v2-768")["sample_size"] == 96
    assert layouts.unet_config("small", "v2-768")["upcast_attention"] is True
    assert sum(p.numel() for p in meta_unet("small", "v2-768").parameters()) == PARAMETERS["v2-base"]["small"]
    assert layouts.get_version("v2-768").prediction_type == "v_prediction"


def test_student_config_follows_the_table():
    tiny = layouts.unet_config("tiny", "v2-base")
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert tiny["block_out_channels"] == [320, 640, 1280]
    assert tiny["attention_head_dim"] == [5, 10, 20]
    assert tiny["mid_block_type"] is None and tiny["layers_per_block"] == 1
    small = layouts.unet_config("small", "v1")
    assert small["mid_block_type"] is None and small["block_out_channels"] == [320, 640, 1280, 1280]
    assert layouts.unet_config("base", "v1")["mid_block_type"] == "UNetMidBlock2DCrossAttn"


def test_student_config_keeps_other_teacher_keys_and_refuses_non_sd():
    teacher = dict(layouts.teacher_unet_config("v1"), _name_or_path="x", time_cond_proj_dim=None)
    assert "_name_or_path" not in layouts.student_unet_config(teacher, "base")
    assert "time_cond_proj_dim" in layouts.student_unet_config(teacher, "base")
    with pytest.raises(BKSDMError, match="standard SD"):
        layouts.student_unet_config(layouts.unet_config("base", "v1"), "small")


@pytest.mark.parametrize("layout", list(layouts.LAYOUTS))
def test_key_map_is_a_bijection_onto_the_ldm_model(layout):
    import importlib

    keys = list(meta_unet(layout, "v1").state_dict())
    ldm_keys = [layouts.unet_key_to_ldm(k, layout) for k in keys]
    assert [layouts.unet_key_to_diffusers(k, layout) for k in ldm_keys] == keys
    unet = ldm_model_config(layout, "v1")["model"]["params"]["unet_config"]
    module, name = unet["target"].rsplit(".", 1)
    with torch.device("meta"):
        model = getattr(importlib.import_module(module), name)(**unet["params"])
    assert sorted(model.state_dict()) == sorted(ldm_keys)


def test_key_map_places_blocks_like_the_ldm_numbering():
    # BKSDM.md §1: with num_res_blocks 1: 0 conv_in; 1 R+A; 2 down; 3 R+A; 4 down; 5 R+A; 6 down; 7 R
    to_ldm = lambda k: layouts.unet_key_to_ldm(k, "small")  # noqa: E731
    assert to_ldm("conv_in.weight") == "input_blocks.0.0.weight"
    assert to_ldm("down_blocks.0.attentions.0.proj_in.weight") == "input_blocks.1.1.proj_in.weight"
    assert to_ldm("down_blocks.0.downsamplers.0.conv.weight") == "input_blocks.2.0.op.weight"
    assert to_ldm("down_blocks.3.resnets.0.conv1.weight") == "input_blocks.7.0.in_layers.2.weight"
    assert to_ldm("up_blocks.0.upsamplers.0.conv.bias") == "output_blocks.1.1.conv.bias"
    assert to_ldm("up_blocks.1.upsamplers.0.conv.bias") == "output_blocks.3.2.conv.bias"
    assert to_ldm("up_blocks.3.resnets.1.conv_shortcut.weight") == "output_blocks.7.0.skip_connection.weight"
    with pytest.raises(BKSDMError, match="no place"):
        to_ldm("mid_block.resnets.0.conv1.weight")
    with pytest.raises(BKSDMError, match="no place"):
        layouts.unet_key_to_diffusers("middle_block.0.in_layers.0.weight", "tiny")


def test_feature_kd_pairs_are_the_papers():
    # BKSDM.md §3
    stages = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)]
    stages += [(f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)]
    assert list(layouts.feature_kd_pairs("base")) == stages
    assert list(layouts.feature_kd_pairs("small")) == stages
    assert list(layouts.feature_kd_pairs("tiny")) == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"),
        ("up_blocks.2", "up_blocks.1"),
        ("up_blocks.3", "up_blocks.2"),
    ]


def test_unknown_names_say_what_exists():
    with pytest.raises(BKSDMError, match="base, small, tiny, sd-nomid.*down=2,1,1,2 mid=no"):
        layouts.get_layout("huge")
    with pytest.raises(BKSDMError, match="v1, v2-base, v2-768"):
        layouts.get_version("v3")


def test_mid_removed_layout_is_the_teacher_without_its_mid_block():
    nomid, teacher = layouts.unet_config("sd-nomid", "v1"), layouts.unet_config("teacher", "v1")
    assert nomid == {**teacher, "mid_block_type": None}
    assert layouts.block_map("sd-nomid") == ()
    assert layouts.get_layout("mid=no") is layouts.get_layout("sd-nomid")


# specs other than the named layouts, each valid for SD's shapes
CUSTOM = ["down=2,1,1,2 mid=no", "down=1,2,1,1 mid=yes", "down=2,2,1 mid=yes",
          "down=1,1,1,1 mid=no down_from=1,0,0,1 up_from=01,02,12,01"]


@pytest.mark.parametrize("spec", CUSTOM)
def test_custom_specs_are_canonical_and_shaped_as_they_say(spec):
    from diffusers import UNet2DConditionModel

    lay = layouts.get_layout(spec)
    assert not lay.is_named and lay.name == spec and layouts.get_layout(lay.name) == lay
    config = layouts.unet_config(spec, "v1")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert [len(b.resnets) for b in unet.down_blocks] == list(lay.down)
    assert [len(b.resnets) for b in unet.up_blocks] == [n + 1 for n in reversed(lay.down)]
    assert (unet.mid_block is not None) == lay.mid_block
    # every kept block has a teacher source of the same shape
    with torch.device("meta"):
        teacher = UNet2DConditionModel(**layouts.unet_config("teacher", "v1")).state_dict()
    student = unet.state_dict()
    assert all(teacher[layouts.teacher_key(k, spec)].shape == v.shape for k, v in student.items())


def test_spec_forms_and_defaults():
    assert layouts.get_layout("down=1,1,1 mid=no") is layouts.LAYOUTS["tiny"]
    assert layouts.get_layout("inner=no;mid=no").down == (2, 2, 2)
    assert layouts.get_layout("down=1,1,1,1 up_from=02,02,02,02 mid=no") is layouts.LAYOUTS["small"]
    # up_from alone gives the counts; the name records only what differs from the BK rule
    lay = layouts.get_layout("up_from=01,02,02,02")
    assert lay.down == (1, 1, 1, 1) and lay.name == "down=1,1,1,1 mid=yes up_from=01,02,02,02"


@pytest.mark.parametrize("spec,why", [
    ("down=3,1,1,1", "1 or 2 R-A pairs"),
    ("down=1,1", "2 stages"),
    ("down=1,1,1,1 inner=no", "inner=no but down lists 4"),
    ("down=1,1,1,1 up_from=02,12,02,02", "teacher up block 1 of stage 1 has other channels"),  # pinned by skips
    ("down=1,1,1,1 down_from=0,1,0,0", "teacher down block 1 of stage 1"),
    ("down=1,1,1,1 up_from=02,02,20,02", "distinct teacher blocks 0-2 in order"),
    ("down=2,1,1,1 up_from=02,02,02,02", "stage 0 keeps 2 down pairs, so up_from needs 3"),
    ("mid=maybe", "neither yes nor no"),
    ("size=big", "not one of down="),
])
def test_bad_specs_say_what_is_wrong(spec, why):
    with pytest.raises(BKSDMError, match=why):
        layouts.get_layout(spec)


def test_provenance_in_sd_block_numbering():
    # Small keeps each down stage's first pair and each up stage's first and last block
    small = dict(layouts.ldm_block_sources("small"))
    assert small["input_blocks.3"] == "input_blocks.4" and small["input_blocks.7"] == "input_blocks.10"
    assert small["output_blocks.1"] == "output_blocks.2" and small["output_blocks.7"] == "output_blocks.11"
    custom = dict(layouts.ldm_block_sources("down=1,1,1,1 mid=no down_from=1,0,0,1 up_from=01,02,12,01"))
    assert custom["input_blocks.1"] == "input_blocks.2" and custom["input_blocks.7"] == "input_blocks.11"
    assert custom["output_blocks.1"] == "output_blocks.1" and custom["output_blocks.2"] == "output_blocks.4"
    assert custom["output_blocks.7"] == "output_blocks.10"
    assert dict(layouts.block_sources("small"))["up_blocks.3.attentions.1"] == "up_blocks.3.attentions.2"


def test_feature_kd_pairs_of_a_custom_layout_without_the_innermost_stage():
    assert layouts.feature_kd_pairs("down=2,2,1 mid=yes")[2] == (
        "down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out")
