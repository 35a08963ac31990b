"""LoRAs between SD and BK-SDM layouts: which layout a file was made for, and its remap onto another.

A LoRA file names U-Net modules in one of three ways:
- kohya: diffusers module names with underscores, `lora_unet_up_blocks_1_attentions_2_….lora_down.weight`;
- LDM: the WebUI's module names with underscores, `lora_unet_output_blocks_5_1_….lora_down.weight`;
- diffusers/peft: dotted diffusers names, `unet.up_blocks.1.attentions.2.….lora_A.weight`.
Each module is located in its layout's blocks (`layouts.unet_prefix_map`), taken to the teacher block
it is (or was copied from, `layouts.teacher_key`), and from there to the target layout's block copied
from that teacher block; a module whose teacher block the target removed is dropped. Only names
change: every tensor (plain LoRA, LoCon/LyCORIS conv layers, alphas) is kept as it is, so the
placement is exact for a student that was not retrained (see README, "SD add-ons on BK-SDM").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from .. import layouts
from ..errors import BKSDMError

KOHYA, LDM, PEFT = "kohya", "ldm", "peft"
NAMINGS = (KOHYA, LDM, PEFT)
METADATA_LAYOUT = "bksdm.layout"  # the layout a LoRA's U-Net keys are for (our DreamBooth writes it)
METADATA_REMAPPED_FROM = "bksdm.remapped_from"
BASE_MODEL_HASHES = ("ss_new_sd_model_hash", "ss_sd_model_hash")  # kohya: sha256, the WebUI's legacy hash

# The published SD checkpoints LoRAs are trained on, by the hashes kohya writes of them: the file's
# sha256 (`ss_new_sd_model_hash`) or the WebUI's legacy 8-digit hash (`ss_sd_model_hash`). They are
# the teacher layout (SD); a LoRA trained on a fine-tune of them names the fine-tune, which the
# user's own checkpoints may answer (the WebUI adapter looks there first).
PUBLISHED_SD_MODELS = {
    "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556": "SD-v1.4 (sd-v1-4.ckpt)",
    "7460a6fa": "SD-v1.4 (sd-v1-4.ckpt)",
    "cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516": "SD-v1.5 (v1-5-pruned-emaonly.ckpt)",
    "81761151": "SD-v1.5 (v1-5-pruned-emaonly.ckpt)",
    "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa": "SD-v1.5 (v1-5-pruned-emaonly.safetensors)",
    "d7049739": "SD-v1.5 (v1-5-pruned-emaonly.safetensors)",
    "1a189f0be69d6106a48548e7626207dddd7042a418dbf372cefd05e0cdba61b6": "SD-v1.5 (v1-5-pruned.safetensors)",
    "d635794c1fedfdfa261e065370bea59c651fc9bfa65dc6d67ad29e11869a1824": "SD-v2.0-base (512-base-ema.ckpt)",
    "bfcaf0755797b0c30eb00a3787e8b423eb1f5decd8de76c4d824ac2dd27e139f": "SD-v2.0 (768-v-ema.ckpt)",
    "88ecb782561455673c4b78d05093494b9c539fc6bfc08f3a9a4a0dd7b0b10f36": "SD-v2.1-base (v2-1_512-ema-pruned.ckpt)",
    "ad2a33c361c1f593c4a1fb32ea81afce2b5bb7d1983c6b94793a26a3b54b08a0": "SD-v2.1 (v2-1_768-ema-pruned.ckpt)",
}

_KOHYA_PREFIX = "lora_unet_"
_PEFT_PREFIXES = ("unet.", "base_model.model.")  # diffusers' save_lora_weights; a bare peft model
_PEFT_TEXT_PREFIX = "text_encoder."
_PEFT_PARTS = re.compile(r"(.+)\.(lora_[AB]\.weight|alpha)$")
_PEFT_TO_KOHYA_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}


@dataclass(frozen=True)
class _Tables:
    """One layout's blocks in each naming: prefix (as the file writes it) -> diffusers prefix, and back."""

    kohya: dict[str, str]
    ldm: dict[str, str]
    peft: dict[str, str]
    to_ldm: dict[str, str]


@lru_cache(maxsize=None)
def _tables(layout: str) -> _Tables:
    pairs = layouts.unet_prefix_map(layout)
    return _Tables(
        kohya={d.replace(".", "_"): d for d, _ in pairs},
        ldm={m.replace(".", "_"): d for d, m in pairs},
        peft={d: d for d, _ in pairs},
        to_ldm=dict(pairs),
    )


@lru_cache(maxsize=None)
def _heads(naming: str) -> tuple[str, ...]:
    """The first word of every U-Net module name in a naming ('down_blocks_', 'input_blocks_', …)."""
    index = 0 if naming in (KOHYA, PEFT) else 1
    sep = "." if naming == PEFT else "_"
    return tuple(sorted({pair[index].split(".")[0] + sep for pair in layouts.unet_prefix_map("teacher")}))


@dataclass(frozen=True)
class LoraKey:
    """A key of a LoRA file that names a U-Net module."""

    naming: str
    body: str  # the module as the file names it, without the `lora_unet_` / `unet.` prefix
    part: str  # what of the module: 'lora_down.weight', 'alpha', 'hada_w1_a', …
    prefix: str = ""  # the file's own prefix ('lora_unet_', 'unet.', …)

    @property
    def module(self) -> str:
        return self.prefix + self.body


def parse_key(key: str) -> LoraKey | None:
    """The U-Net module a LoRA key names, or None for anything else (text encoder, embeddings, …)."""
    if key.startswith(_KOHYA_PREFIX):
        body, _, part = key[len(_KOHYA_PREFIX):].partition(".")
        for naming in (KOHYA, LDM):
            if body.startswith(_heads(naming)) or body in {h[:-1] for h in _heads(naming)}:
                return LoraKey(naming, body, part, _KOHYA_PREFIX)
        return LoraKey("", body, part, _KOHYA_PREFIX)  # a U-Net key in no naming we know
    for prefix in _PEFT_PREFIXES:
        if key.startswith(prefix) and (m := _PEFT_PARTS.fullmatch(key[len(prefix):])):
            if m.group(1).startswith(_heads(PEFT)) or m.group(1) in {h[:-1] for h in _heads(PEFT)}:
                return LoraKey(PEFT, m.group(1), m.group(2), prefix)
    return None


def locate(key: LoraKey, layout: str) -> tuple[str, str] | None:
    """(diffusers prefix of the block part in `layout`, the rest of the module name) or None if the
    layout has no such block. Longest prefix first, so 'conv_shortcut' is not read as 'conv'."""
    if not key.naming:
        return None
    table = getattr(_tables(layout), key.naming)
    sep = "." if key.naming == PEFT else "_"
    name = key.body + sep
    end = len(name)
    while end > 0:
        prefix = name[:end]
        if prefix in table:
            return table[prefix], key.body[len(prefix):]
        end = name.rfind(sep, 0, end - 1) + 1
    return None


def _render(prefix: str, rest: str, naming: str, layout: str) -> str:
    """The module name in `naming` (with its file prefix) of block part `prefix` + `rest` of `layout`."""
    if naming == PEFT:
        return "unet." + prefix + rest if rest else "unet." + prefix[:-1]
    block = prefix if naming == KOHYA else _tables(layout).to_ldm[prefix]
    name = block.replace(".", "_") + rest.replace(".", "_")
    return _KOHYA_PREFIX + (name if rest else name[:-1])


# --- teacher <-> student ----------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _from_teacher(layout: str) -> dict[str, str]:
    """teacher block prefix -> the prefix of `layout`'s block copied from it (the block map, inverted)."""
    return {layouts.teacher_key(d, layout): d for d, _ in layouts.unet_prefix_map(layout)}


def place_module(prefix: str, source: str, target: str) -> str | None:
    """The block part of `target` that was copied from the same teacher block as `source`'s `prefix`;
    None when the target removed it."""
    return _from_teacher(target).get(layouts.teacher_key(prefix, source))


# --- which layout a file was made for -----------------------------------------------------------


@dataclass(frozen=True)
class MadeFor:
    layout: str
    reason: str  # how it was decided: 'metadata', 'base model', 'keys', 'setting'
    note: str = ""  # said to the user when the decision is a guess
    ambiguous: bool = False  # the keys fit SD too: the user may want to override it


def unet_keys(keys) -> list[LoraKey]:
    return [k for k in map(parse_key, keys) if k is not None]


def fitting_layouts(keys) -> tuple[str, ...]:
    """The layouts that have a block for every U-Net module the keys name."""
    parsed = unet_keys(keys)
    return tuple(name for name in layouts.LAYOUTS if all(locate(k, name) for k in parsed))


def base_model_hashes(metadata: dict | None) -> list[str]:
    """The hashes of the model a kohya-trained LoRA was trained on (they name a model, not a layout)."""
    return [str(metadata[k]).lower() for k in BASE_MODEL_HASHES if metadata and metadata.get(k)]


def published_base_model(metadata: dict | None) -> str | None:
    """The published SD checkpoint a kohya-trained LoRA names as its base model, if any."""
    return next((PUBLISHED_SD_MODELS[h] for h in base_model_hashes(metadata) if h in PUBLISHED_SD_MODELS), None)


def made_for(keys, metadata: dict | None, target: str, base_layout: str | None = None,
             from_sd: bool = False) -> MadeFor:
    """The layout a LoRA's U-Net keys are for, from the file alone.

    In order: our metadata; `base_layout`, the layout of the model its kohya base-model hash names
    (looked up by the caller among the models it knows), else a published SD checkpoint that hash
    names (`PUBLISHED_SD_MODELS`: SD's layout); then the keys: a module of a block only one
    layout has decides. A partial LoRA whose keys fit both SD and `target` is taken as made for
    `target`, with a note; `from_sd` (the user's override) takes it as made for SD.
    """
    metadata = metadata or {}
    if metadata.get(METADATA_LAYOUT):
        return MadeFor(layouts.get_layout(metadata[METADATA_LAYOUT]).name, "metadata")
    if base_layout:
        return MadeFor(base_layout, "base model")
    if published_base_model(metadata):
        return MadeFor("teacher", "base model")
    fits = fitting_layouts(keys)
    if target in fits and "teacher" in fits and target != "teacher":
        if from_sd:
            return MadeFor("teacher", "setting")
        title = layouts.get_layout(target).title
        return MadeFor(target, "keys", f"its keys fit both SD and {title}: taken as made for {title} and applied "
                                       "unchanged.", ambiguous=True)
    if target in fits:
        return MadeFor(target, "keys")
    if from_sd or "teacher" in fits:
        return MadeFor("teacher", "keys" if "teacher" in fits else "setting")
    if fits:
        return MadeFor(fits[0], "keys")
    parsed = unet_keys(keys)
    counts = {name: sum(1 for k in parsed if locate(k, name)) for name in ("teacher", target)}
    best = max(counts, key=counts.get)
    return MadeFor(best, "keys", f"its keys fit no SD or BK-SDM layout whole; placed as made for "
                                 f"{layouts.get_layout(best).title}, the closest.")


# --- the remap ----------------------------------------------------------------------------------


@dataclass
class Placement:
    """A LoRA's tensors placed on `target`, and what became of each U-Net module of the file."""

    tensors: dict
    source: str
    target: str
    naming: str
    placed: list[tuple[str, str]] = field(default_factory=list)  # (file's module, placed module)
    removed: list[str] = field(default_factory=list)  # modules of teacher blocks the target removed
    unknown: list[str] = field(default_factory=list)  # U-Net modules the source layout has no block for

    @property
    def modules(self) -> int:
        return len(self.placed) + len(self.removed) + len(self.unknown)

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.unknown or any(a != b for a, b in self.placed))

    def summary(self, name: str) -> str:
        text = f"{name} {len(self.placed)} of {self.modules} modules placed"
        if self.removed:
            text += f", {len(self.removed)} in removed blocks"
        if self.unknown:
            text += f", {len(self.unknown)} not understood"
        return text


def _part(part: str, naming: str, out: str) -> str:
    return _PEFT_TO_KOHYA_PARTS.get(part, part) if naming == PEFT and out != PEFT else part


def remap(tensors: dict, source: str, target: str, naming: str | None = None) -> Placement:
    """The LoRA `tensors`, made for `source`, with its U-Net modules renamed onto `target`.

    `naming`: of the result, 'kohya' or 'ldm' (default: the file's own; diffusers/peft files become
    kohya, with lora_A/lora_B read as lora_down/lora_up). Keys that name no U-Net module (text
    encoder, bundled embeddings) are kept as they are; diffusers text-encoder keys follow to kohya.
    """
    for name in (source, target):
        layouts.get_layout(name)  # a clear error for an unknown layout
    parsed = {key: parse_key(key) for key in tensors}
    namings = {k.naming for k in parsed.values() if k is not None and k.naming}
    if len(namings) > 1:
        raise BKSDMError(f"This LoRA mixes U-Net key namings ({', '.join(sorted(namings))}): it cannot be placed "
                         "block by block. Save it again from the tool that made it.")
    file_naming = namings.pop() if namings else KOHYA
    out_naming = naming or (KOHYA if file_naming == PEFT else file_naming)
    if out_naming not in (KOHYA, LDM) and out_naming != file_naming:
        raise BKSDMError(f"Unknown LoRA naming {out_naming!r}: choose kohya or ldm.")
    result = Placement({}, source, target, out_naming)
    seen: dict[str, str | None] = {}  # file module -> placed module (None: dropped)
    for key, tensor in tensors.items():
        lora_key = parsed[key]
        if lora_key is None:
            result.tensors[_text_key(key, out_naming)] = tensor
            continue
        module = lora_key.module
        if module not in seen:
            seen[module] = _place(lora_key, source, target, out_naming, result)
        if seen[module] is not None:
            result.tensors[f"{seen[module]}.{_part(lora_key.part, lora_key.naming, out_naming)}"] = tensor
    return result


def _place(key: LoraKey, source: str, target: str, naming: str, result: Placement) -> str | None:
    found = locate(key, source)
    if found is None:
        result.unknown.append(key.module)
        return None
    prefix, rest = found
    placed = place_module(prefix, source, target)
    if placed is None:
        result.removed.append(key.module)
        return None
    name = _render(placed, rest, naming, target)
    result.placed.append((key.module, name))
    return name


def _text_key(key: str, naming: str) -> str:
    """diffusers' text-encoder LoRA keys in kohya's naming, when the U-Net goes to kohya or LDM."""
    if naming == PEFT or not key.startswith(_PEFT_TEXT_PREFIX) or not (m := _PEFT_PARTS.fullmatch(key)):
        return key
    module = m.group(1)[len(_PEFT_TEXT_PREFIX):]
    return f"lora_te_{module.replace('.', '_')}.{_PEFT_TO_KOHYA_PARTS[m.group(2)]}"


def remapped_metadata(metadata: dict | None, placement: Placement) -> dict[str, str]:
    """The file's metadata, saying which layout its keys are now for (read first by `made_for`)."""
    out = {str(k): str(v) for k, v in (metadata or {}).items()}
    out[METADATA_LAYOUT] = placement.target
    out[METADATA_REMAPPED_FROM] = placement.source
    return out


def module_to_ldm(key: str, layout: str) -> str | None:
    """The WebUI Lora extension's module key (`diffusion_model_…`) of a kohya/LDM-named U-Net module
    key of `layout` (e.g. 'lora_unet_up_blocks_1_attentions_0_proj_in'); None if it has no place there."""
    parsed = parse_key(key)
    found = locate(parsed, layout) if parsed is not None and parsed.naming in (KOHYA, LDM) else None
    if found is None:
        return None
    return "diffusion_model_" + _render(*found, LDM, layout)[len(_KOHYA_PREFIX):]
