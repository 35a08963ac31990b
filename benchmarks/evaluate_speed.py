"""Generation time of the evaluate job per image: full-size random SD-v1 and BK-SDM-Small, in one run.

    python benchmarks/evaluate_speed.py [--images 3] [--resolution 256] [--steps 25] [--device cpu] [--work DIR]

Both pipelines are random weights in the published shapes (tests/tiny.py's full-size builders, written
once into --work in fp16 and loaded in fp32 on the CPU); speed does not depend on the weights' values.
Each model generates the same prompts at the same seeds through the evaluate job's engine (the timing
benchmark's `Generator`, the paper's protocol: PNDM, CFG 7.5). The models take turns, one image each a
round (one pipeline in memory at a time, the order alternating), so a change of the machine's load
touches both alike; the first round is a warm-up and is not counted. Prints seconds per image and
minutes per 100 images, with the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny.py: the full-size random builders

from bksdm_ext.evaluate.config import EvaluateConfig  # noqa: E402
from bksdm_ext.evaluate.prompts import read_prompts  # noqa: E402
from bksdm_ext.timings.bench import Generator, load_pipeline  # noqa: E402

MODELS = (("SD-v1 (random)", "sd-v1", "teacher"), ("BK-SDM-Small (random)", "bk-small", "small"))  # folders as few_step.py's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="measured images per model (plus one warm-up)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="folder for the random pipelines (default: a temp folder)")
    args = parser.parse_args()

    from tiny import full_size_pipeline

    config = EvaluateConfig(resolution=args.resolution, steps=args.steps, device=args.device)
    protocol = config.protocol()
    prompts = read_prompts(limit=args.images + 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bksdm-evaluate-speed-"))
    folders = {label: full_size_pipeline(work / name, layout) for label, name, layout in MODELS}
    load_before = os.getloadavg()
    results = {label: [] for label, *_ in MODELS}
    for i, prompt in enumerate(prompts):
        for label in (list(folders) if i % 2 == 0 else list(folders)[::-1]):
            generator = Generator(load_pipeline(folders[label], args.device))
            start = time.perf_counter()
            generator(protocol, [config.seed + i], prompts=[prompt])
            seconds = time.perf_counter() - start
            if i:  # the first round warms up
                results[label].append(seconds)
            print(f"{label}: {'warm-up' if not i else f'image {i}/{args.images}'} {seconds:.1f} s", flush=True)
            generator.close()
            del generator
            gc.collect()
    print(f"\n{protocol.sampler}, {protocol.steps} steps, CFG {protocol.cfg_scale}, {args.resolution} px, "
          f"device {args.device}, {args.images} measured images per model; load average (1 min) "
          f"{load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    base = statistics.mean(results["SD-v1 (random)"])
    for label, seconds in results.items():
        mean = statistics.mean(seconds)
        print(f"{label:24s} {mean:7.2f} s/image  {mean * 100 / 60:7.1f} min per 100 images  "
              f"x{base / mean:.2f} vs SD-v1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
