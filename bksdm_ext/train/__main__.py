"""`python -m bksdm_ext.train KIND --job-dir DIR [--resume latest]`: run the job in DIR (its config.toml).

This is what the job runner starts (also under `accelerate launch`). Progress goes to DIR/progress.json,
the log to stdout; the exit code is 0 when the job is done or cancelled, 1 when it failed.
"""

from __future__ import annotations

import argparse
import sys

from .config import CONFIGS
from .core import run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bksdm_ext.train")
    parser.add_argument("kind", choices=sorted(CONFIGS))
    parser.add_argument("--job-dir", required=True, help="The job folder, with config.toml in it.")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest complete checkpoint, or a fresh start if none) or a checkpoint folder.")
    args = parser.parse_args(argv)
    return run_job(args.kind, args.job_dir, args.resume)


if __name__ == "__main__":
    sys.exit(main())
