"""`bksdm evaluate` (the evaluate job, run here), `bksdm fid-stats` and `bksdm evaluations` (the history).

The evaluate flags are generated from the job's config (`EvaluateConfig.settings()`), so the CLI, the
tab and config files cannot disagree.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_commands(sub) -> None:
    from ..evaluate.config import EvaluateConfig
    from ..kinds import get

    p = sub.add_parser("evaluate", help=get("evaluate").help, argument_default=argparse.SUPPRESS,
                       description="Generate the same prompts at the same seeds with every model (the first is the "
                                   "teacher), then score them. Prints the table and writes results.json.")
    p.add_argument("--config", type=Path, help="read the settings from a .toml/.json file (flags override it)")
    p.add_argument("--job-dir", type=Path, help="job folder (default: ./bksdm-jobs/evaluate-TIME)")
    p.add_argument("--resume", action="store_true", help="keep the images already in --job-dir, generate the rest")
    for s in EvaluateConfig.settings():
        kwargs = {"help": s.help if s.positional else f"{s.help} (default: {s.default})"}
        if s.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif s.type == "list":
            kwargs["nargs"] = s.nargs or "+"
        else:
            kwargs["type"] = {"int": int, "float": float}.get(s.type, str)
        if s.choices:
            kwargs["choices"] = s.choices
        if s.positional:
            p.add_argument(f"setting_{s.name}", metavar=s.name.rstrip("s").upper(), **kwargs)
        else:
            metavar = {} if s.type == "bool" or s.choices else {"metavar": s.name.upper()}
            p.add_argument(s.flag, dest=f"setting_{s.name}", **metavar, **kwargs)
    p.set_defaults(run=evaluate_command)

    p = sub.add_parser("fid-stats", help="save the FID statistics of a reference image folder once, as a .npz")
    p.add_argument("folder", type=Path, help="reference images (e.g. MS-COCO val2014), searched recursively")
    p.add_argument("out", type=Path, help="the .npz to write (give it to evaluate as --reference)")
    p.add_argument("--inception", required=True, help="clean-fid's inception-2015-12-05.pt or its folder")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=fid_stats_command)

    p = sub.add_parser("evaluations", help="the history of evaluations: every model of every evaluate job")
    p.add_argument("roots", nargs="*", type=Path,
                   help="job folders or folders of them (default: $BKSDM_DATA_DIR/jobs or ~/.bksdm/jobs, ./bksdm-jobs)")
    p.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    p.set_defaults(run=evaluations_command)


def evaluate_command(args: argparse.Namespace) -> int:
    from ..evaluate.config import EvaluateConfig
    from ..job import JobFolder, run_job

    settings = EvaluateConfig.load(args.config).to_dict() if getattr(args, "config", None) else {}
    settings.update({k[len("setting_"):]: v for k, v in vars(args).items() if k.startswith("setting_")})
    config = EvaluateConfig.from_dict(settings)
    config.validate()
    folder = JobFolder(getattr(args, "job_dir", None) or Path("bksdm-jobs") / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.root.mkdir(parents=True, exist_ok=True)
    config.save(folder.config)
    code = run_job("evaluate", folder.root, "latest" if getattr(args, "resume", False) else None)
    progress = folder.read_progress()
    print(f"evaluate: {progress.state} - {progress.message} (job folder {folder.root})")
    return code


def fid_stats_command(args: argparse.Namespace) -> int:
    from ..evaluate import metrics

    inception = metrics.Inception(args.inception, args.device)
    stats = metrics.reference_statistics(args.folder, inception)
    stats.save(args.out)
    print(f"Wrote {args.out}: {metrics.FID_VARIANT} statistics of {stats.images} images in {args.folder}")
    return 0


def evaluations_command(args: argparse.Namespace) -> int:
    from ..evaluate import results

    rows = results.history(args.roots or None)
    print(results.format_history(rows) if rows else "No evaluations found.")
    if args.csv:
        results.write_csv(args.csv, rows)
        print(f"Wrote {len(rows)} rows to {args.csv}")
    return 0
