"""The Prune job: `bksdm_ext.prune.prune` run as a job (it writes gigabytes), so the WebUI can prune the
checkpoint in its dropdown without blocking. Its kind is declared in `bksdm_ext.kinds`."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BKSDMError
from ..io import check_model_source
from ..job import JobFolder, Outputs, Progress
from ..job_config import JobConfig, setting


@dataclass
class PruneConfig(JobConfig):
    """Remove blocks from an SD-1.x/2.x model without retraining (BK-SDM App. B), weights copied."""

    kind = "prune"
    # The tab's one-click action: this setting takes the checkpoint selected in the WebUI's dropdown.
    current_checkpoint_setting = "source"

    source: str = setting("", "An SD-1.x/2.x checkpoint (.safetensors/.ckpt) or diffusers folder.",
                          label="Model to prune", group="Model", kind="model")
    keep: str = setting("sd-nomid", "What to keep: sd-nomid (SD without its mid-stage), another layout name, or a "
                        "spec such as 'down=2,1,1,2 mid=no'.", label="Layout to keep", group="Model")
    name: str = setting("", "Name of the result, without extension (empty = the source's name and the layout).",
                        label="Name", group="Output", kind="name")
    output_dir: str = setting("", "Where the checkpoint goes (empty = the job folder's output/).",
                              label="Output folder", group="Output", kind="folder")
    precision: str = setting("source", "source: as the model is (fp16 stays fp16); fp16; fp32.", label="Precision",
                             group="Output", choices=("source", "fp16", "fp32"))

    def validate(self) -> None:
        from .. import layouts

        super().validate()
        check_model_source(self.source, "source", hub=False)
        if not layouts.get_layout(self.keep).is_student:
            raise BKSDMError("keep names the whole teacher: remove something (e.g. keep sd-nomid).")

    def outputs(self, job_dir: Path) -> Outputs:
        from .. import layouts

        source = Path(self.source).expanduser()
        stem = self.name or f"{source.name.removesuffix(source.suffix if source.is_file() else '')}-" \
                            f"{layouts.slug(self.keep)}"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "pruned"
        return Outputs(JobFolder(job_dir), self.output_dir, stem)


def run(config: PruneConfig, job_dir: Path, resume: str | None = None) -> str:
    """Prune (a resumed job starts over); progress.json says where the result went."""
    from ..prune import prune

    folder, started = JobFolder(job_dir), time.time()
    outputs = config.outputs(job_dir)
    target = outputs.single
    progress = Progress(state="running", total_steps=1, message=f"Pruning {config.source}.").update()
    folder.write_progress(progress)
    outputs.claim(target, outputs.yaml)
    target.parent.mkdir(parents=True, exist_ok=True)
    half = {"source": None, "fp16": True, "fp32": False}[config.precision]
    prune(config.source, target, config.keep, half=half, say=lambda line: print(line, flush=True))
    folder.write_progress(progress.update(state="done", step=1, message=f"Pruned into {target}.", output=str(target),
                                          elapsed_s=time.time() - started))
    return "done"
