"""What a timing ran on: the accelerator, its driver and libraries, and on Jetson the board and power mode.

Orin timings swing with the power mode (nvpmodel) and whether clocks are pinned (jetson_clocks), so a
Jetson record carries both. Every reading degrades to "unknown" when a file or command is missing or
needs root; describing the device never raises.
"""

from __future__ import annotations

import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

UNKNOWN = "unknown"

# A command runner: the command's stdout, or None when it is missing, fails or needs root.
Runner = Callable[[list], Optional[str]]


def run_command(command: list) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass(frozen=True)
class JetsonInfo:
    board: str  # the device-tree model, e.g. "NVIDIA Jetson AGX Orin Developer Kit"
    l4t: str  # e.g. "R35.4.1"
    power_mode: str  # e.g. "MAXN (0)"
    clocks: str  # jetson_clocks state, e.g. "pinned (GPU 931 MHz, EMC 3199 MHz)"


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    driver: str
    cuda: str
    torch_version: str
    xformers_version: str
    jetson: JetsonInfo | None

    def record_fields(self) -> dict:
        """The device part of a GenerationRecord."""
        jetson = self.jetson
        return dict(device=self.name, driver=self.driver, cuda=self.cuda, torch_version=self.torch_version,
                    xformers_version=self.xformers_version,
                    jetson_board=jetson.board if jetson else "", l4t=jetson.l4t if jetson else "",
                    power_mode=jetson.power_mode if jetson else "", jetson_clocks=jetson.clocks if jetson else "")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def parse_l4t(text: str) -> str:
    """`# R35 (release), REVISION: 4.1, ...` -> `R35.4.1`."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{match.group(1)}.{match.group(2)}" if match else UNKNOWN


def parse_nvpmodel(text: str | None) -> str:
    """`nvpmodel -q` output (optional NVPMWARN lines, `NV Power Mode: NAME`, then the id) -> `NAME (id)`."""
    if not text:
        return UNKNOWN
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("NVPMWARN")]
    for i, line in enumerate(lines):
        if line.startswith("NV Power Mode:"):
            name = line.split(":", 1)[1].strip()
            mode_id = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].isdigit() else ""
            return f"{name} ({mode_id})" if mode_id else name
    return UNKNOWN


def parse_jetson_clocks(text: str | None) -> str:
    """`jetson_clocks --show` -> "pinned (...)" when GPU and EMC run at their maximum, else "dynamic (...)"."""
    if not text:
        return UNKNOWN
    freqs = {}
    for unit in ("GPU", "EMC"):
        match = re.search(rf"^{unit} MinFreq=(\d+) MaxFreq=(\d+) CurrentFreq=(\d+)", text, re.MULTILINE)
        if match:
            freqs[unit] = (int(match.group(2)), int(match.group(3)))
    if not freqs:
        return UNKNOWN
    pinned = all(current == maximum for maximum, current in freqs.values())
    detail = ", ".join(f"{unit} {round(current / 1e6)} MHz" for unit, (_, current) in freqs.items())
    return f"{'pinned' if pinned else 'dynamic'} ({detail})"


def read_jetson(release_file: Path = Path("/etc/nv_tegra_release"),
                model_file: Path = Path("/proc/device-tree/model"),
                run: Runner = run_command,
                nvpmodel: tuple = ("nvpmodel", "-q"),
                jetson_clocks: tuple = ("jetson_clocks", "--show")) -> JetsonInfo | None:
    """The Jetson board description, or None when this is not a Jetson (no L4T release file)."""
    release = _read_text(release_file)
    if release is None:
        return None
    model = _read_text(model_file)
    board = model.rstrip("\x00").strip() if model else UNKNOWN  # the kernel NUL-terminates it
    return JetsonInfo(board=board or UNKNOWN, l4t=parse_l4t(release),
                      power_mode=parse_nvpmodel(run(list(nvpmodel))),
                      clocks=parse_jetson_clocks(run(list(jetson_clocks))))


def nvidia_driver(proc_version: Path = Path("/proc/driver/nvidia/version"), run: Runner = run_command) -> str:
    """The NVIDIA kernel driver version (Linux /proc, else nvidia-smi, which Windows has too)."""
    text = _read_text(proc_version)
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text or "")
    if match:
        return match.group(1)
    output = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return output.strip().splitlines()[0] if output and output.strip() else UNKNOWN


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    match = re.search(r"^model name\s*:\s*(.+)$", _read_text(cpuinfo) or "", re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine() or "CPU")


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def describe(device: str | None = None) -> DeviceInfo:
    """The device a generation runs on ("cuda", "cuda:1", "cpu"; default: CUDA when available)."""
    import torch

    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    jetson = read_jetson()
    if use_cuda:
        name = torch.cuda.get_device_name(torch.device(device or "cuda"))
        cuda = torch.version.cuda or UNKNOWN
        driver = UNKNOWN if jetson else nvidia_driver()  # Jetson: the driver ships with L4T
    else:
        name, cuda, driver = f"CPU: {cpu_name()}", "", ""
    return DeviceInfo(name=name, driver=driver, cuda=cuda, torch_version=torch.__version__.split("+")[0],
                      xformers_version=_package_version("xformers"), jetson=jetson)


_CACHE: dict = {}
CACHE_SECONDS = 60.0


def describe_cached(device: str | None = None) -> DeviceInfo:
    """`describe`, re-read at most once a minute: recording must not run nvpmodel on every generation,
    but a power mode changed between runs must show."""
    now = time.monotonic()
    cached = _CACHE.get(device)
    if cached is None or now - cached[0] > CACHE_SECONDS:
        cached = _CACHE[device] = (now, describe(device))
    return cached[1]
