"""`bksdm distill` and `bksdm dreambooth`: a training job from flags or a config file.

Every setting of the job's config is a flag (generated from the config dataclass, so the CLI, the
tab and config files can never disagree). The job runs in this process, or with `--write-only` its
folder is just prepared for the job runner.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = {
    "distill": "distillation retraining of a BK-SDM student from an SD teacher (paper recipe defaults)",
    "dreambooth": "DreamBooth personalisation (full or LoRA) of a BK-SDM or SD model",
}


def add_commands(sub) -> None:
    from ..train.config import config_class as config_for

    for kind in HELP:
        config_class = config_for(kind)
        p = sub.add_parser(kind, help=HELP[kind], argument_default=argparse.SUPPRESS)
        p.add_argument("--config", type=Path, help="read the settings from a .toml/.json file (flags override it)")
        p.add_argument("--job-dir", type=Path, help="job folder (default: ./bksdm-jobs/KIND-TIME)")
        p.add_argument("--resume", help="'latest' or a checkpoint folder of --job-dir")
        p.add_argument("--write-only", action="store_true", help="only write the job folder and its config.toml")
        for name, info in config_class.field_help().items():
            flag = "--" + name.replace("_", "-")
            kwargs = {"help": info["help"] + f" (default: {info['default']})"}
            if info["type"] == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            elif info["type"] == "list":
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = {"int": int, "float": float}.get(info["type"], str)
            if "choices" in info:
                kwargs["choices"] = info["choices"]
            if info["type"] != "bool":
                kwargs["metavar"] = name.upper()
            p.add_argument(flag, dest=f"setting_{name}", **kwargs)
        p.set_defaults(run=run_command, kind=kind)


def run_command(args: argparse.Namespace) -> int:
    from ..io import make_folder
    from ..train.config import config_class
    from ..train.core import run_job, progress_state

    cls = config_class(args.kind)
    settings = cls.load(args.config).to_dict() if getattr(args, "config", None) else {}
    settings.update({k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_")})
    config = cls.from_dict(settings)
    config.validate()
    job_dir = getattr(args, "job_dir", None) or Path("bksdm-jobs") / f"{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    make_folder(job_dir, "--job-dir")
    config.save(job_dir / "config.toml")
    if getattr(args, "write_only", False):
        print(f"Wrote {job_dir / 'config.toml'}; run: python -m bksdm_ext.train {args.kind} --job-dir {job_dir}")
        return 0
    code = run_job(args.kind, job_dir, getattr(args, "resume", None))
    state = progress_state(job_dir)
    print(f"{args.kind}: {state.get('state')} - {state.get('message', '')} (job folder {job_dir})")
    return code
