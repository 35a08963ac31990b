"""Random LoRAs over every layer of a tiny U-Net, and the merge the WebUI's Lora extension computes.

The merge is written from the extension's arithmetic (network_lora.py): W += up @ down * alpha / rank,
for a conv layer with a k×k `down` (LoCon) and a 1×1 `up`; a diffusers/peft file has lora_A/lora_B
and no alpha (scale 1). It finds each LoRA module by the names of the model it merges into, so it
shares nothing with the remap under test.
"""

from __future__ import annotations

import torch

RANK = 2


def lora_layers(unet) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d of a diffusers U-Net, by module name."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def random_lora(layers: dict[str, torch.nn.Module], names: dict[str, str], seed: int = 0, peft: bool = False,
                rank: int = RANK, size: float = 0.1):
    """A LoRA on every layer; `names` maps a module name to the file's module key (without part)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_name, layer in layers.items():
        key = names[module_name]
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
        else:
            down = torch.randn(rank, layer.in_features, generator=generator)
            up = torch.randn(layer.out_features, rank, generator=generator)
        if peft:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down * size, up * size
        else:
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down * size, up * size
            tensors[f"{key}.alpha"] = torch.tensor(float(rank) * (1 + len(tensors) % 3))
    return tensors


def delta(tensors: dict, key: str, shape) -> torch.Tensor | None:
    """The weight change of module key `key`, as the Lora extension computes it; None if absent."""
    if f"{key}.lora_down.weight" in tensors:
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        alpha = tensors.get(f"{key}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    elif f"{key}.lora_A.weight" in tensors:
        down, up, scale = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], 1.0
    else:
        return None
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def merge(weights: dict[str, torch.Tensor], tensors: dict, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """`weights` (module name + '.weight' -> tensor) with the LoRA added; `names`: module -> LoRA key."""
    out = dict(weights)
    for module, key in names.items():
        change = delta(tensors, key, weights[module + ".weight"].shape)
        if change is not None:
            out[module + ".weight"] = weights[module + ".weight"] + change
    return out


def kohya_names(layers) -> dict[str, str]:
    return {n: "lora_unet_" + n.replace(".", "_") for n in layers}


def peft_names(layers) -> dict[str, str]:
    return {n: "unet." + n for n in layers}
