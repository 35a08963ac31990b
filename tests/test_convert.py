"""diffusers <-> LDM single-file conversion (bksdm_ext.convert) and `bksdm convert` / `bksdm inspect`."""

import importlib
import json
import shutil
import sys

import pytest
import torch

from bksdm_ext import io, layouts
from bksdm_ext.cli import main
from bksdm_ext.convert import checkpoint, convert, keymaps
from bksdm_ext.errors import BKSDMError
from tiny import tiny_text_encoder, tiny_unet, tiny_unet_config, tiny_vae, write_tiny_pipeline

ALL = [(layout, version) for version in layouts.VERSIONS for layout in layouts.LAYOUTS]


def _ldm_class(params: dict):
    module, name = layouts.ldm_unet_target(params).rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout,version", ALL)
def test_unet_in_ldm_form_computes_the_same_and_matches_diffusers_converter(layout, version):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = tiny_unet_config(layout, version)
    unet = tiny_unet(layout, version)
    ldm_weights = keymaps.unet_to_ldm(unet.state_dict(), layout)
    params = layouts.ldm_unet_params_from_config(config)
    ldm_unet = _ldm_class(params)(**params).eval()
    ldm_unet.load_state_dict(ldm_weights, strict=True)
    torch.manual_seed(1)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, config["cross_attention_dim"])
    with torch.no_grad():
        ours = unet(x, t, encoder_hidden_states=context).sample
        delta = (ours - ldm_unet(x, t, context=context)).abs().max()
    # fp32 rounding of two attention implementations: relative to the output's size (on an AMD EPYC the
    # v2 Base difference is 1.2e-5 on outputs of 1.67, 7e-6 of them; a wrong weight is off by ~1)
    assert delta <= 1e-5 * max(1.0, ours.abs().max().item())
    # diffusers' own (one-way) LDM reader agrees with our map, tensor for tensor
    theirs = convert_ldm_unet_checkpoint({checkpoint.UNET_PREFIX + k: v for k, v in ldm_weights.items()}, config)
    assert _equal(theirs, unet.state_dict())
    assert _equal(keymaps.unet_to_diffusers(ldm_weights, layout), unet.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("version", list(layouts.VERSIONS))
def test_full_size_keys_and_shapes_match_the_ldm_unet(version):
    from diffusers import UNet2DConditionModel

    for layout in layouts.LAYOUTS:
        params = layouts.ldm_unet_params(layout, version)
        with torch.device("meta"):
            ours = UNet2DConditionModel(**layouts.unet_config(layout, version)).state_dict()
            theirs = _ldm_class(params)(**params).state_dict()
        mapped = {k: tuple(v.shape) for k, v in keymaps.unet_to_ldm(ours, layout).items()}
        assert mapped == {k: tuple(v.shape) for k, v in theirs.items()}, layout


def test_vae_map_matches_diffusers_converter_both_ways():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = tiny_vae().state_dict()
    ldm = keymaps.vae_to_ldm(vae)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # Linear in diffusers, 1x1 conv in LDM
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up_blocks.0.upsamplers.0.conv.weight" in vae
    config = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert _equal(convert_ldm_vae_checkpoint({checkpoint.VAE_PREFIX + k: v for k, v in ldm.items()}, config), vae)
    assert _equal(keymaps.vae_to_diffusers(ldm), vae)
    old = {k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in vae.items()}
    assert _equal(keymaps.vae_to_ldm(old), ldm)  # diffusers < 0.14 names, as in CompVis' SD-1.4 folder


def test_text_encoder_maps_match_diffusers_converters():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    clip = tiny_text_encoder("v1").state_dict()
    ldm, unused = checkpoint.text_encoder_to_ldm(clip, "v1")
    assert unused == [] and "transformer.text_model.final_layer_norm.weight" in ldm
    assert _equal(convert_ldm_clip_checkpoint({checkpoint.TEXT_PREFIX + k: v for k, v in ldm.items()}), clip)

    model = tiny_text_encoder("v2")
    openclip = model.state_dict()
    ldm, unused = checkpoint.text_encoder_to_ldm(openclip, "v2")
    assert ldm["model.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert unused == ["cond_stage_model.model.transformer.resblocks.2.*", "cond_stage_model.model.text_projection"]
    theirs = convert_open_clip_checkpoint(model, {checkpoint.TEXT_PREFIX + k: v for k, v in ldm.items()})
    assert _equal(theirs, {k: v for k, v in openclip.items() if k != checkpoint.POSITION_IDS})
    back, dropped = checkpoint.text_encoder_to_diffusers(ldm)
    assert dropped == [] and _equal(back, openclip)


@pytest.mark.parametrize("layout,version",
                         [("teacher", "v1"), ("small", "v1"), ("base", "v2-base"), ("tiny", "v2-768")])
def test_pipeline_round_trip_is_bitwise_and_the_yaml_builds_the_unet(tmp_path, layout, version):
    from omegaconf import OmegaConf

    pipe = write_tiny_pipeline(tmp_path / "pipe", layout, version)
    single = tmp_path / "model.safetensors"
    convert(pipe, single)
    tensors, metadata = io.read_safetensors(single)
    v = layouts.get_version(version)
    assert (metadata["bksdm.layout"], metadata["bksdm.version"]) == (layout, version)
    assert (metadata["bksdm.prediction_type"], metadata["bksdm.format_version"]) == (v.prediction_type, "1")
    assert metadata["bksdm.source"] == "diffusers:pipe"
    assert json.loads(metadata["bksdm.unused"]) == ([] if v.family == "v1" else
                                                    ["cond_stage_model.model.transformer.resblocks.2.*",
                                                     "cond_stage_model.model.text_projection"])
    assert all(t.dtype in (torch.float32, torch.int64) for t in tensors.values())

    unet_config = OmegaConf.to_container(OmegaConf.load(single.with_suffix(".yaml")))["model"]["params"]["unet_config"]
    module, name = unet_config["target"].rsplit(".", 1)
    ldm_unet = getattr(importlib.import_module(module), name)(**unet_config["params"])
    ldm_unet.load_state_dict({k[len(checkpoint.UNET_PREFIX):]: t for k, t in tensors.items()
                              if k.startswith(checkpoint.UNET_PREFIX)}, strict=True)

    back = tmp_path / "back"
    convert(single, back, tokenizer=pipe)
    original, restored = io.read_diffusers_folder(pipe), io.read_diffusers_folder(back)
    for part in ("unet", "vae", "text_encoder"):
        assert _equal(original.weights[part], restored.weights[part]), part
    assert original.configs == restored.configs
    assert (back / "tokenizer" / "vocab.json").read_bytes() == (pipe / "tokenizer" / "vocab.json").read_bytes()


def _as_fp16_variant(pipe):
    """Rewrite a pipeline the way nota-ai/bk-sdm-* publish fp16 variants (*.fp16.safetensors only)."""
    index = io.read_json(pipe / "model_index.json")
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    io.write_json(pipe / "model_index.json", index)
    for part in ("unet", "vae", "text_encoder"):
        weights, file = io.read_component(pipe / part)
        name = "model.fp16.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.fp16.safetensors"
        half = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
        io.write_safetensors(pipe / part / name, half)
        file.unlink()


def test_cli_converts_fp16_variant_folder_with_half_and_inspects_it(tmp_path, capsys):
    pipe = write_tiny_pipeline(tmp_path / "bk-sdm-small", "small", "v1")
    _as_fp16_variant(pipe)
    single = tmp_path / "bk-sdm-small.safetensors"
    assert main(["convert", str(pipe), str(single), "--half"]) == 0
    assert "small, v1 (decided by shapes), fp16" in capsys.readouterr().out
    tensors, _ = io.read_safetensors(single)
    source = io.read_component(pipe / "unet")[0]
    assert torch.equal(tensors["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"],
                       source["down_blocks.0.resnets.0.conv1.weight"])
    assert {t.dtype for t in tensors.values()} == {torch.float16, torch.int64}

    assert main(["inspect", str(single)]) == 0
    out = capsys.readouterr().out
    assert "layout:      small (BK-SDM-Small), ldm key names under 'model.diffusion_model.'" in out
    assert "version:     v1 (decided by metadata)" in out
    small = tiny_unet("small")
    assert f"unet {sum(t.numel() for t in small.parameters()):,}" in out
    assert f"unet float16 ({len(small.state_dict())})" in out
    assert "key check:   complete" in out and "metadata:    bksdm.layout = small" in out

    assert main(["convert", str(single), str(tmp_path / "back"), "--tokenizer", str(pipe / "tokenizer")]) == 0
    index = io.read_json(tmp_path / "back" / "model_index.json")
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]  # not carried over
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tmp_path / "back" / "tokenizer" / "merges.txt").is_file()
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "back")  # diffusers and transformers accept it
    assert loaded.safety_checker is None and loaded.unet.config.layers_per_block == 1
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_unet_only_both_ways(tmp_path, capsys):
    unet = tiny_unet("tiny", "v2-base")
    unet.save_pretrained(tmp_path / "unet")  # a lone U-Net folder: no scheduler to read the version from
    single = tmp_path / "unet.safetensors"
    assert main(["convert", str(tmp_path / "unet"), str(single), "--version", "v2-base"]) == 0
    assert "tiny, v2-base (decided by requested)" in capsys.readouterr().out
    tensors, metadata = io.read_safetensors(single)
    assert all(k.startswith(checkpoint.UNET_PREFIX) for k in tensors) and not single.with_suffix(".yaml").exists()
    assert main(["convert", str(single), str(tmp_path / "back")]) == 0
    written = sorted(p.name for p in (tmp_path / "back").iterdir())
    assert written == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert _equal(io.read_component(tmp_path / "back")[0], unet.state_dict())
    assert io.read_json(tmp_path / "back" / "config.json") == io.read_json(tmp_path / "unet" / "config.json")
    # a diffusers-named U-Net file converts to LDM keys too
    assert main(["convert", str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"),
                 str(tmp_path / "again.safetensors"), "--version", "v2-base"]) == 0
    assert _equal(io.read_safetensors(tmp_path / "again.safetensors")[0], tensors)


def test_unet_loads_from_a_single_file_as_a_diffusers_model(tmp_path, tiny_pipeline_v1):
    from bksdm_ext.convert import load_unet_from_single_file

    convert(tiny_pipeline_v1, tmp_path / "m.safetensors", half=True)
    unet = load_unet_from_single_file(tmp_path / "m.safetensors")
    original = io.read_component(tiny_pipeline_v1 / "unet")[0]
    assert unet.config.attention_head_dim == 2  # the config came back from the header, heads included
    assert _equal(unet.state_dict(), {k: v.half().float() for k, v in original.items()})


def test_full_openclip_single_file_loses_only_what_sd2_never_runs(tmp_path):
    pipe = write_tiny_pipeline(tmp_path / "pipe", "base", "v2-768")
    single = tmp_path / "m.safetensors"
    convert(pipe, single)
    tensors, _ = io.read_safetensors(single)
    # SD-2's own checkpoints carry the whole OpenCLIP tower: one more block, the projection, logit_scale
    last_block = {k.replace("resblocks.1.", "resblocks.2."): v + 1 for k, v in tensors.items() if "resblocks.1." in k}
    extra = dict(last_block)
    extra["cond_stage_model.model.text_projection"] = torch.zeros(32, 32)
    extra["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    extra["alphas_cumprod"] = torch.ones(1000)
    foreign = tmp_path / "sd2-style.safetensors"
    io.write_safetensors(foreign, {**tensors, **extra})  # no bksdm metadata
    notes = convert(foreign, tmp_path / "back", version="v2-768", tokenizer=pipe)
    assert f"Left out {len(last_block) + 3} tensors" in notes[0]
    restored = io.read_diffusers_folder(tmp_path / "back")
    assert _equal(restored.weights["text_encoder"], io.read_component(pipe / "text_encoder")[0])
    assert restored.configs["text_encoder"]["num_hidden_layers"] == 2
    assert restored.configs["scheduler"]["prediction_type"] == "v_prediction"
    convert(pipe, tmp_path / "as-base.safetensors", version="v2-base")  # the user overrides the scheduler
    header = io.read_metadata(tmp_path / "as-base.safetensors")
    assert header["bksdm.prediction_type"] == "epsilon"
    assert json.loads(header["bksdm.diffusers_configs"])["scheduler"]["prediction_type"] == "epsilon"


def test_single_file_without_metadata_gets_configs_from_its_shapes(tmp_path):
    pipe = write_tiny_pipeline(tmp_path / "pipe", "teacher", "v1")
    single = tmp_path / "m.safetensors"
    convert(pipe, single)
    tensors, _ = io.read_safetensors(single)
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": tensors}, ckpt)  # tensors only: torch's safe loader accepts it
    lines = convert(ckpt, tmp_path / "back")
    assert any("No tokenizer given: wrote tokenizer/" in line for line in lines)
    assert (tmp_path / "back" / "tokenizer" / "vocab.json").is_file()
    restored = io.read_diffusers_folder(tmp_path / "back")
    original = io.read_diffusers_folder(pipe)
    for part in ("unet", "vae", "text_encoder"):
        assert _equal(original.weights[part], restored.weights[part]), part
    unet_config, vae_config = restored.configs["unet"], restored.configs["vae"]
    assert unet_config["block_out_channels"] == [32, 64, 64, 64] and unet_config["cross_attention_dim"] == 32
    assert vae_config["block_out_channels"] == [32, 32, 64, 64] and vae_config["layers_per_block"] == 1
    assert restored.configs["text_encoder"]["num_hidden_layers"] == 3
    assert restored.configs["model_index"]["tokenizer"] == ["transformers", "CLIPTokenizer"]


@pytest.mark.parametrize("version,pad", [("v1", 49407), ("v2-768", 0)])
def test_folder_from_a_single_file_gets_its_family_tokenizer_unless_one_is_given(tmp_path, version, pad):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = write_tiny_pipeline(tmp_path / "pipe", "small", version)
    single = tmp_path / "m.safetensors"
    convert(pipe, single)
    lines = convert(single, tmp_path / "back")
    repo = "openai/clip-vit-large-patch14" if version == "v1" else "stabilityai/stable-diffusion-2-1"
    assert f"No tokenizer given: wrote tokenizer/ as {repo}'s" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "back" / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "back")
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.tokenizer.pad_token_id == pad

    # a tokenizer given, or a source folder's own, is copied as it is
    config = io.read_json(pipe / "tokenizer" / "tokenizer_config.json")
    io.write_json(pipe / "tokenizer" / "tokenizer_config.json", {**config, "model_max_length": 64})
    convert(single, tmp_path / "given", tokenizer=pipe / "tokenizer")
    convert(pipe, tmp_path / "copy")
    for folder in ("given", "copy"):
        assert CLIPTokenizer.from_pretrained(tmp_path / folder / "tokenizer").model_max_length == 64, folder


def test_without_open_clip_nothing_is_written(tmp_path, tiny_pipeline_v1, monkeypatch):
    single = tmp_path / "m.safetensors"
    convert(tiny_pipeline_v1, single)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    monkeypatch.setitem(sys.modules, "open_clip.tokenizer", None)
    with pytest.raises(BKSDMError, match="pip install open-clip-torch"):
        convert(single, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml"]


def test_bad_sources_and_destinations_are_refused_without_writing(tmp_path, tiny_pipeline_v1, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    single = tmp_path / "m.safetensors"
    with pytest.raises(BKSDMError, match="write a .safetensors file"):
        convert(tiny_pipeline_v1, tmp_path / "m.ckpt")
    convert(tiny_pipeline_v1, single)
    with pytest.raises(BKSDMError, match="exists and is not an empty folder"):
        convert(single, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(BKSDMError, match="not a CLIP tokenizer folder"):
        convert(single, tmp_path / "out", tokenizer=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml", "taken"]

    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    vocab = tiny_pipeline_v1 / "tokenizer" / "vocab.json"
    assert main(["inspect", str(vocab)]) == 2
    assert "unknown weights format" in capsys.readouterr().err
    io.write_safetensors(tmp_path / "lora.safetensors", {"lora_unet_down.weight": torch.zeros(2)})
    assert main(["inspect", str(tmp_path / "lora.safetensors")]) == 2
    assert "No Stable Diffusion U-Net found" in capsys.readouterr().err

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"state_dict": {}, "callbacks": Payload()}, tmp_path / "evil.ckpt")
    assert main(["convert", str(tmp_path / "evil.ckpt"), str(tmp_path / "evil.safetensors")]) == 2
    assert "Convert it to .safetensors with a tool you trust" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


def test_damaged_unet_is_refused_with_what_is_wrong(tmp_path):
    pipe = write_tiny_pipeline(tmp_path / "pipe", "base", "v1")
    shutil.copytree(pipe, tmp_path / "broken")
    unet, file = io.read_component(tmp_path / "broken" / "unet")
    del unet["down_blocks.1.attentions.0.proj_out.weight"]
    io.write_safetensors(file, unet)
    with pytest.raises(BKSDMError, match="1 missing \\(e.g. down_blocks.1.attentions.0.proj_out.weight\\)"):
        convert(tmp_path / "broken", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
