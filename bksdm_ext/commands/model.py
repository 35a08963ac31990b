"""`bksdm convert` and `bksdm inspect`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import layouts


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="diffusers folder <-> one .safetensors in the WebUI's (LDM) key layout",
                       description="The direction follows the forms: a folder or file in; a .safetensors out "
                       "(LDM keys, with its .yaml beside it for a whole model) or a folder out (diffusers).")
    p.add_argument("src", type=Path, help="diffusers pipeline or unet folder, or a .safetensors/.ckpt file")
    p.add_argument("dst", type=Path, help="a .safetensors file, or a new folder for the diffusers form")
    p.add_argument("--half", action="store_true", help="write fp16 (default fp32)")
    p.add_argument("--version", choices=list(layouts.VERSIONS),
                   help="the SD version, when it cannot be read from the source (v2-base and v2-768 share shapes)")
    p.add_argument("--tokenizer", type=Path,
                   help="to a diffusers folder: a CLIP tokenizer folder, or a pipeline folder to copy tokenizer/ from")
    p.add_argument("--overwrite", action="store_true", help="replace an existing .safetensors and its .yaml")
    p.set_defaults(run=convert_command)

    p = sub.add_parser("inspect", help="layout, version, parameters, dtypes and key check of a model")
    p.add_argument("path", type=Path, help="a .safetensors/.ckpt file or a diffusers folder")
    p.set_defaults(run=inspect_command)


def convert_command(args: argparse.Namespace) -> int:
    from ..convert import convert

    for line in convert(args.src, args.dst, half=args.half, version=args.version, tokenizer=args.tokenizer,
                        overwrite=args.overwrite):
        print(line)
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from ..model_info import model_info

    print("\n".join(model_info(args.path).lines()))
    return 0
