"""Starting, recognising and stopping a job's process tree, on POSIX and on Windows.

A job runs in its own process group (POSIX: a new session; Windows: CREATE_NEW_PROCESS_GROUP) so
that it survives the WebUI's death and so that the whole tree (accelerate's ranks, data workers)
can be signalled or killed at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

WINDOWS = sys.platform == "win32"
# A pid is only "ours" if its start time matches what we recorded: pids are reused.
START_TIME_TOLERANCE_S = 1.0


def spawn(command: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `command` detached from our process group, stdout and stderr appended to `log_path`."""
    if WINDOWS:
        # Sharing our console (no CREATE_NO_WINDOW) is what lets CTRL_BREAK_EVENT reach the job's group.
        flags = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    else:
        flags = {"start_new_session": True}
    # The log is a file, not a pipe: the job keeps writing after we die and never blocks on us.
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, **flags)


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_running(pid: int | None, started: float | None) -> bool:
    """True if `pid` is alive and is the same process that started at `started` (epoch seconds)."""
    if not pid or started is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - started) < START_TIME_TOLERANCE_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def terminate(pid: int) -> None:
    """Ask the job's whole group to stop (SIGTERM / CTRL_BREAK): it may still save and exit.

    Callers pass only a pid they started or have matched with `is_running`.
    """
    try:
        if WINDOWS:
            os.kill(pid, signal.CTRL_BREAK_EVENT)
        else:
            os.killpg(pid, signal.SIGTERM)  # the job leads its own group (spawn)
    except OSError:
        pass


def descendants(pid: int) -> list[psutil.Process]:
    """The processes `pid` started, recursively (psutil remembers each one's start time)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def merge_tree(seen: list[psutil.Process], current: list[psutil.Process]) -> list[psutil.Process]:
    """`current` plus those of `seen` still running (same pid and start time).

    A tree captured while the job runs only grows this way: a launcher that is dying but not yet
    reaped has already handed its children to init, so `descendants` of it is empty then, and that
    must not make us forget the workers we saw before it died.
    """
    tree = dict.fromkeys(current)  # psutil.Process compares and hashes by pid and start time
    for proc in seen:
        if proc not in tree:
            try:
                if proc.is_running():
                    tree[proc] = None
            except psutil.Error:
                pass
    return list(tree)


def kill_processes(processes: list[psutil.Process]) -> None:
    """Kill those still running; psutil checks each is the same process (pid and start time)."""
    for proc in processes:
        try:
            if proc.is_running():
                proc.kill()
        except psutil.Error:
            pass


def kill_tree(pid: int) -> None:
    """Kill the job and everything it started, at once.

    POSIX: its process group and every descendant, since some launchers (torch elastic, under
    `accelerate launch`) start their workers in sessions of their own.
    """
    if WINDOWS:
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, check=False)
        return
    tree = descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    kill_processes(tree)


def kill_leftovers(pid: int) -> None:
    """After our job's leader exited and was reaped: kill what is left of its process group.

    Windows has no group that outlives its leader, and the pid may already be reused there, so
    nothing is done (taskkill /T needs the live parent to find the tree).
    """
    if not WINDOWS:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
