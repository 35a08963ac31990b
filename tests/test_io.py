"""Safe reading and atomic writing of weights (bksdm_ext.io)."""

import os

import pytest
import torch

from bksdm_ext import io
from bksdm_ext.errors import BKSDMError


def test_safetensors_round_trip_keeps_tensors_and_metadata(tmp_path):
    fused = torch.randn(6, 4)  # q/k/v views of one tensor: safetensors refuses shared storage unless copied
    tensors = {"q": fused[:2], "k": fused[2:4], "v": fused[4:], "ids": torch.arange(5)}
    path = io.write_safetensors(tmp_path / "m.safetensors", tensors, {"bksdm.version": "v1", "n": 3})
    read, metadata = io.read_safetensors(path)
    assert metadata == {"bksdm.version": "v1", "n": "3"}
    assert all(torch.equal(read[k], tensors[k]) for k in tensors) and set(read) == set(tensors)
    assert io.read_metadata(path) == metadata
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary file left behind


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    import safetensors.torch

    path = io.write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(2)})
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        io.write_safetensors(path, {"a": torch.zeros(2)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_replace_retries_while_the_target_is_held_open(tmp_path, monkeypatch):
    real_replace, calls = os.replace, []

    def busy_twice(src, dst):
        calls.append(dst)
        if len(calls) <= 2:
            raise PermissionError("in use")  # what Windows raises while another process has dst open
        real_replace(src, dst)

    monkeypatch.setattr(io.time, "sleep", lambda s: None)
    monkeypatch.setattr(io.os, "replace", busy_twice)
    io.write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello" and len(calls) == 3

    monkeypatch.setattr(io.os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError("in use")))
    with pytest.raises(BKSDMError, match="another program has it open"):
        io.write_text(tmp_path / "b.txt", "x")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"]


@pytest.mark.parametrize("keep", [10, 100, -10])
def test_truncated_safetensors_is_a_clear_error(tmp_path, keep):
    whole = io.write_safetensors(tmp_path / "whole.safetensors", {"a": torch.randn(64, 64)}).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole[:keep])
    with pytest.raises(BKSDMError, match="truncated or corrupt"):
        io.read_safetensors(cut)


def test_pickle_checkpoint_is_never_unpickled(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling this creates the marker file

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": Payload()}, ckpt)
    with pytest.raises(BKSDMError, match="Convert it to .safetensors with a tool you trust") as error:
        io.read_weights(ckpt)
    assert "open" in str(error.value)
    assert not marker.exists()
    # the file really is armed: an unsafe load runs it
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_plain_checkpoints_load_and_broken_ones_are_clear_errors(tmp_path):
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3), "step": torch.tensor(7)}, "global_step": 7}, ckpt)
    tensors, metadata = io.read_weights(ckpt)
    assert set(tensors) == {"w", "step"} and metadata == {}
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(BKSDMError, match="not a readable PyTorch checkpoint"):
        io.read_weights(cut)
    (tmp_path / "notes.txt").write_text("notes")
    with pytest.raises(BKSDMError, match="unknown weights format"):
        io.read_weights(tmp_path / "notes.txt")
    with pytest.raises(BKSDMError, match="notes.md does not exist"):  # not "unknown format": it is not there
        io.read_weights(tmp_path / "notes.md")
    with pytest.raises(BKSDMError, match="does not exist"):
        io.read_weights(tmp_path / "missing.safetensors")


def test_diffusers_folder_reads_fp16_variants_and_bin(tmp_path):
    unet, text = tmp_path / "unet", tmp_path / "text_encoder"
    io.write_safetensors(unet / "diffusion_pytorch_model.fp16.safetensors", {"conv_in.weight": torch.ones(2).half()})
    io.write_json(unet / "config.json", {"layers_per_block": 1})
    text.mkdir()
    torch.save({"text_model.w": torch.zeros(3)}, text / "pytorch_model.bin")
    io.write_json(tmp_path / "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    folder = io.read_diffusers_folder(tmp_path)
    assert folder.files == {"unet": unet / "diffusion_pytorch_model.fp16.safetensors",
                            "text_encoder": text / "pytorch_model.bin"}
    assert folder.weights["unet"]["conv_in.weight"].dtype == torch.float16
    assert folder.configs["unet"] == {"layers_per_block": 1} and folder.is_pipeline
    with pytest.raises(BKSDMError, match="not a diffusers folder"):
        io.read_diffusers_folder(text)
