"""An evaluation's results: results.json (the table, the protocol, N, the paper's numbers beside it),
results.csv, grid.png (the same prompts: teacher | students), and the history across evaluations.

The history is the results.json of every evaluate job folder under the roots given (the runner's
data folder, the CLI's bksdm-jobs/): a student evaluated at each checkpoint shows its progress there.
"""

from __future__ import annotations

import csv
import io as _io
import os
import time
from pathlib import Path

from ..io import write_image, write_json, write_text
from ..job import JobFolder
from .config import EvaluateConfig
from .metrics import FID_VARIANT
from .run import image_path, model_dir, read_json_or_empty

FORMAT = "bksdm-evaluation-1"
# BK-SDM (arXiv 2305.15798) Table 2 / BKSDM.md §5: zero-shot MS-COCO 256 px, 30K val2014 captions, PNDM 25 steps,
# CFG 7.5, FID by pytorch-fid against the 41K val2014 statistics, IS by torch-fidelity, CLIP ViT-g-14.
PAPER_NOTE = ("published in the BK-SDM paper: MS-COCO val2014, 30K captions, 256 px, FID by pytorch-fid (not "
              "clean-fid), IS by torch-fidelity, CLIP score ViT-g-14 laion2b_s34b_b88k")
PAPER = (  # model, FID, IS, CLIP score
    ("SD-v1.4", 13.05, 36.76, 0.2958),
    ("BK-SDM-Base", 15.76, 33.79, 0.2878),
    ("BK-SDM-Base-2M", 14.81, 34.17, 0.2883),
    ("BK-SDM-Small", 16.98, 31.68, 0.2677),
    ("BK-SDM-Tiny", 17.12, 30.09, 0.2653),
)
COLUMNS = (  # (key, heading, format)
    ("fid", "FID", "{:.2f}"), ("is", "IS", "{:.2f}"), ("clip", "CLIP score", "{:.4f}"),
    ("pixel_mse", "pixel MSE vs teacher", "{:.5f}"), ("clip_image_similarity", "CLIP image sim. vs teacher", "{:.4f}"),
    ("seconds_per_image", "s/image", "{:.2f}"),
)


def write_results(config: EvaluateConfig, folder: JobFolder, prompts: list[str], scores: dict) -> dict:
    """Write results.json, results.csv and grid.png into the job folder; the results as a dict."""
    models = []
    for k, source in enumerate(config.models):
        info = read_json_or_empty(model_dir(folder.root / "images", k) / "model.json")
        models.append({"index": k, "role": "teacher" if k == 0 else "student", "source": str(source),
                       "name": info.get("name", Path(source).name), "layout": info.get("layout", ""),
                       "hash": info.get("hash", ""), "seconds_per_image": info.get("seconds_per_image"),
                       "device": info.get("device", ""), **scores["models"][k]})
    table = {
        "format": FORMAT, "job": folder.root.name, "folder": str(folder.root),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "images": len(prompts),
        "prompts": {"source": config.prompts, "limit": config.limit, "count": len(prompts)},
        "metrics": list(config.metric_names()), "fid_variant": FID_VARIANT, "reference": scores.get("reference"),
        "weights": scores.get("weights", {}),
        "protocol": {name: getattr(config, name) for name in ("sampler", "schedule", "steps", "cfg_scale", "resolution",
                                                               "eval_size", "seed", "negative_prompt")},
        "models": models,
        "paper": {"note": PAPER_NOTE, "rows": [dict(zip(("model", "fid", "is", "clip"), row)) for row in PAPER]},
    }
    write_json(folder.root / "results.json", table)
    write_csv(folder.root / "results.csv", rows_of(table))
    if config.grid_prompts:
        write_grid(folder.root / "grid.png", folder.root / "images", table, prompts[:config.grid_prompts])
    return table


def rows_of(table: dict) -> list[dict]:
    """One flat row per model of an evaluation (its protocol and N beside every number)."""
    protocol = table["protocol"]
    reference = table.get("reference") or {}
    out = []
    for model in table["models"]:
        out.append({
            "finished": table["finished"], "job": table["job"], "model": model["name"], "role": model["role"],
            "source": model["source"], "hash": model["hash"], "layout": model["layout"], "images": table["images"],
            **{key: model.get(key) for key, _, _ in COLUMNS}, "is_std": model.get("is_std"),
            "fid_variant": table["fid_variant"] if "fid" in model else "",
            "fid_reference": reference.get("source", ""), "fid_reference_images": reference.get("images", ""),
            "prompts": table["prompts"]["source"], "sampler": protocol["sampler"], "steps": protocol["steps"],
            "cfg_scale": protocol["cfg_scale"], "resolution": protocol["resolution"],
            "eval_size": protocol["eval_size"], "seed": protocol["seed"],
        })
    return out


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    buffer = _io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return write_text(path, buffer.getvalue())


def model_table(table: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the model x metric table, the numbers formatted (a metric no model has is left out)."""
    shown = [c for c in COLUMNS if any(m.get(c[0]) is not None for m in table["models"])]
    header = ["model", "layout", *(h for _, h, _ in shown)]
    body = [[f"{m['name']} ({m['role']})", m["layout"],
             *("-" if m.get(key) is None else fmt.format(m[key]) for key, _, fmt in shown)] for m in table["models"]]
    return header, body


def protocol_lines(table: dict) -> list[str]:
    """What the numbers depend on: N, the prompts, the protocol and seeds, and the FID variant and reference."""
    p = table["protocol"]
    lines = [f"Evaluation {table['job']}: N = {table['images']} images per model from {table['prompts']['source']}"
             f"; {p['sampler']}, {p['steps']} steps, CFG {p['cfg_scale']}, {p['resolution']} px -> "
             f"{p['eval_size']} px, seeds {p['seed']}..{p['seed'] + table['images'] - 1}"]
    if table.get("reference"):
        ref = table["reference"]
        lines.append(f"FID: {table['fid_variant']} mode, N = {table['images']} against {ref['source']} "
                     f"({ref['images']} images)")
    return lines


def paper_table() -> tuple[str, list[str], list[list[str]]]:
    """(what they are, header, rows) of the paper's published numbers, each model prefixed "paper:"."""
    rows = [["paper: " + row[0], f"{row[1]:.2f}", f"{row[2]:.2f}", f"{row[3]:.4f}"] for row in PAPER]
    return f"For reference only ({PAPER_NOTE}):", ["model", "FID", "IS", "CLIP score"], rows


def format_table(table: dict) -> str:
    """The model x metric table as text, with N and the protocol, and the paper's numbers labelled as such."""
    header, body = model_table(table)
    note, paper_header, paper = paper_table()
    return "\n".join([*protocol_lines(table), *_columns([header, *body]), "", note,
                      *_columns([paper_header, *paper])])


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def summary(table: dict) -> str:
    parts = []
    for model in table["models"]:
        values = [f"{h} {fmt.format(model[k])}" for k, h, fmt in COLUMNS[:4] if model.get(k) is not None]
        parts.append(f"{model['name']}: {', '.join(values) or 'no scores'}")
    return f"Evaluated {len(table['models'])} models on {table['images']} images. " + "; ".join(parts)


def write_grid(path: Path, images_root: Path, table: dict, prompts: list[str]) -> Path:
    """The first prompts as rows, the models as columns (teacher first), each cell the evaluated image."""
    from PIL import Image, ImageDraw

    size = table["protocol"]["eval_size"]
    models = table["models"]
    label = 20
    grid = Image.new("RGB", (size * len(models), label + size * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for k, model in enumerate(models):
        draw.text((k * size + 4, 4), f"{model['name']} ({model['role']})"[: size // 6], fill="black")
        for i in range(len(prompts)):
            with Image.open(image_path(images_root, k, i)) as cell:
                grid.paste(cell.convert("RGB").resize((size, size)), (k * size, label + i * size))
    return write_image(path, grid)


# --- history ------------------------------------------------------------------------------------


def default_roots() -> list[Path]:
    """Where evaluate jobs live: the runner's jobs in $BKSDM_DATA_DIR (or ~/.bksdm) and the CLI's ./bksdm-jobs."""
    data = Path(os.environ.get("BKSDM_DATA_DIR") or Path.home() / ".bksdm")
    return [data / "jobs", Path("bksdm-jobs")]


def load(job_dir: str | os.PathLike) -> dict | None:
    """The results.json of an evaluate job folder; None when it has none (not finished) or another format."""
    table = read_json_or_empty(Path(job_dir) / "results.json")
    return table if table.get("format") == FORMAT else None


def history(roots: list[str | os.PathLike] | None = None) -> list[dict]:
    """Every evaluated model of every evaluation under `roots` (job folders, or folders of them), oldest first."""
    seen, rows = set(), []
    for root in [Path(r) for r in (roots or default_roots())]:
        candidates = [root / "results.json"] + sorted(root.glob("*/results.json")) if root.is_dir() else []
        for path in candidates:
            table = load(path.parent)
            if table is None or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            rows += rows_of(table)
    return sorted(rows, key=lambda row: (row["finished"], row["job"]))


def history_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the history: each evaluated model of each evaluation, with N."""
    keys = [c for c in COLUMNS[:5] if any(r.get(c[0]) is not None for r in rows)]
    header = ["finished", "job", "model", "N", *(h for _, h, _ in keys)]
    body = [[r["finished"], r["job"], r["model"], str(r["images"]),
             *("-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in keys)] for r in rows]
    return header, body


def format_history(rows: list[dict]) -> str:
    header, body = history_table(rows)
    return "\n".join(_columns([header, *body]))
