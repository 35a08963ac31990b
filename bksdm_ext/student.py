"""Build a BK-SDM student U-Net from an SD teacher (BKSDM.md §2).

Every student tensor is copied from a teacher tensor: the same name, or the one `layouts.block_map`
gives. Nothing is left at its random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import layouts
from .errors import BKSDMError


@dataclass
class StudentReport:
    layout: str
    copied: int  # student tensors, each from exactly one teacher tensor
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (student module, teacher module)
    dropped: list[str] = field(default_factory=list)  # teacher modules no student tensor came from
    parameters: int = 0

    def summary(self) -> str:
        lines = [
            f"{layouts.get_layout(self.layout).title}: {self.copied} tensors copied from the teacher, "
            f"{self.parameters:,} parameters.",
            f"Renamed ({len(self.renamed)}): " + ", ".join(f"{s} <- {t}" for s, t in self.renamed),
            f"Dropped ({len(self.dropped)}): " + ", ".join(self.dropped),
        ]
        return "\n".join(lines)


def _module_of(key: str) -> str:
    """The block a parameter belongs to, for the report: e.g. 'up_blocks.0.resnets.2'."""
    parts = key.split(".")
    depth = 4 if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4 else 2
    if parts[0] == "mid_block":
        depth = 1
    return ".".join(parts[:depth])


def student_state_dict(teacher_state: dict[str, torch.Tensor], student_keys, layout) -> dict[str, torch.Tensor]:
    """The student's tensors (diffusers naming) taken from the teacher's; raises if one has no source."""
    missing = [k for k in student_keys if layouts.teacher_key(k, layout) not in teacher_state]
    if missing:
        raise BKSDMError(
            f"The teacher has no source for {len(missing)} student tensors (first: {missing[0]}): "
            "is it a standard SD-1.x/2.x U-Net?"
        )
    return {k: teacher_state[layouts.teacher_key(k, layout)] for k in student_keys}


def build_student(teacher, layout: str):
    """(student UNet2DConditionModel, StudentReport) from a diffusers teacher U-Net."""
    from diffusers import UNet2DConditionModel

    lay = layouts.get_layout(layout)
    if not lay.is_student:
        raise BKSDMError(f"Choose a student layout to build: {', '.join(layouts.STUDENTS)} or a custom spec.")
    config = layouts.student_unet_config(dict(teacher.config), lay)
    with torch.device("meta"):
        skeleton = UNet2DConditionModel(**config)
    teacher_state = teacher.state_dict()
    state = student_state_dict(teacher_state, skeleton.state_dict().keys(), lay)
    for key, tensor in state.items():
        if tensor.shape != skeleton.state_dict()[key].shape:
            raise BKSDMError(f"Teacher tensor for {key} has shape {tuple(tensor.shape)}, the student needs "
                             f"{tuple(skeleton.state_dict()[key].shape)}: the teacher is not a standard SD U-Net.")
    student = UNet2DConditionModel.from_config(config)
    if not lay.is_named:  # a custom layout: its config.json names it (shapes alone may fit several)
        from .convert import LAYOUT_CONFIG_KEY

        student.register_to_config(**{LAYOUT_CONFIG_KEY: lay.name})
    student.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    student.to(dtype=next(teacher.parameters()).dtype)
    used = {layouts.teacher_key(k, lay) for k in state}
    dropped = sorted({_module_of(k) for k in teacher_state if k not in used})
    report = StudentReport(
        layout=lay.name,
        copied=len(state),
        renamed=list(layouts.block_map(lay)),
        dropped=dropped,
        parameters=sum(p.numel() for p in student.parameters()),
    )
    return student, report
