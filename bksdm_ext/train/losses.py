"""Loss terms of BK-SDM distillation (BKSDM.md §3) and DreamBooth prior preservation (§4).

Each term is a plain function over tensors. `FeatureTap` captures the stage outputs that feature KD
compares, through forward hooks on modules looked up by name on the *unwrapped* model: wrapping it in
DistributedDataParallel (which adds a `module.` prefix to names) cannot break them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import layouts


def diffusion_target(scheduler, latents, noise, timesteps):
    """What the U-Net learns to predict: the noise (ε) or, for v-prediction models, v."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unsupported prediction type {kind!r}")


def task_loss(student_out, target):
    """‖target − ε_S‖², the ordinary denoising loss."""
    return F.mse_loss(student_out.float(), target.float())


def output_kd_loss(student_out, teacher_out):
    """‖ε_T − ε_S‖²: the student imitates the teacher's prediction."""
    return F.mse_loss(student_out.float(), teacher_out.float())


def feature_kd_terms(student_features: list, teacher_features: list, normalised: bool = False) -> list:
    """Each stage's ‖f_T^l − f_S^l‖² as a mean over its elements (the official code's form).

    normalised: divided by the teacher feature's mean square, i.e. ‖f_T − f_S‖² / ‖f_T‖² (LAPTOP-Diff,
    arXiv 2404.11098), so that no stage dominates by the size of its activations alone.
    """
    terms = []
    for s, t in zip(student_features, teacher_features, strict=True):
        term = F.mse_loss(s.float(), t.float())
        if normalised:
            term = term / t.float().square().mean().clamp_min(torch.finfo(torch.float32).tiny)
        terms.append(term)
    return terms


def distill_loss(student_out, teacher_out, target, student_features, teacher_features, weights, stage_names=None,
                 normalised: bool = False, stage_weights=None):
    """(total, {term: value}) with weights = (λ_task, λ_out, λ_feat).

    The terms include each stage's feature term (before its stage weight) as `feat_kd.<stage>`, named
    by `stage_names` (the student's modules) or by position, so a log shows which stage dominates.
    """
    stages = feature_kd_terms(student_features, teacher_features, normalised)
    stage_weights = list(stage_weights) if stage_weights else [1.0] * len(stages)
    terms = {
        "task": task_loss(student_out, target),
        "out_kd": output_kd_loss(student_out, teacher_out),
        "feat_kd": sum(w * term for w, term in zip(stage_weights, stages, strict=True)),  # Σ_l w_l term_l
    }
    total = sum(w * terms[name] for w, name in zip(weights, ("task", "out_kd", "feat_kd")))
    names = stage_names or [str(i) for i in range(len(stages))]
    terms.update({f"feat_kd.{name}": term.detach() for name, term in zip(names, stages, strict=True)})
    return total, terms


def prior_preservation_loss(prediction, target, prior_weight: float):
    """(total, {term: value}): the batch is [instance images; class images], halves of equal size."""
    instance_pred, class_pred = prediction.float().chunk(2)
    instance_target, class_target = target.float().chunk(2)
    terms = {"instance": F.mse_loss(instance_pred, instance_target), "prior": F.mse_loss(class_pred, class_target)}
    return terms["instance"] + prior_weight * terms["prior"], terms


class FeatureTap:
    """Records the outputs of named submodules during the forward passes run inside `with tap:`.

    Only outputs produced inside the block are kept, so a gradient-checkpointing recompute in the
    backward pass cannot overwrite them. A block returning a tuple contributes its first element.
    """

    def __init__(self, model: torch.nn.Module, names):
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise ValueError(f"Modules not in the model: {missing}")
        self.features: dict[str, torch.Tensor] = {}
        self._active = False
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def hook(module, args, output):
            if self._active:
                self.features[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def __enter__(self):
        self.features.clear()
        self._active = True
        return self

    def __exit__(self, *exc):
        self._active = False

    def outputs(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.features]
        if missing:
            raise RuntimeError(f"Feature hooks did not fire for {missing}")
        return [self.features[n] for n in self.names]

    def remove(self):
        for handle in self._handles:
            handle.remove()


def feature_taps(teacher, student, layout) -> tuple[FeatureTap, FeatureTap]:
    """(teacher tap, student tap) on the layout's feature-KD pairs, in the same order."""
    pairs = layouts.feature_kd_pairs(layout)
    return FeatureTap(teacher, [t for t, _ in pairs]), FeatureTap(student, [s for _, s in pairs])
