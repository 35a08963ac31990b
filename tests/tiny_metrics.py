"""Tiny stand-ins for the metric networks, written as the files users get: nothing is downloaded.

- An Inception-shaped TorchScript archive named inception-2015-12-05.pt: `layers` (pool3 features,
  (B, 2048, 1, 1) from a normalised 299 px batch) and `output` (2048 -> 1008), with the call signature
  of stylegan2-ada's file that clean-fid's InceptionV3W wraps.
- A tiny open_clip architecture as a config .json, and its random state dict as .safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class TinyInception(nn.Module):
    def __init__(self):
        super().__init__()
        # pool early: a 2048-channel map at 299 px would be slow; the features stay image-dependent
        self.layers = nn.Sequential(nn.AvgPool2d(13), nn.Conv2d(3, 2048, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear")
        features = self.layers((x - 128.0) / 128.0).reshape(-1, 2048)
        if return_features:
            return features
        if no_output_bias:
            logits = torch.nn.functional.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return torch.softmax(logits, dim=1)


def write_tiny_inception(folder, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / "inception-2015-12-05.pt"
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder, seed: int = 0, name: str = "tiny-clip-test") -> tuple[Path, Path]:
    """(config .json, weights .safetensors) of a random tiny open_clip model."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights
