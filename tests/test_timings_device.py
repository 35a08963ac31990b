"""Device description on the Jetson captures in shared/fixtures/jetson, and graceful degradation."""

import os
import stat
import sys

import pytest
from conftest import SHARED

from bksdm_ext.timings import device
from bksdm_ext.timings.device import UNKNOWN, read_jetson, run_command

JETSON = SHARED / "fixtures" / "jetson"


def captured(folder):
    """A runner answering nvpmodel / jetson_clocks with the board's captured output (None when not captured)."""
    files = {"nvpmodel": "nvpmodel-q.txt", "jetson_clocks": "jetson_clocks-show.txt"}

    def run(command):
        path = folder / files[command[0]]
        return path.read_text() if path.exists() else None

    return run


def board(name, **kwargs):
    folder = JETSON / name
    return read_jetson(folder / "nv_tegra_release", folder / "device-tree-model",
                       run=kwargs.pop("run", captured(folder)), **kwargs)


def test_agx_orin_at_maxn_with_pinned_clocks():
    info = board("agx-orin-32gb-maxn")
    assert info.board == "NVIDIA Jetson AGX Orin Developer Kit"
    assert info.l4t == "R35.4.1"
    assert info.power_mode == "MAXN (0)"
    assert info.clocks == "pinned (GPU 931 MHz, EMC 3199 MHz)"


def test_agx_orin_15w_skips_nvpmwarn_lines_and_has_no_clock_capture():
    info = board("agx-orin-15w")
    assert (info.board, info.l4t, info.power_mode, info.clocks) == (
        "NVIDIA Jetson AGX Orin Developer Kit", "R35.4.1", "15W (1)", UNKNOWN)


def test_orin_nano_super():
    info = board("orin-nano-super")
    assert info.board == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
    assert "\x00" not in info.board
    assert (info.l4t, info.power_mode) == ("R36.4.3", "MAXN_SUPER (2)")


def test_dynamic_clocks_are_reported_as_such():
    text = (JETSON / "agx-orin-32gb-maxn" / "jetson_clocks-show.txt").read_text()
    text = text.replace("GPU MinFreq=306000000 MaxFreq=930750000 CurrentFreq=930750000",
                        "GPU MinFreq=306000000 MaxFreq=930750000 CurrentFreq=306000000")
    assert device.parse_jetson_clocks(text) == "dynamic (GPU 306 MHz, EMC 3199 MHz)"


def test_not_a_jetson_when_there_is_no_l4t_release(tmp_path):
    assert read_jetson(tmp_path / "nv_tegra_release", tmp_path / "model", run=captured(tmp_path)) is None


def test_missing_commands_degrade_to_unknown_through_the_real_runner(tmp_path):
    info = board("agx-orin-32gb-maxn", run=run_command,
                 nvpmodel=(str(tmp_path / "no-such-nvpmodel"), "-q"),
                 jetson_clocks=(str(tmp_path / "no-such-jetson_clocks"), "--show"))
    assert (info.board, info.l4t, info.power_mode, info.clocks) == (
        "NVIDIA Jetson AGX Orin Developer Kit", "R35.4.1", UNKNOWN, UNKNOWN)


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX shell script stands in for the root-only tool")
def test_commands_refusing_without_root_degrade_to_unknown(tmp_path):
    refusing = tmp_path / "needs-root"
    refusing.write_text("#!/bin/sh\necho 'Error: this command requires root (Permission denied)' >&2\nexit 1\n")
    refusing.chmod(refusing.stat().st_mode | stat.S_IEXEC)
    unreadable = tmp_path / "model"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    info = read_jetson(JETSON / "agx-orin-15w" / "nv_tegra_release", unreadable, run=run_command,
                       nvpmodel=(str(refusing), "-q"), jetson_clocks=(str(refusing), "--show"))
    expected_board = UNKNOWN if not os.access(unreadable, os.R_OK) else "x"  # root can read a mode-0 file
    assert (info.board, info.power_mode, info.clocks) == (expected_board, UNKNOWN, UNKNOWN)


def test_describe_on_this_machine_fills_the_record_fields():
    info = device.describe("cpu")
    fields = info.record_fields()
    assert fields["device"].startswith("CPU: ") and len(fields["device"]) > 5
    assert fields["torch_version"] and fields["cuda"] == ""
    assert set(fields) == {"device", "driver", "cuda", "torch_version", "xformers_version", "jetson_board",
                           "l4t", "power_mode", "jetson_clocks"}


def test_nvidia_driver_from_proc_and_unknown_without_any_source(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    assert device.nvidia_driver(proc, run=lambda command: None) == "535.104.05"
    assert device.nvidia_driver(tmp_path / "absent", run=lambda command: None) == UNKNOWN
