"""`bksdm lora remap`: an SD LoRA file placed on a BK layout, for other front-ends (ComfyUI, diffusers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import layouts


def add_commands(sub) -> None:
    lora = sub.add_parser("lora", help="LoRA files and BK-SDM layouts")
    commands = lora.add_subparsers(dest="lora_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "remap", help="write a LoRA placed on a BK layout by the block map",
        description="Each U-Net module of the LoRA goes to the student block copied from its teacher block; modules "
                    "of removed blocks are dropped. Exact for a student that was not retrained; on distilled "
                    "weights (the published BK-SDM models) the effect is approximate.")
    p.add_argument("src", type=Path, help="a LoRA .safetensors (kohya, LDM or diffusers/peft naming)")
    p.add_argument("dst", type=Path, help="the .safetensors to write")
    p.add_argument("--layout", required=True, choices=[n for n in layouts.LAYOUTS if n != "teacher"],
                   help="the BK layout to place it on")
    p.add_argument("--from", dest="source", choices=list(layouts.LAYOUTS),
                   help="the layout it was made for (teacher = SD); default: read from the file")
    p.add_argument("--naming", choices=["kohya", "ldm"],
                   help="key naming of the result (default: the file's; diffusers/peft files become kohya)")
    p.set_defaults(run=remap_command)


def remap_command(args: argparse.Namespace) -> int:
    from ..addons import lora
    from ..errors import BKSDMError
    from ..io import read_weights, write_safetensors

    if args.dst.resolve() == args.src.resolve():
        raise BKSDMError("Write the remapped LoRA to a new file: OUT is the input file.")
    if args.dst.suffix != ".safetensors":
        raise BKSDMError(f"{args.dst.name}: the remapped LoRA is written as .safetensors; name it so.")
    tensors, metadata = read_weights(args.src)
    if args.source:
        decided = lora.MadeFor(args.source, "--from")
    else:
        decided = lora.made_for(tensors, metadata, args.layout)
    placement = lora.remap(tensors, decided.layout, args.layout, args.naming)
    if not placement.placed and placement.modules:
        raise BKSDMError(f"None of the {placement.modules} U-Net modules of {args.src.name} has a place on "
                         f"{layouts.get_layout(args.layout).title}; nothing was written.")
    write_safetensors(args.dst, placement.tensors, lora.remapped_metadata(metadata, placement))
    source = "SD" if decided.layout == "teacher" else layouts.get_layout(decided.layout).title
    print(f"{args.src.name}: made for {source} (from its {decided.reason}).")
    if decided.note:
        print(decided.note + (" If it was trained on SD-1.x/2.x, pass --from teacher." if decided.ambiguous else ""))
    print(f"Wrote {args.dst} ({placement.naming} naming): {placement.summary(args.src.stem)}.")
    return 0
