"""No pickle runs: every weight our loaders read comes from safetensors or torch.load(weights_only=True).

CI's torch defaults to weights_only=True, so a plain load could never fail here; these tests patch
torch.load and check the argument itself, as the WebUI's torch 2.0/2.1 (default False) would need.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bksdm_ext.errors import BKSDMError
from bksdm_ext.train.models import load_parts

WEIGHT_PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def bin_only(pipeline: Path, target: Path) -> Path:
    """The pipeline with every safetensors weight file replaced by a pickled `.bin` of the same tensors
    (transformers 4.30 already saves its text encoder so)."""
    shutil.copytree(pipeline, target)
    for part, stem in WEIGHT_PARTS.items():
        file = target / part / f"{stem}.safetensors"
        if file.is_file():
            name = "pytorch_model.bin" if stem == "model" else f"{stem}.bin"
            torch.save(load_file(str(file)), target / part / name)
            file.unlink()
    assert not list(target.glob("*/*.safetensors"))
    return target


@pytest.fixture
def loads(monkeypatch):
    """Every torch.load call as (file, kwargs), made with weights_only=False as the default (torch 2.0/2.1)."""
    calls = []
    real = torch.load

    def recording(f, *args, **kwargs):
        calls.append((str(f), dict(kwargs)))
        kwargs.setdefault("weights_only", False)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def test_bin_only_teacher_loads_through_weights_only(tiny_pipeline_v1, tmp_path, loads):
    folder = bin_only(tiny_pipeline_v1, tmp_path / "bin-teacher")
    parts = load_parts(str(folder))
    read = sorted(Path(f).parent.name for f, _ in loads)
    assert read == ["text_encoder", "unet", "vae"], loads
    assert all(kwargs.get("weights_only") is True for _, kwargs in loads), loads
    reference = load_parts(str(tiny_pipeline_v1))
    for part in WEIGHT_PARTS:
        mine, theirs = parts[part].state_dict(), reference[part].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs if not k.endswith("position_ids")), part


def test_safetensors_teacher_never_calls_torch_load(tiny_pipeline_v1, tmp_path, loads):
    folder = tmp_path / "safe"
    shutil.copytree(tiny_pipeline_v1, folder)
    # the test pipeline is written in safetensors only (tests/tiny.py), as published pipelines are
    assert (folder / "text_encoder" / "model.safetensors").is_file() and not list(folder.rglob("*.bin"))
    loads.clear()
    load_parts(str(folder))
    from bksdm_ext.pipeline_folder import load_unet

    load_unet(folder)
    assert loads == []


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BKSDM_PICKLE_MARK']}",))


def test_a_pickle_with_code_is_refused_and_never_runs(tiny_pipeline_v1, tmp_path, monkeypatch, loads):
    folder = bin_only(tiny_pipeline_v1, tmp_path / "evil")
    mark = tmp_path / "pwned"
    monkeypatch.setenv("BKSDM_PICKLE_MARK", str(mark))
    weights = torch.load(folder / "text_encoder" / "pytorch_model.bin", weights_only=True)
    torch.save({**weights, "evil": Payload()}, folder / "text_encoder" / "pytorch_model.bin")
    loads.clear()
    with pytest.raises(BKSDMError, match="contains Python objects besides tensors.*Convert it to .safetensors"):
        load_parts(str(folder))
    assert not mark.exists()
    assert all(kwargs.get("weights_only") is True for _, kwargs in loads)


def test_a_tokenizer_without_model_max_length_uses_the_text_encoder_length(tiny_pipeline_v1, tmp_path):
    folder = tmp_path / "hand-made"
    shutil.copytree(tiny_pipeline_v1, folder)
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("model_max_length", None)
    config_file.write_text(json.dumps(config))
    parts = load_parts(str(folder))
    positions = parts["text_encoder"].config.max_position_embeddings
    assert parts["tokenizer"].model_max_length == positions
    from bksdm_ext.train.models import encode_prompts

    hidden = encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a photo of a cat"], "cpu")
    assert hidden.shape[1] == positions
