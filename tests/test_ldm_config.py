import importlib

import pytest
import torch
import yaml

from bksdm_ext import layouts
from bksdm_ext.errors import BKSDMError
from bksdm_ext.ldm_config import config_path, shipped_configs, write_yaml_for

# BKSDM.md §1, "The same layouts in LDM form", written out by hand
TABLE = {
    "base": {"num_res_blocks": 1, "channel_mult": [1, 2, 4, 4], "middle": True},
    "small": {"num_res_blocks": 1, "channel_mult": [1, 2, 4, 4], "middle": False},
    "tiny": {"num_res_blocks": 1, "channel_mult": [1, 2, 4], "middle": False},
}


def build(unet_config):
    module, name = unet_config["target"].rsplit(".", 1)
    with torch.device("meta"):
        return getattr(importlib.import_module(module), name)(**unet_config["params"])


def test_shipped_yamls_are_current():
    for path, text in shipped_configs().items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m bksdm_ext.ldm_config"
    assert len(shipped_configs()) == 12


@pytest.mark.parametrize("version", list(layouts.VERSIONS))
@pytest.mark.parametrize("layout", list(TABLE))
def test_shipped_yaml_matches_the_table_and_the_diffusers_student(layout, version):
    config = yaml.safe_load(config_path(layout, version).read_text())["model"]["params"]
    unet = config["unet_config"]
    params = unet["params"]
    assert params["num_res_blocks"] == TABLE[layout]["num_res_blocks"]
    assert params["channel_mult"] == TABLE[layout]["channel_mult"]
    assert params["attention_resolutions"] == [4, 2, 1]
    assert params["context_dim"] == (768 if version == "v1" else 1024)
    assert (config.get("parameterization") == "v") == (version == "v2-768")
    model = build(unet)
    assert (len(model.middle_block) > 0) == TABLE[layout]["middle"]
    assert len(model.input_blocks) == 8 if layout != "tiny" else len(model.input_blocks) == 6

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        student = UNet2DConditionModel(**layouts.unet_config(layout, version))
    expected = {layouts.unet_key_to_ldm(k, layout): v.shape for k, v in student.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected


def test_write_yaml_beside_checkpoint(tmp_path):
    ckpt = tmp_path / "bk-sdm-small.safetensors"
    written = write_yaml_for(ckpt, "small", "v1")
    assert written == tmp_path / "bk-sdm-small.yaml"
    assert written.read_text() == config_path("small", "v1").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["bk-sdm-small.yaml"]  # no temp file left


def test_teacher_has_no_shipped_yaml():
    with pytest.raises(BKSDMError, match="WebUI's own"):
        config_path("teacher", "v1")
