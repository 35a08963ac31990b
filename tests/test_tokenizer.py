"""The CLIP tokenizer built offline (bksdm_ext.tokenizer) and its use for single-file teachers (train.models)."""

import json
import sys

import pytest

from bksdm_ext import tokenizer
from bksdm_ext.convert import convert
from bksdm_ext.errors import BKSDMError
from bksdm_ext.train.models import load_parts
from tiny import write_tiny_pipeline

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
PROMPTS = [
    "a photo of a cat",
    "A Photo, of: a CAT; (highly detailed)... [8k] {best}'quoted' \"double\" - #tag @user $5 %100 ^_^ ~ * + = / | <x>?",
    "3.14159 pi, 1024x768 px, year 2023, 42nd",
    "café naïve façade, 東京タワー, Ελληνικά, привет мир, 🐱🚀",
    "  lots   of\twhite\nspace  ",
    "it's we're they've I'm you'll he'd can't",
    "tom & jerry &amp; friends",
    "",
    "a " * 100,  # 100 tokens: truncated to 75 between start and end
]


def _hf_tokenizer(directory):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("family,pad", [("v1", 49407), ("v2", 0)])
def test_built_tokenizer_tokenizes_as_open_clip(tmp_path, family, pad):
    import open_clip

    built = _hf_tokenizer(tokenizer.write_clip_tokenizer(tmp_path / "tok", family))
    assert built.vocab_size == len(built) == 49408
    assert (built.bos_token_id, built.eos_token_id, built.pad_token_id, built.model_max_length) == (49406, 49407,
                                                                                                    pad, 77)
    assert built("a photo of a cat").input_ids == CAT
    ours = built(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    for prompt, ids, reference in zip(PROMPTS, ours, open_clip.tokenize(PROMPTS).tolist()):
        end = reference.index(49407) + 1
        # open_clip pads with 0: SD-2's tokenizer too; SD-1's pads with its end token
        assert ids == reference[:end] + [pad] * (77 - end), prompt
    assert len(ours[-1]) == 77 and ours[-1][-2:] == [320, 49407] and ours[-1][1:76] == [320] * 75


def test_v2_splits_exclamation_marks_out_as_the_pad_token_as_stable_diffusion_2s_does(tmp_path):
    import open_clip

    # transformers treats the pad token "!" as special: SD-2's published tokenizer reads a prompt's "!" as 0
    # (diffusers#4153), where open_clip reads "!" as 256 and "!!" as 748. The offline copy behaves as the hub one.
    prompt = "wow! a cat!!"
    v2 = _hf_tokenizer(tokenizer.write_clip_tokenizer(tmp_path / "v2", "v2"))
    v1 = _hf_tokenizer(tokenizer.write_clip_tokenizer(tmp_path / "v1", "v1"))
    assert v2(prompt).input_ids == [49406, 2781, 0, 320, 2368, 0, 0, 49407]
    assert v1(prompt).input_ids == open_clip.tokenize(prompt)[0, :7].tolist() == [49406, 2781, 256, 320, 2368, 748,
                                                                                   49407]


def test_write_is_all_or_nothing_and_refuses_a_used_folder(tmp_path, monkeypatch):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(BKSDMError, match="exists and is not an empty folder"):
        tokenizer.write_clip_tokenizer(used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert (tokenizer.write_clip_tokenizer(tmp_path / "empty") / "vocab.json").is_file()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenizer.write_clip_tokenizer(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "used"]

    with pytest.raises(BKSDMError, match="Unknown tokenizer family 'v3'"):
        tokenizer.write_clip_tokenizer(tmp_path / "v3", "v3")


def test_without_open_clip_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, "open_clip.tokenizer", None)
    with pytest.raises(BKSDMError, match=r"pip install open-clip-torch.*--tokenizer DIR"):
        tokenizer.write_clip_tokenizer(tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache, offline: only what a test puts here can be found, nothing can be downloaded."""
    import huggingface_hub.constants
    import transformers.utils.hub

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where single files are converted to
    # both libraries read the environment once, at import: point what they read at the empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(hub))
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)
    return hub


@pytest.mark.parametrize("version,family", [("v1", "v1"), ("v2-768", "v2")])
def test_single_file_teacher_loads_offline_with_an_empty_hf_cache(tmp_path, hf_cache, capsys, version, family):
    from bksdm_ext.train.models import encode_prompts

    single = tmp_path / "teacher.safetensors"
    convert(write_tiny_pipeline(tmp_path / "pipe", "teacher", version), single)
    capsys.readouterr()
    parts = load_parts(str(single))
    out = capsys.readouterr().out
    # the hub was tried first (and could not answer), so this cannot pass by finding a real HF cache
    assert f"{tokenizer.FAMILIES[family].hub_repo}'s tokenizer is neither cached nor downloadable" in out
    assert "No tokenizer given: wrote tokenizer/" in out
    assert parts["tokenizer"]("a photo of a cat").input_ids == CAT
    assert parts["tokenizer"].pad_token_id == (49407 if family == "v1" else 0)
    assert encode_prompts(parts["tokenizer"], parts["text_encoder"], ["a cat"], "cpu").shape == (1, 77, 32)
    assert [p for p in hf_cache.iterdir() if p.is_dir()] == []  # nothing fetched

    again = load_parts(str(single), ("tokenizer",))  # converted once: the cached folder is reused as it is
    assert capsys.readouterr().out == "" and again["root"] == parts["root"]


def test_single_file_teacher_uses_the_hub_tokenizer_when_it_is_cached(tmp_path, hf_cache, capsys):
    snapshot = hf_cache / "models--openai--clip-vit-large-patch14" / "snapshots" / ("0" * 40)
    tokenizer.write_clip_tokenizer(snapshot)
    config = json.loads((snapshot / "tokenizer_config.json").read_text())
    (snapshot / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 76}))  # tells it apart
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    single = tmp_path / "teacher.safetensors"
    convert(write_tiny_pipeline(tmp_path / "pipe", "small", "v1"), single)
    capsys.readouterr()

    parts = load_parts(str(single), ("tokenizer",))
    out = capsys.readouterr().out
    assert "neither cached nor downloadable" not in out and "No tokenizer given" not in out
    assert parts["tokenizer"].model_max_length == 76  # the cached hub copy, not one built here
    assert parts["tokenizer"]("a photo of a cat").input_ids == CAT


def test_unet_alone_is_refused_as_a_teacher(tmp_path, hf_cache):
    from tiny import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    convert(tmp_path / "unet", tmp_path / "unet.safetensors", version="v1")
    with pytest.raises(BKSDMError, match="holds a U-Net alone"):
        load_parts(str(tmp_path / "unet.safetensors"))
