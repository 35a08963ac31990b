"""The Import / Convert job: `bksdm_ext.convert.convert` run as a job, so a multi-GB conversion never
blocks the WebUI's process or its memory. Its kind is declared in `bksdm_ext.kinds`; it runs as any
job does, `python -m bksdm_ext.job convert --job-dir DIR`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BKSDMError
from ..io import check_model_source
from ..job import JobFolder, Outputs, Progress
from ..job_config import JobConfig, setting

FORMS = ("webui", "diffusers")
VERSIONS = ("auto", "v1", "v2-base", "v2-768")


@dataclass
class ConvertConfig(JobConfig):
    """Import a model: a diffusers folder or a single file, written in the form the WebUI (or diffusers) loads."""

    kind = "convert"

    source: str = setting("", "A diffusers folder (e.g. a download of nota-ai/bk-sdm-small) or a .safetensors/.ckpt "
                              "checkpoint.", label="Source model", group="Model", kind="model")
    to: str = setting("webui", "webui: one .safetensors with its .yaml beside it (LDM keys); diffusers: a pipeline "
                               "folder (kept in the job folder's output/).", label="Convert to", group="Output",
                      choices=FORMS)
    name: str = setting("", "Name of the result, without extension (empty = the source's).", label="Name",
                        group="Output", kind="name")
    output_dir: str = setting("", "Where the WebUI checkpoint goes (empty = the job folder's output/).",
                              label="Output folder", group="Output", kind="folder")
    half: bool = setting(True, "Write fp16: half the size, as the WebUI runs it anyway.", label="Half precision",
                         group="Output")
    version: str = setting("auto", "The SD version, when the source cannot tell (v2-base and v2-768 share shapes).",
                           label="SD version", group="Model", choices=VERSIONS, advanced=True)

    def validate(self) -> None:
        super().validate()
        check_model_source(self.source, "source", hub=False)

    def outputs(self, job_dir: Path) -> Outputs:
        source = Path(self.source).expanduser()
        stem = self.name or source.name.removesuffix(source.suffix if source.is_file() else "")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "bk-sdm"
        return Outputs(JobFolder(job_dir), self.output_dir, stem)

    def destination(self, job_dir: Path) -> Path:
        outputs = self.outputs(job_dir)
        return outputs.single if self.to == "webui" else outputs.diffusers


def run(config: ConvertConfig, job_dir: Path, resume: str | None = None) -> str:
    """Convert (a resumed conversion starts over); progress.json says where the result went."""
    from ..convert import convert

    folder, started = JobFolder(job_dir), time.time()
    outputs, target = config.outputs(job_dir), config.destination(job_dir)
    if target.exists() and not outputs.is_ours(target):
        raise BKSDMError(f"{target} already exists: choose another name or output folder.")
    progress = Progress(state="running", total_steps=1, message=f"Converting {config.source}.").update()
    folder.write_progress(progress)
    print(f"Converting {config.source} -> {target}", flush=True)
    outputs.claim(*((target, outputs.yaml) if config.to == "webui" else (target,)))
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = convert(config.source, target, half=config.half,
                    version=None if config.version == "auto" else config.version)
    for line in lines:
        print(line, flush=True)
    folder.write_progress(progress.update(state="done", step=1, message=f"Imported as {target}.",
                                          output=str(target), elapsed_s=time.time() - started))
    return "done"
