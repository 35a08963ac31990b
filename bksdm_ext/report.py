"""Size, compute and speed of each layout, measured on full-size U-Nets.

MACs are counted as the paper counts them, with thop: convolutions, linear and normalisation layers,
not the attention matmuls. Counting runs on the meta device, so it costs no memory or time.
Forward times are measured side by side in one run: the layouts take turns, and each layout's
median is divided by the teacher's, so machine noise hits every layout alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import layouts
from .errors import BKSDMError


@dataclass(frozen=True)
class LayoutCost:
    layout: str
    parameters: int
    macs: float  # multiply-accumulates per forward, batch 1


def _inputs(version: layouts.Version, latent: int, device="cpu"):
    return (
        torch.randn(1, 4, latent, latent, device=device),
        torch.tensor([999], device=device),
        torch.randn(1, 77, version.cross_attention_dim, device=device),
    )


def layout_costs(version: str = "v1", latent: int = 64) -> list[LayoutCost]:
    return [layout_cost(name, version, latent) for name in layouts.LAYOUTS]


@lru_cache(maxsize=None)
def layout_cost(layout: str, version: str = "v1", latent: int = 64) -> LayoutCost:
    """One layout's U-Net size and MACs; counted once per process (thop takes seconds per U-Net)."""
    try:
        import thop
    except ImportError:
        raise BKSDMError("Counting MACs needs thop: `pip install thop` (the WebUI's start installs it through "
                         "this extension's install.py).") from None
    from diffusers import UNet2DConditionModel

    v = layouts.get_version(version)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**layouts.unet_config(layout, v))
    macs, _ = thop.profile(unet, inputs=_inputs(v, latent, "meta"), verbose=False)  # its counters: CPU
    _remove_thop_buffers(unet)
    return LayoutCost(layout, sum(p.numel() for p in unet.parameters()), macs)


def _remove_thop_buffers(model: torch.nn.Module) -> None:
    # diffusers shares one activation module between blocks (and models): thop's counters left on it
    # would end up in every U-Net saved later in this process
    for module in model.modules():
        module._buffers.pop("total_ops", None)
        module._buffers.pop("total_params", None)


def forward_times(version: str = "v1", latent: int = 64, repeats: int = 5, threads: int | None = 2,
                  unet_configs: dict[str, dict] | None = None) -> dict[str, float]:
    """Median seconds per U-Net forward (fp32, CPU) of each layout, measured in turns."""
    from diffusers import UNet2DConditionModel

    v = layouts.get_version(version)
    if threads:
        torch.set_num_threads(threads)
    configs = unet_configs or {name: layouts.unet_config(name, v) for name in layouts.LAYOUTS}
    unets = {name: UNet2DConditionModel(**config).eval() for name, config in configs.items()}
    cross_dim = next(iter(configs.values()))["cross_attention_dim"]
    x, t, context = _inputs(v, latent)
    context = context[..., :cross_dim]
    samples: dict[str, list[float]] = {name: [] for name in unets}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # the first round warms up and is not counted
            for name, unet in unets.items():
                start = time.perf_counter()
                unet(x, t, encoder_hidden_states=context)
                if round_:
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def format_report(costs: list[LayoutCost], times: dict[str, float] | None = None) -> str:
    teacher = next(c for c in costs if c.layout == "teacher")
    header = f"{'layout':<14}{'U-Net params':>16}{'ratio':>8}{'MACs (G)':>11}{'ratio':>8}"
    if times:
        header += f"{'forward (s)':>13}{'time ratio':>12}"
    lines = [header]
    for c in costs:
        line = (f"{layouts.get_layout(c.layout).title:<14}{c.parameters:>16,}{c.parameters / teacher.parameters:>8.2f}"
                f"{c.macs / 1e9:>11.1f}{c.macs / teacher.macs:>8.2f}")
        if times:
            line += f"{times[c.layout]:>13.3f}{times[c.layout] / times['teacher']:>12.2f}"
        lines.append(line)
    return "\n".join(lines)
