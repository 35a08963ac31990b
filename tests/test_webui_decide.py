"""The WebUI adapter's decisions, without a WebUI: which config for which checkpoint, and refusals."""

from functools import lru_cache

import pytest
import torch
from safetensors.torch import save_file

from bksdm_ext import layouts
from bksdm_ext.errors import BKSDMError
from bksdm_ext.ldm_config import config_path
from bksdm_ext.webui.decide import (UNET_PREFIX, check, decide, header_tensors, is_bk_candidate, key_check,
                                    not_a_checkpoint)

OTHER_PARTS = {
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
}


@lru_cache(maxsize=None)
def _unet(layout, version):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**layouts.unet_config(layout, version))
    return {UNET_PREFIX + layouts.unet_key_to_ldm(k, layout): v for k, v in unet.state_dict().items()}


def checkpoint(layout, version="v1", drop=(), extra=None):
    """A full-size WebUI checkpoint as meta tensors: shapes only, no memory."""
    state = dict(_unet(layout, version))
    state.update({k: torch.empty(s, device="meta") for k, s in OTHER_PARTS.items()})
    for key in drop:
        del state[key]
    state.update(extra or {})
    return state


def test_standard_checkpoints_pass_through_to_the_webui():
    assert decide(checkpoint("teacher")) is None
    assert decide(checkpoint("teacher", "v2-base")) is None
    assert not is_bk_candidate(checkpoint("small", extra={"conditioner.embedders.0.x": torch.empty(1)}))
    inpaint = checkpoint("small", extra={UNET_PREFIX + "input_blocks.0.0.weight": torch.empty(320, 9, 3, 3)})
    assert decide(inpaint) is None


def test_only_files_the_webui_cannot_use_are_named_not_a_checkpoint():
    assert not_a_checkpoint(checkpoint("teacher")) is None
    no_vae = {k: v for k, v in checkpoint("teacher").items() if not k.startswith("first_stage_model.")}
    assert not_a_checkpoint(no_vae) is None  # usable with a separate VAE
    sdxl = {UNET_PREFIX + "input_blocks.0.0.weight": torch.empty(1), "conditioner.embedders.0.x": torch.empty(1)}
    assert not_a_checkpoint(sdxl) is None
    assert "no Stable Diffusion U-Net" in not_a_checkpoint({"foo": torch.empty(1)})
    with pytest.raises(BKSDMError, match="U-Net-only"):
        decide({k: v for k, v in checkpoint("teacher").items() if k.startswith(UNET_PREFIX)})


@pytest.mark.parametrize("layout", layouts.STUDENTS)
def test_bk_layouts_get_their_shipped_yaml(layout):
    decision = decide(checkpoint(layout))
    assert (decision.layout, decision.version, decision.version_source) == (layout, "v1", "shapes")
    assert decision.config == config_path(layout, "v1")
    assert decision.prediction_type == "epsilon"


def test_v2_version_comes_from_metadata():
    decision = decide(checkpoint("tiny", "v2-768"), {"bksdm.version": "v2-768"})
    assert (decision.version, decision.version_source) == ("v2-768", "metadata")
    assert decision.config == config_path("tiny", "v2-768") and decision.prediction_type == "v_prediction"
    decision = decide(checkpoint("base", "v2-base"), {"bksdm.prediction_type": "epsilon"})
    assert decision.version == "v2-base"


def test_a_yaml_beside_the_file_that_disagrees_is_overridden_and_reported(tmp_path):
    near = tmp_path / "model.yaml"
    near.write_text(config_path("base", "v1").read_text())
    decision = decide(checkpoint("small"), near_yaml=near)
    assert decision.config == config_path("small", "v1")
    assert "does not describe its weights" in decision.notes[0]
    near.write_text(config_path("small", "v1").read_text())
    assert decide(checkpoint("small"), near_yaml=near).notes == ()


def test_incomplete_bk_unet_is_refused_before_anything_is_zeroed():
    key = UNET_PREFIX + "output_blocks.3.1.proj_out.weight"
    with pytest.raises(BKSDMError, match="Refusing this BK-SDM-Small.*1 missing.*leave weights at zero"):
        check(checkpoint("small", drop=[key]))
    wrong = {UNET_PREFIX + "input_blocks.1.1.proj_in.weight": torch.empty(320, 320, 3, 3, device="meta")}
    with pytest.raises(BKSDMError, match="mismatched"):
        check(checkpoint("base", extra=wrong))


def test_unet_only_and_unknown_layouts_are_refused():
    with pytest.raises(BKSDMError, match="U-Net-only"):
        check(checkpoint("tiny", drop=list(OTHER_PARTS)))
    weird = checkpoint("small", drop=[k for k in checkpoint("small") if k.startswith(UNET_PREFIX + "input_blocks.7.")])
    with pytest.raises(BKSDMError):
        check(weird)


def test_header_tensors_reads_shapes_and_refuses_truncated_files(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path), {"bksdm.layout": "tiny"})
    tensors, metadata = header_tensors(path)
    assert tensors["a"].shape == (2, 3) and tensors["b"].dtype == torch.float16 and tensors["a"].is_meta
    assert metadata == {"bksdm.layout": "tiny"}
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BKSDMError, match="truncated or corrupt"):
        header_tensors(path)
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(BKSDMError, match="truncated or corrupt"):
        header_tensors(path)


def test_key_check_separates_sd2s_unused_text_encoder_parts():
    prefix = "cond_stage_model.model."
    params = {f"{prefix}transformer.resblocks.{i}.ln_1.weight" for i in range(3)} | {
        f"{prefix}text_projection", "model.diffusion_model.out.2.weight"}
    shapes = {k: (4,) for k in params} | {"alphas_cumprod": (1000,)}
    ckpt = {k: torch.empty(4) for k in params if "resblocks.2" not in k and "projection" not in k}
    result = key_check(ckpt, shapes, params)
    assert result.missing == () and result.unexpected == () and result.mismatched == ()
    assert result.unused == (f"{prefix}text_projection", f"{prefix}transformer.resblocks.2.ln_1.weight")
    ckpt["model.diffusion_model.out.2.weight"] = torch.empty(5)
    ckpt["stray"] = torch.empty(1)
    del ckpt[f"{prefix}transformer.resblocks.0.ln_1.weight"]
    result = key_check(ckpt, shapes, params)
    assert result.missing == (f"{prefix}transformer.resblocks.0.ln_1.weight",)
    assert result.mismatched == ("model.diffusion_model.out.2.weight",) and result.unexpected == ("stray",)


def test_positional_extensions_are_named_when_active():
    from types import SimpleNamespace

    from bksdm_ext.webui.decide import positional_conflicts

    class Script:
        def __init__(self, title, start, end):
            self._title, self.args_from, self.args_to = title, start, end

        def title(self):
            return self._title

    unit_on, unit_off = SimpleNamespace(enabled=True), SimpleNamespace(enabled=False)
    p = SimpleNamespace(scripts=SimpleNamespace(alwayson_scripts=[Script("ControlNet", 0, 2),
                                                                  Script("AnimateDiff", 2, 3)]),
                        script_args=[unit_off, unit_off, {"enabled": False}])
    quiet = SimpleNamespace(hypertile_enable_unet=False)
    assert positional_conflicts(quiet, p) == []
    p.script_args[1] = unit_on
    p.script_args[2] = {"enabled": True}
    problems = positional_conflicts(SimpleNamespace(hypertile_enable_unet=True), p)
    assert [w.split()[0] for w in problems] == ["Hypertile", "ControlNet", "AnimateDiff"]
    # those our patches place by the layout are not problems
    placed = positional_conflicts(SimpleNamespace(hypertile_enable_unet=True), p, {"hypertile", "controlnet"})
    assert [w.split()[0] for w in placed] == ["AnimateDiff"]


@pytest.mark.parametrize("spec", ["down=2,1,1,2 mid=no", "down=1,2,1,1 mid=yes", "down=2,2,1 mid=yes",
                                  "down=1,1,1,1 mid=no down_from=1,0,0,1 up_from=01,02,12,01"])
def test_custom_layouts_get_a_generated_yaml_that_builds_them(tmp_path, monkeypatch, spec):
    import importlib

    import yaml

    monkeypatch.setenv("BKSDM_CONFIG_DIR", str(tmp_path))
    lay = layouts.get_layout(spec)
    state = checkpoint(lay.name)
    decision = decide(state, {"bksdm.layout": lay.name})
    assert decision.layout == lay.name and decision.config.parent == tmp_path
    assert decision.label() == f"Custom ({lay.name}) (v1)"
    unet = yaml.safe_load(decision.config.read_text())["model"]["params"]["unet_config"]
    module, name = unet["target"].rsplit(".", 1)
    with torch.device("meta"):
        model = getattr(importlib.import_module(module), name)(**unet["params"])
    built = {UNET_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert built == {k: tuple(v.shape) for k, v in state.items() if k.startswith(UNET_PREFIX)}
