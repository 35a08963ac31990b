"""The WebUI's built-in Lora extension on a BK model: each U-Net module lands on its own block.

The extension (extensions-builtin/Lora/networks.py, 1.6-1.10) places a file's modules in two ways:
diffusers/kohya names go through `convert_diffusers_name_to_compvis` (SD's fixed numbering), and
LDM names are matched against the loaded model's module names, which on a BK layout are other
blocks. So on a BK model every network goes through `addons.lora` first: `load_network` (which
`<lora:name:w>`, the extra-networks card and the API all reach through `load_networks`) reads the
file, decides the layout it was made for and, when that is not the model's, remaps it; the
extension then reads the remapped tensors (LDM names, which it matches exactly) in place of the
file. Nothing is ever placed by SD numbering on a BK model: a module without a place is dropped,
and the counts go to the console and the infotext. Only the extension's module objects are needed,
so this is tested on stand-ins without a WebUI.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ..addons import lora
from ..errors import BKSDMError
from .patching import wrap

INFOTEXT_KEY = "BK-SDM LoRA"


@dataclass(frozen=True)
class NetworkReport:
    """What became of one network on the BK model, kept on the extension's Network object."""

    name: str
    layout: str  # the model's
    made_for: lora.MadeFor
    summary: str
    changed: bool

    def console(self) -> str:
        made = "made for SD" if self.made_for.layout == "teacher" else f"made for {self.made_for.layout}"
        text = f"[BK-SDM] LoRA {self.summary} ({made}, from its {self.made_for.reason})"
        return text + (f". {self.note()}" if self.note() else "")

    def note(self) -> str:
        if self.made_for.ambiguous:
            return self.made_for.note + (" If it was trained on SD-1.x/2.x, add its name to Settings > BK-SDM > "
                                         "'LoRAs made for SD'.")
        return self.made_for.note


class LoraPatch:
    """Wraps of the Lora extension's `networks` module (and the `sd_models.read_state_dict` it calls).

    `current_layout()`: the BK layout of the loaded model, None for others (then nothing changes).
    `base_layout(hashes)`: the layout of a known model with one of these hashes, or None.
    `from_sd(name)`: whether the user set this network to be taken as made for SD.
    """

    def __init__(self, networks, sd_models, current_layout: Callable[[], str | None],
                 base_layout: Callable[[list[str]], str | None] = lambda hashes: None,
                 from_sd: Callable[[str], bool] = lambda name: False, say: Callable[[str], None] = print):
        self.networks, self.sd_models = networks, sd_models
        self.current_layout, self.base_layout, self.from_sd, self.say = current_layout, base_layout, from_sd, say
        self._pending = threading.local()  # the remapped tensors the extension reads for this file

    def install(self) -> None:
        wrap(self.sd_models, "read_state_dict", self._read_state_dict)
        wrap(self.networks, "load_network", self._load_network)
        wrap(self.networks, "load_networks", self._load_networks)
        if hasattr(self.networks, "convert_diffusers_name_to_compvis"):
            wrap(self.networks, "convert_diffusers_name_to_compvis", self._convert_name)

    def _read_state_dict(self, original):
        def read_state_dict(checkpoint_file, *args, **kwargs):
            pending = getattr(self._pending, "file", None)
            if pending is not None and pending[0] == checkpoint_file:
                return pending[1]
            return original(checkpoint_file, *args, **kwargs)

        return read_state_dict

    def place(self, name: str, tensors: dict, metadata: dict, layout: str) -> tuple[dict, NetworkReport]:
        decided = lora.made_for(tensors, metadata, layout, self.base_layout(lora.base_model_hashes(metadata)),
                                self.from_sd(name))
        placement = lora.remap(tensors, decided.layout, layout, lora.LDM)
        return placement.tensors, NetworkReport(name, layout, decided, placement.summary(name), placement.changed)

    def _load_network(self, original):
        def load_network(name, network_on_disk):
            layout = self.current_layout()
            if layout is None:
                return original(name, network_on_disk)
            filename = network_on_disk.filename
            tensors = self.sd_models.read_state_dict(filename)
            try:
                placed, report = self.place(name, tensors, getattr(network_on_disk, "metadata", None) or {}, layout)
            except BKSDMError as error:
                self.say(f"[BK-SDM] LoRA {name} not applied: {error}")
                raise
            self._pending.file = (filename, placed)
            try:
                net = original(name, network_on_disk)
            finally:
                self._pending.file = None
            net.bksdm_layout, net.bksdm_report = layout, report
            if report.changed or report.note():
                self.say(report.console())
            return net

        return load_network

    def _load_networks(self, original):
        def load_networks(names, *args, **kwargs):
            # networks loaded for another model keep that model's placement: load them again
            layout = self.current_layout()
            memory = self.networks.networks_in_memory
            for name in [n for n, net in memory.items() if getattr(net, "bksdm_layout", None) != layout]:
                memory.pop(name)
            self.networks.loaded_networks[:] = [net for net in self.networks.loaded_networks
                                                if getattr(net, "bksdm_layout", None) == layout]
            return original(names, *args, **kwargs)

        return load_networks

    def _convert_name(self, original):
        def convert_diffusers_name_to_compvis(key, is_sd2):
            layout = self.current_layout()
            if layout is None:
                return original(key, is_sd2)
            converted = lora.module_to_ldm(key, layout)
            if converted is not None:
                return converted
            # never SD's numbering on a BK model: an unplaced U-Net key keeps a name no module has
            return key if key.startswith("lora_unet_") else original(key, is_sd2)

        return convert_diffusers_name_to_compvis


def reports(networks) -> list[NetworkReport]:
    """The reports of the networks of the current generation (the extension's `loaded_networks`)."""
    return [r for net in getattr(networks, "loaded_networks", []) if (r := getattr(net, "bksdm_report", None))]


def infotext(networks, p) -> None:
    """`BK-SDM LoRA: name 112 of 192 modules placed, 80 in removed blocks` for networks not applied
    unchanged, and a comment under the image for guesses the user may want to correct."""
    found = reports(networks)
    changed = [r.summary for r in found if r.changed]
    if changed:
        p.extra_generation_params[INFOTEXT_KEY] = "; ".join(changed)
    for report in found:
        if report.note():
            p.comment(f"BK-SDM: LoRA {report.name}: {report.note()}")
