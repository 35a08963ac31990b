"""Reading and writing weights safely: safetensors first, pickles only through `weights_only`.

Everything we write is a `.safetensors` (or a small text file) written atomically: a temporary file
in the target's folder, flushed to disk, then `os.replace`d over the final name, so a crash never
leaves a half-written file under that name.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BKSDMError

if TYPE_CHECKING:
    import torch

StateDict = dict[str, "torch.Tensor"]  # torch is imported where tensors are read: text writes stay light

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# A diffusers component folder holds its weights under one of these names, best first.
_WEIGHT_NAMES = {
    "diffusion_pytorch_model": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"),
    "model": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"),
}
COMPONENTS = ("unet", "vae", "text_encoder")


# --- single files -------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Tensors and header metadata of a `.safetensors` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        if not path.is_file():
            raise BKSDMError(f"{path} does not exist.") from None
        raise BKSDMError(
            f"{path} is not a complete safetensors file ({error}): it is truncated or corrupt; "
            "download or copy it again."
        ) from None
    return tensors, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Only the header metadata of a `.safetensors` file (cheap: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise BKSDMError(f"{path} is not a readable safetensors file ({error}).") from None


def read_pickle_weights(path: str | os.PathLike) -> StateDict:
    """A `.ckpt` / `.pt` / `.bin` state dict, loaded only if torch's `weights_only` unpickler accepts it."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BKSDMError(f"{path} does not exist.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise BKSDMError(
            f"{path} contains Python objects besides tensors{what}, so it was not loaded: unpickling it "
            "could run code. Convert it to .safetensors with a tool you trust and use that file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise BKSDMError(f"{path} is not a readable PyTorch checkpoint ({error}); it may be truncated.") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # Lightning / original SD checkpoints nest the weights
    if not isinstance(data, dict):
        raise BKSDMError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    return {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}


def read_weights(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Tensors and metadata of a single weights file, by its suffix."""
    path = Path(path)
    if not path.exists():
        raise BKSDMError(f"{path} does not exist.")
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return read_pickle_weights(path), {}
    raise BKSDMError(f"{path}: unknown weights format; use .safetensors (or .ckpt/.pt/.bin).")


# --- diffusers folders --------------------------------------------------------------------------


@dataclass
class DiffusersFolder:
    """The weights and configs of a diffusers pipeline folder, or of a lone U-Net folder."""

    path: Path
    weights: dict[str, StateDict]  # by component: unet, vae, text_encoder (those present)
    configs: dict[str, dict] = field(default_factory=dict)  # component configs, scheduler, model_index
    files: dict[str, Path] = field(default_factory=dict)  # the weights file each component came from

    @property
    def is_pipeline(self) -> bool:
        return set(self.weights) != {"unet"} or "model_index" in self.configs


# --- what a model source is: the one answer (training configs, the convert job, loaders ask here) ---

WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # single files `read_weights` reads


def unet_folder(path: str | os.PathLike) -> tuple[Path, Path | None] | None:
    """(the U-Net's folder, the pipeline root or None) of a diffusers pipeline or lone U-Net folder, else None.

    A pipeline has unet/config.json (and usually model_index.json); a lone U-Net folder has config.json
    and a diffusion_pytorch_model* weights file.
    """
    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        return path / "unet", path
    if (path / "config.json").is_file() and _weights_file(path, "diffusion_pytorch_model") is not None:
        return path, None
    return None


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and unet_folder(path) is not None


def is_weights_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES


def check_model_source(source: str, name: str, hub: bool = True) -> None:
    """A model is a diffusers folder, a single weights file, or (with `hub`) an id 'owner/name' (needs internet).

    Raises BKSDMError naming `name` (the setting) and what to give instead.
    """
    if not source:
        raise BKSDMError(f"Set {name}: a diffusers folder or a .safetensors/.ckpt checkpoint.")
    path = Path(source).expanduser()
    if path.is_dir():
        if unet_folder(path) is None:
            raise BKSDMError(f"{name} {source} is a folder without unet/config.json: give a diffusers pipeline folder.")
    elif path.is_file():
        if not is_weights_file(path):
            raise BKSDMError(f"{name} {source} is not a .safetensors or {'/'.join(PICKLE_SUFFIXES)} checkpoint.")
    elif not hub or os.path.isabs(source) or source.count("/") != 1 or source.startswith((".", "~")):
        raise BKSDMError(f"{name} {source} does not exist: give an existing folder or checkpoint file.")


def _weights_file(folder: Path, stem: str) -> Path | None:
    return next((folder / name for name in _WEIGHT_NAMES[stem] if (folder / name).is_file()), None)


def read_component(folder: str | os.PathLike) -> tuple[StateDict, Path]:
    """The weights of one diffusers component folder (unet/, vae/, text_encoder/) and their file."""
    folder = Path(folder)
    file = _weights_file(folder, "diffusion_pytorch_model") or _weights_file(folder, "model")
    if file is None:
        names = ", ".join(_WEIGHT_NAMES["diffusion_pytorch_model"][:2] + _WEIGHT_NAMES["model"][:2])
        raise BKSDMError(f"{folder} has no weights file (looked for {names}).")
    tensors = read_safetensors(file)[0] if file.suffix == ".safetensors" else read_pickle_weights(file)
    return tensors, file


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BKSDMError(f"{path} is not a readable JSON file ({error}).") from None


def read_diffusers_folder(path: str | os.PathLike) -> DiffusersFolder:
    """A pipeline folder (unet/ vae/ text_encoder/ ... model_index.json) or a U-Net folder."""
    path = Path(path)
    if not is_diffusers_folder(path):
        raise BKSDMError(
            f"{path} is not a diffusers folder: expected model_index.json and unet/ (a pipeline) "
            "or config.json with diffusion_pytorch_model.safetensors (a U-Net)."
        )
    folder = DiffusersFolder(path, {})
    if _weights_file(path, "diffusion_pytorch_model") is not None and not (path / "unet").is_dir():
        parts = {"unet": path}
        # a unet/ inside a pipeline: its scheduler says what the U-Net predicts
        scheduler = path.parent / "scheduler" / "scheduler_config.json"
        if scheduler.is_file():
            folder.configs["scheduler"] = read_json(scheduler)
    else:
        parts = {name: path / name for name in COMPONENTS if (path / name).is_dir()}
        if "unet" not in parts:
            raise BKSDMError(f"{path} has no unet/ folder.")
        for name in ("model_index", "scheduler"):
            file = path / ("model_index.json" if name == "model_index" else "scheduler/scheduler_config.json")
            if file.is_file():
                folder.configs[name] = read_json(file)
    for name, part in parts.items():
        folder.weights[name], folder.files[name] = read_component(part)
        if (part / "config.json").is_file():
            folder.configs[name] = read_json(part / "config.json")
    return folder


def load_pretrained(cls, folder: str | Path, **kwargs):
    """`cls.from_pretrained(folder)` that never unpickles: safetensors weights load as they are (the
    library is told to use nothing else), and a folder with only `.bin` weights is read through
    io.read_pickle_weights (torch's `weights_only` loader) into a model built from its config.

    transformers 4.30 calls torch.load on a `.bin` without `weights_only`, and the WebUI's torch 2.0/2.1
    then runs any code the pickle holds; older diffusers do the same.
    """
    folder = Path(folder)
    file = _weights_file(folder, "diffusion_pytorch_model") or _weights_file(folder, "model")
    if file is None:
        raise BKSDMError(f"{folder} has no weights file (model.safetensors or diffusion_pytorch_model.safetensors).")
    variant = "fp16" if ".fp16." in file.name else None
    if file.suffix == ".safetensors":
        return cls.from_pretrained(folder, use_safetensors=True, variant=variant, **kwargs)
    if hasattr(cls, "config_class"):  # transformers
        model = cls(cls.config_class.from_pretrained(folder))
    else:  # diffusers
        model = cls.from_config(cls.load_config(folder))
    missing, unexpected = model.load_state_dict(read_pickle_weights(file), strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]  # a buffer some versions do not save
    if missing:
        raise BKSDMError(f"{file} lacks {len(missing)} weights of {cls.__name__} (e.g. {missing[0]}): it is not "
                         f"this model's state dict. Convert the folder to .safetensors and use that.")
    dtype = kwargs.get("torch_dtype")
    return (model.to(dtype) if dtype is not None else model).eval()


# --- disk space ---------------------------------------------------------------------------------


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


def folder_bytes(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the files under `folder`, leaving out its top-level entries named in `skip`."""
    total = 0
    for item in Path(folder).iterdir():
        if item.name in skip:
            continue
        if item.is_dir():
            total += folder_bytes(item)
        elif item.is_file():
            total += item.stat().st_size
    return total


def existing_parent(path: str | os.PathLike) -> Path:
    """`path` if it exists, else its nearest existing parent (where it would be created)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (or would hold it)."""
    return shutil.disk_usage(existing_parent(path)).free


def disk_full(error: BaseException) -> bool:
    """A full disk, as Python (ENOSPC) or safetensors (its Rust error's text) reports it."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)


def require_free_space(path: str | os.PathLike, needed: int, what: str, advice: str) -> int:
    """Refuse with a clear message, before the work starts, when `what` cannot fit under `path`.

    Returns the free bytes it found.
    """
    free = free_bytes(path)
    if free < needed:
        raise BKSDMError(f"Not enough disk space: {what} needs about {human_size(needed)} under {path}, "
                         f"but only {human_size(free)} is free. {advice}")
    return free


# --- names and folders given by the user ------------------------------------------------------


def check_name(value: str, what: str) -> str:
    """`value` if it is a plain file name (or empty: the default); else BKSDMError saying so.

    A name never becomes a path: no separator, not '.' or '..', not absolute, no drive, not hidden
    (our temporary files start with a dot), no control characters.
    """
    if not isinstance(value, str):
        raise BKSDMError(f"{what} must be a name (text), not {value!r}.")
    if not value:
        return value
    if (value in (".", "..") or any(c in value for c in "/\\:") or value.startswith(".") or value != value.strip()
            or any(ord(c) < 32 for c in value) or os.path.isabs(value)):
        raise BKSDMError(f"{what} must be a plain file name (no / \\ or :, not '..', not starting with a dot), "
                         f"not {value!r}.")
    return value


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, a folder that cannot be written: a file in the way, or no permission.

    Nothing is created: where the folder does not exist yet, its nearest existing parent is tried.
    """
    path = Path(folder).expanduser()
    where = existing_parent(path)
    if not where.is_dir():
        raise BKSDMError(f"{what} {path} cannot be a folder: {where} is a file. Choose another folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bksdm-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise BKSDMError(f"{what} {path} is not writable ({error.strerror or error}): choose a folder you can "
                         "write to, or fix its permissions.") from None
    return path


def make_folder(folder: str | os.PathLike, what: str) -> Path:
    """Create `folder` (and its parents) once it passed `check_writable`; one line of error otherwise."""
    path = check_writable(folder, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BKSDMError(f"{what} {path} cannot be created ({error.strerror or error}).") from None
    return path

# --- atomic writing -----------------------------------------------------------------------------


def _replace(tmp: Path, target: Path) -> None:
    # On Windows os.replace fails while another process (a viewer, an antivirus scan) holds the
    # target open; that usually passes within a moment.
    for attempt in range(5):
        try:
            os.replace(tmp, target)
            return
        except PermissionError:
            if attempt == 4:
                tmp.unlink(missing_ok=True)
                raise BKSDMError(f"Cannot replace {target}: another program has it open. Close it and retry.") from None
            time.sleep(0.2 * (attempt + 1))


@contextmanager
def new_folder(target: Path):
    """Build a folder beside `target` (yielded) and rename it into place when the block ends, all or nothing.

    An empty `target` is replaced; a non-empty one is refused. A failure or kill inside the block leaves
    no folder that looks complete (the temporary one is removed, or left under a dotted .tmp name).
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BKSDMError(f"{target} exists and is not an empty folder; choose a new destination.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(error):  # e.g. shutil.Error of a copytree, listing each file that did not fit
            raise BKSDMError(f"The disk is full: {target.name} could not be written in {target.parent}, and "
                             "nothing there was changed. Free some space and try again.") from None
        raise


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows; NTFS journals the rename
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); checkpoints are shared like any model file. (Reading the
    # umask would mean setting it, which races with other threads of the WebUI.)
    os.chmod(name, 0o644)
    return Path(name)


def _unshared(tensors: StateDict) -> StateDict:
    """Contiguous CPU tensors, copying those that share storage (safetensors refuses shared views)."""
    plain = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    users: dict[int, int] = {}
    for value in plain.values():
        ptr = value.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    return {key: value.clone() if users[value.untyped_storage().data_ptr()] > 1 else value
            for key, value in plain.items()}


def write_safetensors(path: str | os.PathLike, tensors: StateDict, metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` with header `metadata` atomically (never a partial file under `path`)."""
    from safetensors.torch import save_file

    target = Path(path)
    tmp = _temp_path(target)
    tensors = _unshared(tensors)
    try:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if disk_full(error):
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            raise BKSDMError(f"The disk is full: {target.name} (about {human_size(size)}) could not be written "
                             f"in {target.parent}, and nothing there was changed. Free some space and try "
                             "again.") from None
        raise
    _replace(tmp, target)
    _fsync_dir(target.parent)
    return target


def write_file(path: str | os.PathLike, write, mode: str = "wb", encoding: str | None = None,
               newline: str | None = None) -> Path:
    """Write a file atomically: `write(f)` fills a temporary file beside it, flushed, then renamed over it."""
    target = Path(path)
    tmp = _temp_path(target)
    try:
        with open(tmp, mode, encoding=encoding, newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, target)
    return target


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    return write_file(path, lambda f: f.write(text), "w", "utf-8")


def write_image(path: str | os.PathLike, image, format: str | None = None) -> Path:
    """Save a PIL image atomically (its format from the suffix unless given)."""
    format = format or (Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return write_file(path, lambda f: image.save(f, format=format))


def write_json(path: str | os.PathLike, data: dict) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
