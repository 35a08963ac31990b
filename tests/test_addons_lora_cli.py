"""`bksdm lora remap IN OUT --layout L`."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bksdm_ext.addons import lora
from bksdm_ext.cli import main

MODULES = ("up_blocks_1_attentions_2_proj_out", "up_blocks_1_attentions_1_proj_out", "mid_block_resnets_0_conv1")


def sd_lora(path):
    tensors = {}
    for i, m in enumerate(MODULES):
        tensors[f"lora_unet_{m}.lora_down.weight"] = torch.full((2, 8), float(i))
        tensors[f"lora_unet_{m}.lora_up.weight"] = torch.full((8, 2), float(i))
        tensors[f"lora_unet_{m}.alpha"] = torch.tensor(1.0)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(3.0)
    save_file(tensors, str(path), {"ss_output_name": "detail", "ss_network_dim": "2"})
    return tensors


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("naming,placed", [
    (None, "lora_unet_up_blocks_1_attentions_1_proj_out"),
    ("ldm", "lora_unet_output_blocks_3_1_proj_out"),
])
def test_remap_writes_the_placed_lora_with_our_metadata(tmp_path, capsys, naming, placed):
    src, dst = tmp_path / "detail.safetensors", tmp_path / "detail-small.safetensors"
    tensors = sd_lora(src)
    assert main(["lora", "remap", str(src), str(dst), "--layout", "small"] + (["--naming", naming] if naming else [])) == 0
    out = load_file(str(dst))
    # SD's attentions.2 is Small's attentions.1; SD's attentions.1 and the mid block have no place
    assert set(out) == {f"{placed}.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha")} | {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"}
    assert torch.equal(out[f"{placed}.lora_down.weight"], tensors["lora_unet_up_blocks_1_attentions_2_proj_out.lora_down.weight"])
    meta = metadata(dst)
    assert meta[lora.METADATA_LAYOUT] == "small" and meta[lora.METADATA_REMAPPED_FROM] == "teacher"
    assert meta["ss_output_name"] == "detail"
    printed = capsys.readouterr().out
    assert "made for SD (from its keys)" in printed and "detail 1 of 3 modules placed, 2 in removed blocks" in printed
    # the result is read back as made for Small and applies unchanged
    again = lora.made_for(out, meta, "small")
    assert again.reason == "metadata" and not lora.remap(out, again.layout, "small").changed


def test_remap_refusals(tmp_path, capsys):
    src = tmp_path / "detail.safetensors"
    sd_lora(src)
    assert main(["lora", "remap", str(src), str(src), "--layout", "small"]) == 2
    assert "new file" in capsys.readouterr().err
    assert main(["lora", "remap", str(src), str(tmp_path / "x.pt"), "--layout", "small"]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["lora", "remap", str(tmp_path / "none.safetensors"), str(tmp_path / "y.safetensors"),
                 "--layout", "small"]) == 2
    assert "does not exist" in capsys.readouterr().err
    only_removed = tmp_path / "mid.safetensors"
    save_file({"lora_unet_mid_block_resnets_0_conv1.alpha": torch.tensor(1.0)}, str(only_removed))
    assert main(["lora", "remap", str(only_removed), str(tmp_path / "z.safetensors"), "--layout", "tiny",
                 "--from", "teacher"]) == 2
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "z.safetensors").exists()
