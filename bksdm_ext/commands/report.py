"""`bksdm build-student` and `bksdm report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import layouts


def add_commands(sub) -> None:
    p = sub.add_parser("build-student", help="build a BK-SDM student U-Net from an SD teacher (no training)")
    p.add_argument("--teacher", required=True, help="diffusers pipeline folder or unet folder of SD-1.x/2.x")
    p.add_argument("--layout", required=True, help=f"{', '.join(layouts.STUDENTS)} or a custom spec, "
                   "e.g. 'down=2,1,1,2 mid=no'")
    p.add_argument("out", type=Path, help="output folder: a pipeline folder (teacher's other parts copied) "
                   "when the teacher is a pipeline, else a unet folder")
    p.set_defaults(run=build_student_command)

    p = sub.add_parser("report", help="parameters and MACs per layout; --time adds forward-time ratios")
    p.add_argument("--version", default="v1", choices=list(layouts.VERSIONS))
    p.add_argument("--layout", action="append", default=[], dest="extra",
                   help="also count this layout (a custom spec, e.g. 'down=2,1,1,2 mid=no'); repeatable")
    p.add_argument("--time", action="store_true", help="measure U-Net forward time of each layout, side by side")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(run=report_command)


def build_student_command(args: argparse.Namespace) -> int:
    from ..pipeline_folder import load_teacher_unet, write_student_folder
    from ..student import build_student

    teacher, pipeline_root = load_teacher_unet(args.teacher)
    student, report = build_student(teacher, args.layout)
    write_student_folder(student, args.out, pipeline_root)
    print(report.summary())
    print(f"Written to {args.out}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from ..report import format_report, forward_times, layout_costs

    extra = [layouts.get_layout(spec).name for spec in args.extra]  # a bad spec fails before any counting
    costs = layout_costs(args.version, args.latent, extra)
    times = forward_times(args.version, args.latent, args.repeats, args.threads, extra) if args.time else None
    print(f"U-Net of each layout ({args.version}, {args.latent}x{args.latent} latent, batch 1"
          + (f", fp32, {args.threads} threads, median of {args.repeats}" if times else "") + ")")
    print(format_report(costs, times))
    return 0
