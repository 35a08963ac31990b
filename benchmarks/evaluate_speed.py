"""Generation time of the evaluate job per image: full-size random SD-v1 and BK-SDM-Small, in one run.

    python benchmarks/evaluate_speed.py [--images 4] [--resolution 256] [--steps 25] [--device cpu]

Both pipelines are random weights in the published shapes (tests/tiny.py's full-size builders, ~1.7 and
~1.2 GB in fp16, loaded in fp32 on the CPU); speed does not depend on the weights' values. Each model
generates the same prompts at the same seeds through the evaluate job's engine (the timing benchmark's
`Generator`, the paper's protocol: PNDM, CFG 7.5), one after the other in this process; the first image
of each model is a warm-up and is not counted. Prints seconds per image and per 100 images.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny.py: the full-size random builders

from bksdm_ext.evaluate.config import EvaluateConfig  # noqa: E402
from bksdm_ext.evaluate.prompts import read_prompts  # noqa: E402
from bksdm_ext.timings.bench import Generator, load_pipeline  # noqa: E402


def write_random_pipeline(folder: Path, layout: str) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny import SD_VAE_CONFIG, random_full_size, text_encoder_config, write_pipeline
    from transformers import CLIPTextModel

    from bksdm_ext import layouts

    return write_pipeline(folder, random_full_size(UNet2DConditionModel, layouts.unet_config(layout, "v1"), 0),
                          random_full_size(AutoencoderKL, SD_VAE_CONFIG, 1),
                          random_full_size(CLIPTextModel, text_encoder_config("v1"), 2), "v1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="measured images per model (plus one warm-up)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    config = EvaluateConfig(resolution=args.resolution, steps=args.steps, device=args.device)
    protocol = config.protocol()
    prompts = read_prompts(limit=args.images + 1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the smaller model first: a shared machine short of memory fails before the long part
        for label, layout in (("BK-SDM-Small (random)", "small"), ("SD-v1 (random)", "teacher")):
            folder = write_random_pipeline(Path(tmp) / layout, layout)
            generator = Generator(load_pipeline(folder, args.device))
            seconds = []
            for i, prompt in enumerate(prompts):
                start = time.perf_counter()
                generator(protocol, [config.seed + i], prompts=[prompt])
                if i:  # the first image warms up
                    seconds.append(time.perf_counter() - start)
                print(f"{label}: image {i + 1}/{len(prompts)} {time.perf_counter() - start:.1f} s", flush=True)
            results[label] = seconds
            generator.close()
            del generator
            gc.collect()
            shutil.rmtree(folder)
    print(f"\n{protocol.sampler}, {protocol.steps} steps, CFG {protocol.cfg_scale}, {args.resolution} px, "
          f"device {args.device}, {args.images} measured images per model")
    base = statistics.mean(results["SD-v1 (random)"])
    for label, seconds in sorted(results.items(), key=lambda item: not item[0].startswith("SD")):
        mean = statistics.mean(seconds)
        print(f"{label:24s} {mean:7.2f} s/image  {mean * 100 / 60:7.1f} min per 100 images  "
              f"x{base / mean:.2f} vs SD-v1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
