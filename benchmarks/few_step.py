"""Few-step speed: BK + its LCM at 2/4/8 steps against the same BK at 20 and SD at 25 and 20, in one run.

SD + LCM(-LoRA) at 4 steps is a row too (LCM-LoRA for SD-1.5, merged, is SD's U-Net).

    python benchmarks/few_step.py [--size 256] [--images 1] [--warmup 1] [--threads 2] [--work DIR]

Every row goes through the project's one generation engine (`bksdm_ext.timings.bench.measure`, what
`bksdm bench-generate` runs for each batch) into one timing store; the table prints s/image and the
ratios to SD at 25 steps (the paper's protocol) and at 20 (the Orin protocol). The rows are measured in
rounds (one image of every row a round), so a change of the machine's load touches all rows alike; the
load average at the start and the end is printed with the table.

Models: full-size SD-v1 and BK-SDM-Small pipelines with random weights (nothing is downloaded),
written once into --work. An LCM model of BK-SDM-Small (a merged LCM-LoRA or a full LCM checkpoint)
has exactly the BK U-Net, so its speed is the BK folder's under the LCM sampler: CFG 1 (no
unconditional batch), as few-step models are used. The other rows: DPM++ 2M Karras, CFG 7.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

ROWS = [  # (label, model, sampler, steps, cfg)
    ("BK-Small + LCM, 2 steps", "bk-small", "LCM", 2, 1.0),
    ("BK-Small + LCM, 4 steps", "bk-small", "LCM", 4, 1.0),
    ("BK-Small + LCM, 8 steps", "bk-small", "LCM", 8, 1.0),
    ("BK-Small, 20 steps", "bk-small", "DPM++ 2M", 20, 7.0),
    ("SD-v1 + LCM(-LoRA), 4 steps", "sd-v1", "LCM", 4, 1.0),
    ("SD-v1, 25 steps", "sd-v1", "DPM++ 2M", 25, 7.0),
    ("SD-v1, 20 steps", "sd-v1", "DPM++ 2M", 20, 7.0),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1, help="measured images per row")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up images per row (not counted)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the random pipelines (default: a temp folder)")
    args = parser.parse_args(argv)

    import torch

    from bksdm_ext.timings import bench
    from bksdm_ext.timings import device as device_info
    from bksdm_ext.timings.protocol import Protocol
    from bksdm_ext.timings.store import TimingStore, new_record_id
    from tiny import full_size_pipeline

    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bksdm-few-step-"))
    folders = {name: full_size_pipeline(work / name, layout) for name, layout in (("sd-v1", "teacher"),
                                                                                  ("bk-small", "small"))}
    # Rounds: each round measures one image of every row, so a change of the machine's load during the
    # run touches every row alike. One pipeline is in memory at a time; the model order alternates.
    protocols = {label: Protocol(width=args.size, height=args.size, steps=steps, sampler=sampler, cfg_scale=cfg,
                                 schedule="normal" if sampler == "LCM" else "karras", warmup=args.warmup,
                                 images=args.images)
                 for label, _, sampler, steps, cfg in ROWS}
    for protocol in protocols.values():
        bench.check_protocol(protocol)
    described, run_id = device_info.describe("cpu"), new_record_id()[:12]
    load_before = os.getloadavg()
    measured = {label: [] for label, *_ in ROWS}
    with TimingStore(work / "timings.sqlite3") as store:
        for index in range(args.warmup + args.images):
            models = list(folders) if index % 2 == 0 else list(folders)[::-1]
            for model in models:
                generator = bench.Generator(bench.load_pipeline(folders[model], "cpu", torch.float32))
                for label, row_model, *_ in ROWS:
                    if row_model != model:
                        continue
                    record = bench.measure(generator, protocols[label], index, run_id, described)
                    kind = "warm-up" if index < args.warmup else f"image {index - args.warmup + 1}/{args.images}"
                    print(f"{label}: {kind} {record.seconds_per_image:.3f} s, {record.unet_calls} U-Net calls",
                          flush=True)
                    if index >= args.warmup:
                        store.add(record)
                        measured[label].append(record.seconds_per_image)
                generator.close()
                del generator
                gc.collect()
    seconds = {label: statistics.mean(values) for label, values in measured.items()}
    sd25, sd20 = seconds["SD-v1, 25 steps"], seconds["SD-v1, 20 steps"]
    print(f"\n{args.size}x{args.size}, fp32, {args.threads} threads, {args.images} measured image(s) a row, "
          f"{args.warmup} warm-up; load average (1 min) {load_before[0]:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("| model, steps | s/image | vs SD 25 steps | vs SD 20 steps |")
    print("|---|---:|---:|---:|")
    for label, value in seconds.items():
        print(f"| {label} | {value:.2f} | {sd25 / value:.2f}x | {sd20 / value:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
