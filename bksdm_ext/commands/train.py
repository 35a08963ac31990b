"""`bksdm KIND ...` for every job kind of `bksdm_ext.kinds` (distill, dreambooth, ...): a job from flags or a file.

Every setting of the kind's config is an argument, generated from its `JobConfig.settings()` (the
tab's form comes from the same descriptions, so the CLI, the tab and config files never disagree):
flags for most, positional arguments where a setting says so (`bksdm evaluate MODEL [MODEL ...]`).
The job runs in this process, or with `--write-only` its folder is just prepared for the job runner.
A kind whose name is already a command (`bksdm convert`) keeps that command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..job_config import Setting

PREFIX = "setting_"


def add_commands(sub) -> None:
    from .. import kinds

    for kind in kinds.all().values():
        if kind.name in sub.choices:
            continue
        p = sub.add_parser(kind.name, help=kind.help or kind.title, argument_default=argparse.SUPPRESS)
        add_job_arguments(p, kind.config_class())
        p.set_defaults(run=run_command, kind=kind.name)


def add_job_arguments(p: argparse.ArgumentParser, config_class) -> None:
    """The job options and one argument per setting of `config_class`."""
    p.add_argument("--config", type=Path, help="read the settings from a .toml/.json file (arguments override it)")
    p.add_argument("--job-dir", type=Path, help="job folder (default: ./bksdm-jobs/KIND-TIME)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder of --job-dir")
    p.add_argument("--write-only", action="store_true", help="only write the job folder and its config.toml")
    for s in config_class.settings():
        add_setting_argument(p, s)


def add_setting_argument(p: argparse.ArgumentParser, s: Setting) -> None:
    kwargs = {"help": f"{s.label}: {s.help} (default: {s.default})"}
    if s.type == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = {"int": int, "float": float}.get(s.type, str)
        kwargs["metavar"] = s.name.upper()
        if s.type == "list" or s.nargs:
            kwargs["nargs"] = s.nargs or "+"
    if s.choices and not s.custom:
        kwargs["choices"] = s.choices
    if s.positional:
        p.add_argument(PREFIX + s.name, **kwargs)
    else:
        p.add_argument(s.flag, dest=PREFIX + s.name, **kwargs)


def settings_of(args: argparse.Namespace) -> dict:
    return {k[len(PREFIX):]: v for k, v in vars(args).items() if k.startswith(PREFIX)}


def run_command(args: argparse.Namespace) -> int:
    from .. import kinds
    from ..io import make_folder
    from ..job import JobFolder, job_command, run_job

    cls = kinds.get(args.kind).config_class()
    settings = cls.load(args.config).to_dict() if getattr(args, "config", None) else {}
    settings.update(settings_of(args))
    config = cls.from_dict(settings)
    config.validate()
    default = Path("bksdm-jobs") / f"{args.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = JobFolder(make_folder(getattr(args, "job_dir", None) or default, "--job-dir"))
    config.save(folder.config)
    if getattr(args, "write_only", False):
        print(f"Wrote {folder.config}; run: python {' '.join(job_command(args.kind, folder.root, False))}")
        return 0
    code = run_job(args.kind, folder.root, getattr(args, "resume", None))
    progress = folder.read_progress()
    print(f"{args.kind}: {progress.state} - {progress.message} (job folder {folder.root})")
    return code
