"""`bksdm bench-generate` (the paper's timing protocol) and `bksdm timings export|import|show`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _add_db(p) -> None:
    p.add_argument("--db", type=Path, default=None,
                   help="timing database (default: $BKSDM_TIMINGS_DB, else timings.sqlite3 in $BKSDM_DATA_DIR or ~/.bksdm)")


def _open_store(args):
    from ..timings.store import TimingStore, default_path

    return TimingStore(args.db or default_path())


def add_commands(sub) -> None:
    from ..timings.protocol import SAMPLERS, SCHEDULES, Protocol

    default = Protocol()
    p = sub.add_parser("bench-generate", help="time image generation with the paper's protocol "
                       "(512x512, 20 steps, DPM++ 2M Karras, CFG 7, seed 1234) and record it")
    p.add_argument("models", nargs="+", type=Path, help="diffusers pipeline folders or single-file checkpoints (e.g. SD-v1.5 and BK-SDM-Base-2M)")
    p.add_argument("--images", type=int, default=default.images, help="measured images per model")
    p.add_argument("--warmup", type=int, default=default.warmup, help="warm-up images per model, not recorded")
    p.add_argument("--steps", type=int, default=default.steps)
    p.add_argument("--width", type=int, default=default.width)
    p.add_argument("--height", type=int, default=default.height)
    p.add_argument("--sampler", default=default.sampler, choices=list(SAMPLERS))
    p.add_argument("--schedule", default=default.schedule, choices=SCHEDULES)
    p.add_argument("--cfg", type=float, default=default.cfg_scale)
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--batch-size", type=int, default=default.batch_size)
    p.add_argument("--prompt", default=default.prompt)
    p.add_argument("--init-image", type=Path, default=None, help="img2img (SDEdit) from this image; needs --strength")
    p.add_argument("--strength", type=float, default=None, help="img2img denoising strength (the paper: 0.8)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "fp32", "bf16"),
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=("auto", "k-diffusion", "diffusers"),
                   help="sampler implementation (auto: k-diffusion when it imports)")
    _add_db(p)
    p.set_defaults(run=bench_generate_command)

    p = sub.add_parser("timings", help="export, import or show recorded generation timings")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("export", help="write every record to a CSV file")
    q.add_argument("file", type=Path)
    _add_db(q)
    q = actions.add_parser("import", help="add the records of a CSV (records already present are skipped)")
    q.add_argument("file", type=Path)
    _add_db(q)
    q = actions.add_parser("show", help="the comparison table: device x checkpoint x sampler x steps x size")
    q.add_argument("--reference", help="checkpoint to compute speed-ups against")
    q.add_argument("--device-name", dest="device", help="only this device (as shown in the table)")
    q.add_argument("--checkpoint", action="append", help="only these checkpoints (repeatable)")
    q.add_argument("--sampler")
    q.add_argument("--steps", type=int)
    q.add_argument("--size", help="WIDTHxHEIGHT")
    q.add_argument("--source", help="webui, bench, ...")
    q.add_argument("--plot", type=Path, help="also write the plots to this PNG")
    _add_db(q)
    p.set_defaults(run=timings_command)


def _load_image(path: Path, width: int, height: int):
    import numpy as np
    import torch
    from PIL import Image

    from ..errors import BKSDMError

    try:
        image = Image.open(path).convert("RGB").resize((width, height))
    except OSError as error:
        raise BKSDMError(f"Cannot read the init image {path}: {error}. Give a PNG or JPEG file.") from error
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1)
    return array.permute(2, 0, 1).unsqueeze(0)


def bench_generate_command(args: argparse.Namespace) -> int:
    import torch

    from ..timings import stats
    from ..timings.bench import run_benchmark
    from ..timings.protocol import Protocol

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": None, "fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    protocol = Protocol(width=args.width, height=args.height, steps=args.steps, sampler=args.sampler,
                        schedule=args.schedule, cfg_scale=args.cfg, seed=args.seed, warmup=args.warmup,
                        images=args.images, batch_size=args.batch_size, prompt=args.prompt, strength=args.strength)
    init = None
    if args.init_image is not None:
        init = _load_image(args.init_image, args.width, args.height).repeat(args.batch_size, 1, 1, 1)
    with _open_store(args) as store:
        records = run_benchmark(args.models, protocol, store, device, dtype, args.backend, init, progress=print)
        print(f"\n{len(records)} records written to {store.path}\n")
    reference = records[0].checkpoint if records else None
    print(stats.format_table(stats.group(records, reference)))
    return 0


def timings_command(args: argparse.Namespace) -> int:
    from ..timings import stats

    with _open_store(args) as store:
        if args.action == "export":
            print(f"Exported {store.export_csv(args.file)} records from {store.path} to {args.file}")
        elif args.action == "import":
            print(f"Imported {store.import_csv(args.file)} new records from {args.file} into {store.path}")
        else:
            records = stats.filter_records(store.records(), args.device, args.checkpoint, args.sampler,
                                           args.steps, args.size, args.source)
            rows = stats.group(records, args.reference)
            print(stats.format_table(rows) if rows else f"No records in {store.path} match.")
            if args.plot and rows:
                stats.save_plots_png(rows, records, args.plot)
                print(f"Plots written to {args.plot}")
    return 0
