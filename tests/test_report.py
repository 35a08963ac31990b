import json

import torch

from bksdm_ext import layouts
from bksdm_ext.cli import main
from bksdm_ext.pipeline_folder import load_unet
from bksdm_ext.report import format_report, forward_times, layout_costs
from tiny import tiny_unet_config, write_tiny_pipeline

PAPER_MACS_G = {"teacher": 338.7, "base": 223.8, "small": 217.7, "tiny": 205.0}  # BKSDM.md §1


def test_macs_and_parameters_match_the_paper():
    costs = {c.layout: c for c in layout_costs("v1", 64)}
    for layout, macs in PAPER_MACS_G.items():
        assert abs(costs[layout].macs / 1e9 - macs) <= 0.1, layout
    assert costs["small"].parameters == 482_346_884


def test_forward_times_are_measured_for_every_layout():
    configs = {name: tiny_unet_config(name) for name in layouts.LAYOUTS}
    times = forward_times("v1", latent=8, repeats=2, threads=None, unet_configs=configs)
    assert set(times) == set(layouts.LAYOUTS) and all(t > 0 for t in times.values())
    text = format_report(layout_costs("v1", 8), times)
    assert "BK-SDM-Tiny" in text and "time ratio" in text


def test_report_command_prints_each_layout(capsys):
    assert main(["report", "--version", "v2-base", "--latent", "32"]) == 0
    out = capsys.readouterr().out
    assert "32x32" in out
    for title in ("SD (teacher)", "BK-SDM-Base", "BK-SDM-Small", "BK-SDM-Tiny"):
        assert title in out
    assert "583,480,964" in out  # v2 Base


def test_build_student_command_writes_a_loadable_pipeline(tmp_path, capsys):
    teacher = write_tiny_pipeline(tmp_path / "teacher")
    out = tmp_path / "student"
    assert main(["build-student", "--teacher", str(teacher), "--layout", "small", str(out)]) == 0
    student, root = load_unet(out)
    assert root == out and student.mid_block is None
    assert json.loads((out / "unet" / "config.json").read_text())["layers_per_block"] == 1
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "vae" / "config.json").is_file()
    teacher_unet, _ = load_unet(teacher)
    assert torch.equal(student.conv_in.weight, teacher_unet.conv_in.weight)
    assert not list(tmp_path.glob(".*partial"))
    # an existing output is never overwritten
    assert main(["build-student", "--teacher", str(teacher), "--layout", "tiny", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_build_student_refuses_a_non_diffusers_folder(tmp_path, capsys):
    assert main(["build-student", "--teacher", str(tmp_path), "--layout", "base", str(tmp_path / "o")]) == 2
    assert "not a diffusers folder" in capsys.readouterr().err


def test_report_lists_the_mid_removed_layout_with_the_papers_counts(capsys):
    # BKSDM.md §6 (App. B): 762,482,884 (v1) and 768,217,284 (v2) U-Net parameters
    for version, count in (("v1", "762,482,884"), ("v2-base", "768,217,284")):
        assert main(["report", "--version", version, "--latent", "8"]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("SD without mid-stage"))
        assert count in line


def test_report_counts_a_custom_layout(capsys):
    spec = "down=2,1,1,2 mid=no"
    assert main(["report", "--latent", "8", "--layout", spec]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**layouts.unet_config(spec, "v1"))
    assert line.startswith(f"Custom ({spec})") and f"{sum(p.numel() for p in unet.parameters()):,}" in line
    assert main(["report", "--layout", "down=5,1,1,1"]) == 2
    assert "each down stage keeps 1 or 2" in capsys.readouterr().err
