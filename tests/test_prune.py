"""`bksdm prune`: the mid-removed layout and custom layouts, from SD checkpoints and folders (bksdm_ext.prune)."""

import importlib

import pytest
import torch
import yaml

from bksdm_ext import detect, io, layouts
from bksdm_ext.cli import main
from bksdm_ext.convert import checkpoint, convert, load_model
from bksdm_ext.ldm_config import yaml_for
from bksdm_ext.model_info import model_info
from bksdm_ext.prune import layout_to_keep, prune
from tiny import CROSS_DIM, tiny_unet, write_tiny_pipeline

CUSTOM = ["down=2,1,1,2 mid=no", "down=1,2,1,1 mid=yes", "down=2,2,1 mid=yes",
          "down=1,1,1,1 mid=no down_from=1,0,0,1 up_from=01,02,12,01"]


def _ldm_unet_from_yaml(path):
    params = yaml.safe_load(path.read_text())["model"]["params"]["unet_config"]
    module, name = params["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**params["params"]).eval()


def _unet_tensors(file):
    tensors, metadata = io.read_safetensors(file)
    return {k[len(checkpoint.UNET_PREFIX):]: v for k, v in tensors.items() if k.startswith(checkpoint.UNET_PREFIX)}, metadata


def _inputs():
    torch.manual_seed(3)
    return torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, CROSS_DIM)


def test_removing_mid_loads_strictly_from_its_yaml_and_equals_diffusers_without_a_mid_block(tmp_path, tiny_pipeline_v1):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "nomid.safetensors"
    assert main(["prune", str(tiny_pipeline_v1), str(out), "--remove", "mid"]) == 0
    unet, metadata = _unet_tensors(out)
    assert metadata["bksdm.layout"] == "sd-nomid" and not any(k.startswith("middle_block.") for k in unet)
    ldm_unet = _ldm_unet_from_yaml(out.with_suffix(".yaml"))
    ldm_unet.load_state_dict(unet, strict=True)
    # the diffusers U-Net without a mid block, on the teacher's own weights
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_v1 / "unet").eval()
    reference = UNet2DConditionModel(**{**teacher.config, "mid_block_type": None}).eval()
    reference.load_state_dict({k: v for k, v in teacher.state_dict().items() if not k.startswith("mid_block.")})
    x, t, context = _inputs()
    with torch.no_grad():
        delta = (ldm_unet(x, t, context=context) - reference(x, t, encoder_hidden_states=context).sample).abs().max()
    assert delta <= 1e-5
    # copied, not retrained: every kept tensor is the teacher's
    assert all(torch.equal(v, teacher.state_dict()[layouts.unet_key_to_diffusers(k, "sd-nomid")]) for k, v in unet.items())
    assert model_info(out).detection.layout == "sd-nomid"


def test_prune_from_a_single_file_keeps_its_precision(tmp_path, tiny_pipeline_v1):
    sd = tmp_path / "sd.safetensors"
    convert(tiny_pipeline_v1, sd, half=True)
    out = tmp_path / "sd-nomid.safetensors"
    prune(sd, out, layout_to_keep(remove="mid"), say=lambda line: None)
    unet, _ = _unet_tensors(out)
    assert all(v.dtype == torch.float16 for v in unet.values())
    assert load_model(out).detection.layout == "sd-nomid"


@pytest.mark.parametrize("spec", CUSTOM)
def test_custom_spec_round_trips_through_build_convert_detect_and_load(tmp_path, tiny_pipeline_v1, spec):
    from diffusers import UNet2DConditionModel

    lay = layouts.get_layout(spec)
    single = tmp_path / "custom.safetensors"
    prune(tiny_pipeline_v1, single, spec, say=lambda line: None)
    unet, metadata = _unet_tensors(single)
    assert metadata["bksdm.layout"] == lay.name
    # the yaml written beside the file builds it strictly, and the WebUI's pick is that yaml
    ldm_unet = _ldm_unet_from_yaml(single.with_suffix(".yaml"))
    ldm_unet.load_state_dict(unet, strict=True)
    # build: each kept block is the teacher block the provenance names
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_v1 / "unet").state_dict()
    diffusers_unet = {layouts.unet_key_to_diffusers(k, lay): v for k, v in unet.items()}
    assert all(torch.equal(v, teacher[layouts.teacher_key(k, lay)]) for k, v in diffusers_unet.items())
    # convert to a folder and back: bitwise, and detected as the same layout each time
    folder = tmp_path / "folder"
    convert(single, folder, tokenizer=tiny_pipeline_v1)
    back = tmp_path / "back.safetensors"
    convert(folder, back)
    assert load_model(folder).detection.layout == lay.name
    again, metadata = _unet_tensors(back)
    assert metadata["bksdm.layout"] == lay.name and all(torch.equal(again[k], v) for k, v in unet.items())
    # the diffusers U-Net and the LDM one compute the same
    reference = UNet2DConditionModel(**layouts.student_unet_config(
        UNet2DConditionModel.load_config(tiny_pipeline_v1 / "unet"), lay)).eval()
    reference.load_state_dict(diffusers_unet, strict=True)
    x, t, context = _inputs()
    with torch.no_grad():
        delta = (ldm_unet(x, t, context=context) - reference(x, t, encoder_hidden_states=context).sample).abs().max()
    assert delta <= 1e-5


def test_metadata_decides_between_layouts_of_one_shape(tmp_path, tiny_pipeline_v1):
    spec = "down=1,1,1,1 mid=no down_from=1,0,0,1 up_from=01,02,12,01"  # shaped like BK-SDM-Small
    out = tmp_path / "c.safetensors"
    prune(tiny_pipeline_v1, out, spec, say=lambda line: None)
    tensors, metadata = io.read_safetensors(out)
    assert detect.detect_unet(tensors).layout == "small"  # shapes alone
    assert detect.detect_unet(tensors, metadata).layout == spec
    assert model_info(out).detection.layout == spec


def test_custom_yaml_is_generated_when_none_is_beside_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BKSDM_CONFIG_DIR", str(tmp_path / "generated"))
    spec = "down=2,1,1,2 mid=no"
    path = yaml_for(spec, "v1")
    assert path.parent == tmp_path / "generated" and "down=" not in path.name and " " not in path.name
    assert yaml_for(spec, "v1") == path and yaml_for(spec, "v2-base") != path
    beside = tmp_path / "m.yaml"
    beside.write_text(path.read_text())
    assert yaml_for(spec, "v1", beside) == beside
    beside.write_text("stale")
    assert yaml_for(spec, "v1", beside) == path
    with torch.device("meta"):
        model = _ldm_unet_from_yaml(path)
    assert len(model.input_blocks) == 1 + 6 + 3 and len(model.middle_block) == 0


def test_prune_refuses_what_it_cannot_prune_and_writes_nothing(tmp_path, tiny_pipeline_v1, capsys):
    small = write_tiny_pipeline(tmp_path / "small", "small")
    assert main(["prune", str(small), str(tmp_path / "a.safetensors"), "--remove", "mid"]) == 2
    assert "already pruned" in capsys.readouterr().err
    inpaint = tiny_unet().state_dict()
    inpaint["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    io.write_safetensors(tmp_path / "inpaint.safetensors", inpaint)
    assert main(["prune", str(tmp_path / "inpaint.safetensors"), str(tmp_path / "b.safetensors"), "--remove", "mid"]) == 2
    assert "inpainting U-Net (9 input channels)" in capsys.readouterr().err
    io.write_safetensors(tmp_path / "xl.safetensors", {"conditioner.embedders.0.transformer.x": torch.zeros(1)})
    assert main(["prune", str(tmp_path / "xl.safetensors"), str(tmp_path / "c.safetensors"), "--remove", "mid"]) == 2
    assert "SDXL" in capsys.readouterr().err
    assert main(["prune", str(tiny_pipeline_v1), str(tmp_path / "d.safetensors"), "--remove", "head"]) == 2
    assert "--remove takes mid or inner" in capsys.readouterr().err
    assert main(["prune", str(tiny_pipeline_v1), str(tmp_path / "e.safetensors"), "--keep", "down=1,1,1,1 "
                 "up_from=02,12,02,02"]) == 2
    assert "skip connections pin it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inpaint.safetensors", "small", "xl.safetensors"]


def test_prune_writes_a_diffusers_folder_that_distillation_reads(tmp_path, tiny_pipeline_v1):
    from bksdm_ext.train.models import layout_of

    out = tmp_path / "pruned"
    prune(tiny_pipeline_v1, out, "down=2,1,1,2 mid=no", say=lambda line: None)
    config = io.read_json(out / "unet" / "config.json")
    assert layout_of(config) == "down=2,1,1,2 mid=no" and config["layers_per_block"] == [2, 1, 1, 2]
    assert (out / "tokenizer" / "vocab.json").is_file()


def test_prune_job_writes_the_checkpoint_and_says_where(tmp_path, tiny_pipeline_v1):
    from bksdm_ext import kinds
    from bksdm_ext.job import JobFolder, run_job

    job = tmp_path / "job"
    config = kinds.get("prune").build_config({"source": str(tiny_pipeline_v1), "keep": "sd-nomid",
                                              "output_dir": str(tmp_path / "models")})
    job.mkdir()
    config.save(JobFolder(job).config)
    assert run_job("prune", job) == 0
    progress = JobFolder(job).read_progress()
    target = tmp_path / "models" / f"{tiny_pipeline_v1.name}-sd-nomid.safetensors"
    assert progress.state == "done" and progress.output == str(target)
    assert io.read_metadata(target)["bksdm.layout"] == "sd-nomid" and target.with_suffix(".yaml").is_file()
    # a custom spec never becomes a file name
    custom = kinds.get("prune").build_config({"source": str(tiny_pipeline_v1), "keep": "down=2,1,1,2 mid=no"})
    assert custom.outputs(job).single.name.startswith(f"{tiny_pipeline_v1.name}-custom-")
    with pytest.raises(Exception, match="whole teacher"):
        kinds.get("prune").build_config({"source": str(tiny_pipeline_v1), "keep": "teacher"})
