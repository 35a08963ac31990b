"""The CLIP tokenizer of a Stable Diffusion family, built offline from the BPE vocabulary open_clip ships.

A single-file checkpoint carries no tokenizer, and the hub copies (openai/clip-vit-large-patch14 for SD-1.x,
stable-diffusion-2's tokenizer/ for SD-2.x) need a network or a filled HF cache. Both are the same CLIP BPE
(256 bytes, their end-of-word forms, 48,894 merges, start and end of text: 49,408 tokens), which the
open-clip-torch wheel ships and every WebUI installs; the two differ only in the pad token.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BKSDMError
from .io import new_folder

START, END = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context: start, 75 tokens, end


@dataclass(frozen=True)
class TokenizerFamily:
    """Where a family's published tokenizer lives and how it pads."""

    hub_repo: str
    hub_subfolder: str
    pad_token: str


FAMILIES: dict[str, TokenizerFamily] = {
    # SD-1.x: OpenAI CLIP ViT-L/14's tokenizer pads with the end token (49407)
    "v1": TokenizerFamily("openai/clip-vit-large-patch14", "", END),
    # SD-2.x (base and 768 alike): stable-diffusion-2's tokenizer pads with "!", id 0, as OpenCLIP pads with zeros.
    # transformers then also reads a prompt's "!" as that pad token, where OpenCLIP reads "!</w>" (diffusers#4153);
    # kept, so that a folder built offline tokenizes exactly as one with the hub's tokenizer.
    "v2": TokenizerFamily("stabilityai/stable-diffusion-2-1", "tokenizer", "!"),
}


def get_family(family: str) -> TokenizerFamily:
    try:
        return FAMILIES[family]
    except KeyError:
        raise BKSDMError(f"Unknown tokenizer family {family!r}: choose one of {', '.join(FAMILIES)}.") from None


def _bpe() -> tuple[list[str], dict[int, str]]:
    """open_clip's merges (in rank order) and byte alphabet, exactly as its SimpleTokenizer reads them."""
    try:
        import open_clip.tokenizer as oct
    except ImportError as error:
        raise BKSDMError(f"Cannot build a CLIP tokenizer offline: open_clip is not importable ({error}). Install it "
                         "(pip install open-clip-torch; every WebUI venv has it), or give a tokenizer folder "
                         "(bksdm convert --tokenizer DIR).") from None
    merges = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return merges, oct.bytes_to_unicode()


def _token(text: str) -> dict:
    return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_clip_tokenizer(directory: str | os.PathLike, family: str = "v1") -> Path:
    """Write `family`'s CLIPTokenizer folder (vocab.json, merges.txt, configs) at `directory`, all or nothing.

    Built beside `directory` and renamed into place, so an interrupted write never leaves a folder that
    looks complete. An existing empty `directory` is replaced; a non-empty one is refused.
    """
    pad = get_family(family).pad_token
    merges, byte_alphabet = _bpe()
    letters = list(byte_alphabet.values())
    vocab = letters + [b + "</w>" for b in letters] + ["".join(m.split()) for m in merges] + [START, END]
    directory = Path(directory)
    with new_folder(directory) as tmp:
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
            "errors": "replace", "add_prefix_space": False,
            "bos_token": _token(START), "eos_token": _token(END), "unk_token": _token(END), "pad_token": pad,
        }, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad}, indent=2))
    return directory


def save_hub_tokenizer(directory: str | os.PathLike, family: str = "v1") -> Path | None:
    """Save `family`'s published tokenizer (from the HF cache or the hub) at `directory`; None if unreachable."""
    from transformers import CLIPTokenizer

    source = get_family(family)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source.hub_repo, subfolder=source.hub_subfolder)
    except OSError:  # offline and not cached, or the hub is unreachable
        return None
    tokenizer.save_pretrained(directory)
    return Path(directory)


def fix_max_length(tokenizer, text_encoder_config: dict | None) -> None:
    """A tokenizer folder without `model_max_length` says 1e30 (transformers' 'unknown'): use the text
    encoder's position count, as every SD text encoder reads at most that many tokens."""
    if tokenizer.model_max_length > 1 << 20:
        tokenizer.model_max_length = int((text_encoder_config or {}).get("max_position_embeddings") or 77)
