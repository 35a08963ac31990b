import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.errors import BKSDMError
from bksdm_ext.student import build_student, student_state_dict
from tiny import tiny_unet


@pytest.mark.parametrize("layout,count", [("base", 442), ("small", 396), ("tiny", 358)])
@pytest.mark.parametrize("version", ["v1", "v2-base"])
def test_block_map_sources_every_full_size_student_tensor(layout, count, version):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        teacher = UNet2DConditionModel(**layouts.teacher_unet_config(version))
        student = UNet2DConditionModel(**layouts.unet_config(layout, version))
    teacher_shapes = {k: v.shape for k, v in teacher.state_dict().items()}
    student_shapes = {k: v.shape for k, v in student.state_dict().items()}
    assert len(student_shapes) == count
    for key, shape in student_shapes.items():
        assert teacher_shapes[layouts.teacher_key(key, layout)] == shape, key


def test_block_map_matches_the_paper():
    # BKSDM.md §2, written out by hand
    base = dict(layouts.block_map("base"))
    assert base == {
        "up_blocks.0.resnets.1": "up_blocks.0.resnets.2",
        **{f"up_blocks.{i}.{p}.1": f"up_blocks.{i}.{p}.2" for i in (1, 2, 3) for p in ("resnets", "attentions")},
    }
    assert dict(layouts.block_map("small")) == base
    tiny = dict(layouts.block_map("tiny"))
    expected = {}
    for i in (0, 1, 2):
        for p in ("resnets", "attentions"):
            expected[f"up_blocks.{i}.{p}.0"] = f"up_blocks.{i + 1}.{p}.0"
            expected[f"up_blocks.{i}.{p}.1"] = f"up_blocks.{i + 1}.{p}.2"
    expected.update({"up_blocks.0.upsamplers": "up_blocks.1.upsamplers",
                     "up_blocks.1.upsamplers": "up_blocks.2.upsamplers"})
    assert tiny == expected


@pytest.mark.parametrize("layout", ["base", "small", "tiny"])
def test_build_student_copies_teacher_tensors_bitwise(layout):
    teacher = tiny_unet("teacher", "v1")
    student, report = build_student(teacher, layout)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    assert report.copied == len(student_state)
    for key, tensor in student_state.items():
        assert torch.equal(tensor, teacher_state[layouts.teacher_key(key, layout)]), key
    # a copy, not a view: training the student must not change the teacher
    next(student.parameters()).data.add_(1)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))
    assert report.parameters == sum(p.numel() for p in student.parameters())


def test_report_names_what_was_dropped():
    _, small = build_student(tiny_unet("teacher", "v1"), "small")
    assert "mid_block" in small.dropped
    assert "down_blocks.0.resnets.1" in small.dropped and "up_blocks.0.resnets.1" in small.dropped
    assert "up_blocks.0.resnets.2" not in small.dropped
    _, tiny = build_student(tiny_unet("teacher", "v1"), "tiny")
    assert "down_blocks.3.resnets.0" in tiny.dropped and "down_blocks.2.downsamplers.0" in tiny.dropped
    assert "up_blocks.0.resnets.0" in tiny.dropped  # the teacher's innermost up stage
    assert "Tiny" in tiny.summary()


def test_tiny_student_runs_and_keeps_shapes():
    student, _ = build_student(tiny_unet("teacher", "v2-base"), "tiny")
    x = torch.randn(1, 4, 8, 8)
    out = student(x, 10, encoder_hidden_states=torch.randn(1, 3, 32)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_refuses_teacher_layout_and_non_sd_teacher():
    with pytest.raises(BKSDMError, match="student layout"):
        build_student(tiny_unet("teacher"), "teacher")
    with pytest.raises(BKSDMError, match="standard SD"):
        build_student(tiny_unet("base"), "small")
    with pytest.raises(BKSDMError, match="no source"):
        student_state_dict({}, ["conv_in.weight"], "small")
