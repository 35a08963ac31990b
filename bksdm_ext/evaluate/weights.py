"""Where the metric networks' weight files come from, and finding them (no torch: configs import this)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import BKSDMError

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLIP_HELP = ("open_clip weights as .safetensors (or a .bin/.pt state dict, read with weights_only=True); the "
             "paper's is ViT-g-14 laion2b_s34b_b88k, open_clip_pytorch_model.bin of "
             "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s34B-b88K")


def inception_file(path: str | os.PathLike) -> Path:
    """The Inception TorchScript file: `path` itself, or `inception-2015-12-05.pt` in the folder `path`."""
    path = Path(path).expanduser()
    file = path / INCEPTION_FILE if path.is_dir() or not path.suffix else path
    if file.name != INCEPTION_FILE:
        raise BKSDMError(f"{file}: clean-fid reads the Inception weights under the name {INCEPTION_FILE}; "
                         f"rename the file or give its folder.")
    if not file.is_file():
        raise BKSDMError(f"The Inception weights {file} are missing: download {INCEPTION_URL} (92 MB, clean-fid's "
                         f"FID network) into {file.parent}. Nothing is downloaded at run time.")
    return file


def check_clip_weights(path: str | os.PathLike) -> Path:
    """The open_clip weights file `path`; missing: one message saying what to give."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BKSDMError(f"The CLIP weights {path} are missing: {CLIP_HELP}.")
    return file


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
