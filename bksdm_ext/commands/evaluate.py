"""`bksdm fid-stats` (a reference folder's FID statistics, once) and `bksdm evaluations` (the history).

`bksdm evaluate MODEL [MODEL ...]` itself is the evaluate job kind's command, generated from its config
like every kind's (commands/train.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
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
