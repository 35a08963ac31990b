"""The Models view's data from checkpoint headers and timing records (no WebUI, no weights read)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from bksdm_ext import layouts
from bksdm_ext.ldm_config import config_path
from bksdm_ext.report import LayoutCost
from bksdm_ext.timings.store import GenerationRecord
from bksdm_ext.webui.decide import UNET_PREFIX
from bksdm_ext.webui.models_view import models_view

OTHER_PARTS = {"first_stage_model.decoder.conv_in.weight": [512, 4, 3, 3],
               "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": [49408, 768]}


def _unet_shapes(layout, version):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**layouts.unet_config(layout, version))
    return {UNET_PREFIX + layouts.unet_key_to_ldm(k, layout): list(v.shape) for k, v in unet.state_dict().items()}


def write_header_only(path, shapes: dict, metadata: dict | None = None):
    """A safetensors file of full-size shapes whose data is all zeros, written sparsely: the header is real,
    the data takes no disk (the view reads headers only)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return str(path)


COSTS = {}
CUSTOM = "down=2,1,1,2 mid=no"  # a pruned layout (bksdm prune)


def fake_cost(layout, version):
    """Stand-in for the thop count (seconds per U-Net): distinct numbers per layout and version."""
    COSTS.setdefault((layout, version), 0)
    COSTS[(layout, version)] += 1
    return LayoutCost(layout, {"teacher": 1000, "small": 500}.get(layout, 700) * (2 if version != "v1" else 1),
                      {"teacher": 340e9, "small": 218e9}.get(layout, 250e9))


def record(checkpoint, layout, seconds, images=1, **extra):
    values = dict(checkpoint=checkpoint, sampler="DPM++ 2M", schedule="Karras", steps=20, width=512, height=512,
                  total_s=seconds * images, sampling_s=seconds * images * 0.9, unet_calls=20, layout=layout,
                  batch_size=images, device="cpu")
    return GenerationRecord(**{**values, **extra})


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    small = {**_unet_shapes("small", "v1"), **OTHER_PARTS}
    v2 = {**_unet_shapes("base", "v2-base"), **OTHER_PARTS}
    files = {
        "small": write_header_only(folder / "small.safetensors", small),
        "teacher": write_header_only(folder / "teacher.safetensors", {**_unet_shapes("teacher", "v1"), **OTHER_PARTS}),
        "v2-meta": write_header_only(folder / "v2-meta.safetensors", v2, {"bksdm.version": "v2-768"}),
        "v2-yaml": write_header_only(folder / "v2-yaml.safetensors", v2),
        "v2-unknown": write_header_only(folder / "v2-unknown.safetensors", v2),
        "broken": write_header_only(folder / "broken.safetensors", {k: v for k, v in small.items()
                                                                     if "output_blocks.3.1.proj_out" not in k}),
        "lora": write_header_only(folder / "lora.safetensors", {"lora_unet_x.lora_down.weight": [4, 8]}),
        "pruned": write_header_only(folder / "pruned.safetensors", {**_unet_shapes(CUSTOM, "v1"), **OTHER_PARTS},
                                    {"bksdm.layout": CUSTOM}),
    }
    (folder / "v2-yaml.yaml").write_text(config_path("base", "v2-base").read_text())
    (folder / "notes.ckpt").write_bytes(b"not read")
    return {f"{name} [hash]": path for name, path in files.items()} | {"notes": str(folder / "notes.ckpt")}


def test_each_bk_checkpoint_gets_its_layout_version_and_costs_against_sd(listed):
    COSTS.clear()
    rows = {row.checkpoint: row for row in models_view(listed.items(), cost=fake_cost)}
    assert list(rows) == ["small [hash]", "v2-meta [hash]", "v2-yaml [hash]", "v2-unknown [hash]", "broken [hash]",
                          "pruned [hash]"]
    small = rows["small [hash]"]
    assert (small.layout, small.layout_title, small.version) == ("small", "BK-SDM-Small", "v1")
    assert small.unet_parameters == 482_346_884  # counted from the header (diffusers' count of BK-SDM-Small)
    assert (small.sd_unet_parameters, small.unet_macs, small.sd_unet_macs) == (1000, 218e9, 340e9)
    assert small.macs_ratio == pytest.approx(218 / 340) and small.problem is None
    assert small.s_per_image is None and small.speedup is None
    assert [rows[f"{n} [hash]"].version for n in ("v2-meta", "v2-yaml", "v2-unknown")] == ["v2-768", "v2-base", "v2"]
    assert rows["v2-unknown [hash]"].sd_unet_parameters == 2000  # an undecided v2 is counted as v2-base
    assert "2 missing" in rows["broken [hash]"].problem  # proj_out weight and bias
    assert ("base", "v2-768") in COSTS and ("teacher", "v2-768") in COSTS  # each counted at its own version
    pruned = rows["pruned [hash]"]
    assert (pruned.layout, pruned.layout_title, pruned.version, pruned.problem) == (
        CUSTOM, f"Custom ({CUSTOM})", "v1", None)
    assert pruned.unet_parameters < 859_520_964  # fewer than SD-1's U-Net


def test_measured_speed_comes_from_the_timing_records_under_one_condition(listed):
    records = [record("small", "small", 2.0), record("small", "small", 2.2), record("small", "small", 2.4),
               record("teacher", "sd", 3.0, images=2), record("teacher", "sd", 3.4),
               record("small", "small", 9.0, width=768, height=768),  # measured once at another size
               record("teacher", "sd", 1.0, steps=4)]  # another condition: not the reference
    rows = {row.checkpoint: row for row in models_view(listed.items(), records, cost=fake_cost)}
    small = rows["small [hash]"]
    assert small.s_per_image == pytest.approx(2.2)
    assert small.measured == "DPM++ 2M Karras, 20 steps, 512x512, cpu (3 images)"
    assert small.speedup == pytest.approx(3.2 / 2.2)  # SD's median s/image at the same condition
    assert rows["v2-meta [hash]"].s_per_image is None
    assert small.as_dict()["parameter_ratio"] == pytest.approx(482_346_884 / 1000)


def test_the_layout_cost_is_counted_once_per_process():
    from bksdm_ext import report

    report.layout_cost.cache_clear()
    first = report.layout_cost("tiny", "v1", 8)
    assert report.layout_cost("tiny", "v1", 8) is first and report.layout_cost.cache_info().hits == 1
    assert first.parameters < report.layout_cost("teacher", "v1", 8).parameters
