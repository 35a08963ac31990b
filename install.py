"""Run by the WebUI (at start and after "Install from URL"): installs only what sd-webui-bk-sdm needs and
the WebUI lacks, in versions that coexist with the WebUI's pins.

Everything goes in with --no-deps: what it needs (transformers, accelerate, safetensors, huggingface_hub,
numpy, protobuf, …) is already pinned by the WebUI, and letting pip resolve them would upgrade
those pins. diffusers 0.32+ fails to import with transformers 4.30 and 0.36+ needs huggingface_hub 1.x;
peft after 0.13.2 needs a newer accelerate. Nothing x86-only (xformers, bitsandbytes) is installed: the
WebUI manages xformers itself, and Jetson (aarch64) machines must not get them.
"""

import importlib.metadata
import sys

# distribution, lowest and highest version that work with the WebUI's pins, what to install
NEEDS = (
    ("diffusers", (0, 29, 0), (0, 31, 999), "diffusers==0.31.0"),
    ("peft", (0, 7, 0), (0, 13, 2), "peft==0.13.2"),
    # TensorBoard events of training jobs without tensorboard itself (needs protobuf >= 3.20, numpy, packaging)
    ("tensorboardX", (2, 6, 0), (99, 0, 0), "tensorboardX==2.6.5"),
    # the Models view's MAC counts (pure Python over torch)
    ("thop", (0, 1, 1), (99, 0, 0), "thop==0.1.1.post2209072238"),
    # diffusers' metadata requires these (it imports them only on old Pythons): keeps `pip check` clean
    ("importlib_metadata", (4, 4, 0), (99, 0, 0), "importlib-metadata==8.5.0"),
    ("zipp", (3, 20, 0), (99, 0, 0), "zipp==3.21.0"),
) + ((("tomli", (1, 1, 0), (99, 0, 0), "tomli==2.0.1"),) if sys.version_info < (3, 11) else ())  # job configs


def _version(text):
    parts = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (3 - len(parts)))


def missing():
    """The install specs of packages absent or outside the working range."""
    todo = []
    for name, lowest, highest, spec in NEEDS:
        try:
            installed = _version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            todo.append(spec)
            continue
        if not lowest <= installed <= highest:
            todo.append(spec)
    return todo


def main():
    todo = missing()
    if not todo:
        return
    import launch  # the WebUI's; imported only when something must be installed (it is slow to import)

    if getattr(getattr(launch, "args", None), "skip_install", False):
        print(f"[BK-SDM] --skip-install: not installing {', '.join(todo)}; BK-SDM training needs them.")
        return
    for spec in todo:
        launch.run_pip(f"install --no-deps {spec}", f"{spec} for BK-SDM")


if __name__ == "__main__":
    main()
