"""The ControlNet extension (Mikubill/sd-webui-controlnet, checked against v1.1.455) on a BK model.

What it does unpatched (scripts/hook.py, `UnetHook.hook`): it replaces the U-Net's forward with its
own, which adds the 13 residuals of `PlugableControlModel.forward` by popping them from the end of
a list of 13: the middle block takes the last, output block k the one before, so on a BK layout
(8 input blocks on Base/Small, 6 on Tiny) output block k meets SD's residual 11-k. On Small, output
block 3 adds SD's input-8 residual (1280 channels) to BK's input-4 skip (640 channels): a
RuntimeError at the first step; before that, blocks 0-2 get residuals of other blocks silently.

Patched, without editing its files:
- each residual reaches the skip of the student input block copied from its teacher block
  (`addons.controlnet`); those of removed blocks, and the middle one on Small/Tiny, are dropped. The
  routing happens per unit in `ControlParams.apply_effective_region_mask`, which the hook calls once
  per residual in SD order right after scaling, so soft injection (`0.825**(12-i)`) and advanced
  weighting, both indexed by SD residual, follow the residual they were computed for;
- units that address blocks another way (T2I-Adapter, reference, IP-Adapter, ControlLLLite,
  Control-LoRA, InstantID) are refused with a message, and the generation runs without them.
"""

from __future__ import annotations

from typing import Callable

from .. import layouts
from ..addons import controlnet as placement
from .patching import wrap

INFOTEXT_KEY = "BK-SDM ControlNet"
# ControlModelType names whose units give the 13 residuals and nothing else
ROUTED = {"ControlNet", "ControlNetUnion", "SparseCtrl"}
REFUSED = {
    "T2I_Adapter": "a T2I-Adapter adds its features at SD's input blocks 2, 5, 8 and 11",
    "T2I_StyleAdapter": "a T2I style adapter is not placed by the block map",
    "T2I_CoAdapter": "a T2I-CoAdapter adds its features at SD's input blocks",
    "AttentionInjection": "reference units read SD's input_blocks 8, 10 and 11 and its attention layers by position",
    "IPAdapter": "IP-Adapter patches SD's 16 cross-attention layers by position",
    "Controlllite": "ControlLLLite patches SD's attention layers by position",
    "ControlLoRA": "Control-LoRA builds its control model from SD's own input blocks",
    "InstantID": "InstantID needs an IP-Adapter unit, which addresses SD's attention layers by position",
    "ReVision": "ReVision is for SDXL",
}


def refusal(kind: str) -> str | None:
    """Why a unit of this ControlModelType cannot run on a BK model; None when it can."""
    if kind in ROUTED:
        return None
    return REFUSED.get(kind, f"{kind} units are not placed by the block map")


class ResidualRouter:
    """Stands in for one unit's `apply_effective_region_mask` while the hook builds its residual list.

    Call i (SD residual i, already scaled) returns what must sit at position i of the list the hook
    pops from: position 12-n+j feeds the skip of input block j (n input blocks), 12 the middle block.
    Each position's source comes at or before it, so one pass in SD order fills the list.
    """

    def __init__(self, apply: Callable, layout: str):
        self.apply = apply
        inputs, middle = placement.residual_sources(layout)
        start = placement.SD_RESIDUALS - 1 - len(inputs)
        self.sources: list[int | None] = [None] * placement.SD_RESIDUALS
        for j, source in enumerate(inputs):
            self.sources[start + j] = source
        self.sources[placement.MIDDLE] = middle
        self.seen: list = []

    def reset(self) -> None:
        self.seen = []

    def __call__(self, residual):
        residual = self.apply(residual)
        position = len(self.seen)
        self.seen.append(residual)
        if len(self.seen) == placement.SD_RESIDUALS:
            seen, self.seen = self.seen, []
        else:
            seen = self.seen
        source = self.sources[position] if position < placement.SD_RESIDUALS else None
        return seen[source] if source is not None else residual * 0  # dropped: adds nothing


class ControlNetPatch:
    """Wraps of the ControlNet extension's `Script.get_enabled_units` and `UnetHook.hook`.

    `script_class`, `hook_class`: the classes the WebUI loaded (`Script` of scripts/controlnet.py, the
    `UnetHook` it uses); `current_layout()`: the BK layout of the loaded model, None for others.
    """

    def __init__(self, script_class, hook_class, current_layout: Callable[[], str | None], say=print):
        self.script_class, self.hook_class = script_class, hook_class
        self.current_layout, self.say = current_layout, say

    def install(self) -> None:
        wrap(self.script_class, "get_enabled_units", self._get_enabled_units, kind=staticmethod)
        wrap(self.hook_class, "hook", self._hook)

    def unit_kind(self, p, unit) -> str:
        """The ControlModelType name of a unit, as the extension decides it (its preprocessor, or the
        model it loads, through its own cache)."""
        module = str(getattr(unit, "module", "") or "")
        if "reference" in module:
            return "AttentionInjection"
        if "revision" in module:
            return "ReVision"
        model = self.script_class.load_control_model(p, p.sd_model.model.diffusion_model, unit.model)
        return model.type.name

    def _refuse(self, p, what: str, why: str) -> None:
        title = layouts.get_layout(self.current_layout()).title
        message = f"BK-SDM: {what} was left out: {why}, which are not {title}'s blocks."
        self.say(f"[{message}]")
        p.comment(message)
        refused = p.extra_generation_params.get(INFOTEXT_KEY)
        p.extra_generation_params[INFOTEXT_KEY] = f"{refused}; {what} refused" if refused else f"{what} refused"

    def _get_enabled_units(self, original):
        def get_enabled_units(p):
            units = original(p)
            if self.current_layout() is None:
                return units
            kept = []
            for index, unit in enumerate(units):
                try:
                    kind = self.unit_kind(p, unit)
                except Exception:  # noqa: BLE001 - a unit it cannot load: the extension says why itself
                    kept.append(unit)
                    continue
                why = refusal(kind)
                if why:
                    self._refuse(p, f"ControlNet unit {index} ({getattr(unit, 'module', kind)})", why)
                else:
                    kept.append(unit)
            return kept

        return get_enabled_units

    def _hook(self, original):
        def hook(hook_self, model, sd_ldm, control_params, process, *args, **kwargs):
            layout = self.current_layout()
            if layout is None:
                return original(hook_self, model, sd_ldm, control_params, process, *args, **kwargs)
            kept, routers = [], []
            for param in control_params:
                kind = param.control_model_type.name
                why = refusal(kind)
                if why:  # a unit that reached the hook another way (another extension's call)
                    self._refuse(process, f"a {kind} control", why)
                    continue
                router = ResidualRouter(param.apply_effective_region_mask, layout)
                param.apply_effective_region_mask = router
                kept.append(param)
                routers.append(router)
            result = original(hook_self, model, sd_ldm, kept, process, *args, **kwargs)
            controlled = model.forward

            def forward(*f_args, **f_kwargs):
                for router in routers:  # a step that failed half-way leaves nothing behind
                    router.reset()
                return controlled(*f_args, **f_kwargs)

            model.forward = forward
            return result

        return hook


def find(scripts_data) -> tuple[type, type] | None:
    """(Script, UnetHook) of the ControlNet extension among the WebUI's loaded scripts, if there."""
    for data in scripts_data:
        module = getattr(data, "module", None)
        hook_class = getattr(module, "UnetHook", None)
        if hook_class is not None and hasattr(data.script_class, "get_enabled_units"):
            return data.script_class, hook_class
    return None
