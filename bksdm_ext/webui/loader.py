"""The WebUI checkpoint-loading patch: BK layouts get their own yaml, broken ones are refused.

Three wraps of `modules.sd_models` / `sd_models_config` functions that the WebUI (1.6-1.10) looks up
as module attributes at call time:
- `reload_model_weights` and `load_model`: a preflight on the safetensors header refuses a bad BK
  file before the WebUI touches the model in use, so that model stays usable;
- `find_checkpoint_config`: our detection decides the yaml of a BK checkpoint, ahead of the WebUI's
  SD2 guess (which would fail on pruned weights) and of any yaml beside the file;
- `load_model_weights`: compares the checkpoint with the parameters of the model just built, refuses
  a BK checkpoint that would leave any of them at zero, and records what was loaded on the model
  (`sd_model.bksdm_info`) for the API, the infotext and the timings.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from modules import sd_models, sd_models_config

from ..errors import BKSDMError
from .decide import Decision, check, decide, header_tensors, key_check
from .patching import wrap



@dataclass
class LoadedInfo:
    """What the loaded checkpoint is, as the API and the infotext report it."""

    checkpoint: str
    filename: str
    layout: str | None  # None for checkpoints the WebUI loads itself (SD, SDXL, …)
    version: str | None
    prediction_type: str | None
    version_source: str | None
    config: str
    keys: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class _State:
    """Decisions handed from find_checkpoint_config to load_model_weights (same thread, same load)."""

    def __init__(self):
        self.local = threading.local()
        self.last_refusal: dict | None = None
        # loads in progress -> checkpoint title: they nest (reload_model_weights calls load_model) and overlap
        # (a switch asked for while the start-up load finishes, in another thread)
        self._loads: dict[object, str] = {}

    @contextmanager
    def loading_of(self, checkpoint_info):
        token = object()
        self._loads[token] = getattr(checkpoint_info, "title", None) or str(checkpoint_info)
        try:
            yield
        finally:
            del self._loads[token]

    @property
    def loading(self) -> str | None:
        """The title of the checkpoint being loaded (the latest asked for), None when no load runs."""
        titles = list(self._loads.values())
        return titles[-1] if titles else None


state = _State()


def _refuse(checkpoint_info, error: BKSDMError):
    title = getattr(checkpoint_info, "title", str(checkpoint_info))
    state.last_refusal = {"checkpoint": title, "message": str(error)}
    print(f"[BK-SDM] Refused {title}: {error}")
    try:  # a toast in the browser when this runs inside a gradio event (the dropdown)
        import gradio as gr

        gr.Warning(f"BK-SDM: {error}")
    except Exception:  # noqa: BLE001 - outside an event gradio has nowhere to show it
        pass
    raise error


def preflight(checkpoint_info) -> None:
    """Refuse a broken BK safetensors file from its header alone, before anything is unloaded."""
    filename = getattr(checkpoint_info, "filename", None)
    if not filename or not filename.lower().endswith(".safetensors"):
        return  # .ckpt files are unpickled by the WebUI itself; find_checkpoint_config checks them
    try:
        check(*header_tensors(filename))
    except BKSDMError as error:
        _refuse(checkpoint_info, error)


def _find_checkpoint_config(original):
    def find_checkpoint_config(state_dict, info):
        near = sd_models_config.find_checkpoint_config_near_filename(info) if info is not None else None
        try:
            decision = decide(state_dict, getattr(info, "metadata", None) or {}, near)
        except BKSDMError as error:
            _refuse(info, error)
        state.local.decision = (getattr(info, "filename", None), decision)
        if decision is None:
            return original(state_dict, info)
        for note in decision.notes:
            print(f"[BK-SDM] {note}")
        print(f"[BK-SDM] {getattr(info, 'title', 'checkpoint')}: {decision.label()}, "
              f"version from {decision.version_source}")
        return str(decision.config)

    return find_checkpoint_config


def _load_model_weights(original):
    def load_model_weights(model, checkpoint_info, state_dict, timer):
        if state_dict is None:  # the WebUI restoring the previous checkpoint after a failure
            return original(model, checkpoint_info, state_dict, timer)
        filename, decision = getattr(state.local, "decision", (None, None))
        if filename != checkpoint_info.filename:
            decision = None
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        keys = key_check(state_dict, shapes, {name for name, _ in model.named_parameters()})
        if decision is not None and (keys.missing or keys.mismatched or keys.unexpected):
            _refuse(checkpoint_info, BKSDMError(
                f"the model built for {decision.label()} does not match the file: {len(keys.missing)} missing, "
                f"{len(keys.unexpected)} unexpected, {len(keys.mismatched)} wrong-shape tensors "
                f"(e.g. {', '.join((keys.missing + keys.unexpected + keys.mismatched)[:3])})."))
        result = original(model, checkpoint_info, state_dict, timer)
        model.bksdm_info = _info(checkpoint_info, decision, keys, getattr(model, "used_config", ""))
        return result

    return load_model_weights


def _info(checkpoint_info, decision: Decision | None, keys, config) -> LoadedInfo:
    return LoadedInfo(
        checkpoint=checkpoint_info.title,
        filename=os.path.basename(checkpoint_info.filename),
        layout=decision.layout if decision else None,
        version=decision.version if decision else None,
        prediction_type=decision.prediction_type if decision else None,
        version_source=decision.version_source if decision else None,
        config=str(decision.config) if decision else str(config or ""),
        keys=keys.as_dict(),
        notes=list(decision.notes) if decision else [],
    )


def _reload_with_preflight(original):
    def reload_model_weights(sd_model=None, info=None, *args, **kwargs):
        chosen = info or sd_models.select_checkpoint()
        preflight(chosen)
        loaded = sd_model or sd_models.model_data.sd_model
        if getattr(loaded, "sd_model_checkpoint", None) == getattr(chosen, "filename", None):
            return original(sd_model, info, *args, **kwargs)  # the usual case: before every generation
        with state.loading_of(chosen):
            return original(sd_model, info, *args, **kwargs)

    return reload_model_weights


def _load_with_preflight(original):
    def load_model(checkpoint_info=None, *args, **kwargs):
        chosen = checkpoint_info or sd_models.select_checkpoint()
        preflight(chosen)
        with state.loading_of(chosen):
            return original(checkpoint_info, *args, **kwargs)

    return load_model


def install() -> None:
    """Patch the WebUI's loading; idempotent."""
    wrap(sd_models_config, "find_checkpoint_config", _find_checkpoint_config)
    wrap(sd_models, "load_model_weights", _load_model_weights)
    wrap(sd_models, "reload_model_weights", _reload_with_preflight)
    wrap(sd_models, "load_model", _load_with_preflight)


def loaded_layout() -> str | None:
    """The BK layout of the loaded model, None for other models (cheap: per LoRA key, per step)."""
    info = getattr(sd_models.model_data.sd_model, "bksdm_info", None)
    return info.layout if info is not None else None


def loading() -> str | None:
    """The title of the checkpoint the WebUI is loading now, None when it is not loading one. The start-up
    load runs in a thread that holds `model_data.lock` from before it calls `load_model`."""
    if state.loading:
        return state.loading
    data = sd_models.model_data
    lock = getattr(data, "lock", None)
    if data.sd_model is None and lock is not None and lock.locked():
        from modules import shared

        return shared.opts.data.get("sd_model_checkpoint") or "the start-up checkpoint"
    return None


def loaded_info() -> dict | None:
    """The loaded model's LoadedInfo as a dict, or None when no model is loaded."""
    model = sd_models.model_data.sd_model
    info = getattr(model, "bksdm_info", None) if model is not None else None
    return info.as_dict() if info is not None else None
