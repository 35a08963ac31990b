"""`bksdm prune`: remove blocks from an SD-1/2 model without retraining."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import layouts


def add_commands(sub) -> None:
    p = sub.add_parser("prune", help="remove blocks from an SD-1.x/2.x model (weights copied, not retrained)",
                       description="BK-SDM App. B: --remove mid writes SD without its mid-stage (sd-nomid). "
                       "--keep builds any layout of SD's blocks: " + layouts.SPEC_HELP.format(
                           names=", ".join(layouts.STUDENTS)))
    p.add_argument("teacher", type=Path, help="an SD-1.x/2.x checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("out", type=Path, help="a .safetensors file (WebUI checkpoint, yaml beside it) or a new folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--remove", help="what to remove: mid, inner, or mid,inner")
    what.add_argument("--keep", help="what to keep: a layout name or a spec, e.g. 'down=2,1,1,2 mid=no'")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--half", dest="half", action="store_true", default=None, help="write fp16")
    precision.add_argument("--full", dest="half", action="store_false", help="write fp32")
    p.add_argument("--version", choices=list(layouts.VERSIONS),
                   help="the SD version, when it cannot be read from the source (v2-base and v2-768 share shapes)")
    p.set_defaults(run=prune_command)


def prune_command(args: argparse.Namespace) -> int:
    from ..prune import layout_to_keep, prune

    prune(args.teacher, args.out, layout_to_keep(args.keep, args.remove), half=args.half, version=args.version)
    return 0
