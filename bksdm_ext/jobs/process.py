"""Starting, recognising and stopping a job's process tree, on POSIX and on Windows.

A job runs in its own process group (POSIX: a new session; Windows: CREATE_NEW_PROCESS_GROUP) so
that it survives the WebUI's death and so that the whole tree (accelerate's ranks, data workers)
can be signalled or killed at once.

Each launch also carries a marker in its environment (MARKER_ENV, unique per launch), which every
process it starts inherits, whatever session it runs in. `marked` finds them by it, so workers are
found even after their launcher died unseen. Reading another process's environment needs psutil's
`environ()`: Linux, Windows and macOS have it for one's own processes; where it is missing or
refused, `marked` finds nothing and only the captured process tree is left to kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

WINDOWS = sys.platform == "win32"
# A pid is only "ours" if its start time matches what we recorded: pids are reused.
START_TIME_TOLERANCE_S = 1.0
MARKER_ENV = "BKSDM_JOB"
# How a process's owner is compared: uids on POSIX (no user-database lookup per process).
OWNER = "username" if WINDOWS else "uids"


def spawn(command: list[str], log_path: Path, cwd: Path, env: dict[str, str], marker: str) -> subprocess.Popen:
    """Start `command` detached from our process group, stdout and stderr appended to `log_path`, with
    MARKER_ENV=`marker` in its environment (only there: never in ours)."""
    env = {**env, MARKER_ENV: marker}
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


def marked(marker: str) -> list[psutil.Process]:
    """Our user's running processes, other than this one, whose environment has MARKER_ENV=`marker`.

    One pass over the process table, reading the environment only of our user's processes: meant for
    once per finished job, not for every poll.
    """
    if not hasattr(psutil.Process, "environ"):
        return []
    me = psutil.Process()
    owner = getattr(me, OWNER)()
    found = []
    for proc in psutil.process_iter([OWNER]):
        if proc.pid == me.pid or proc.info[OWNER] != owner:
            continue
        try:
            if proc.environ().get(MARKER_ENV) == marker:
                found.append(proc)
        except psutil.Error:  # AccessDenied, NoSuchProcess, ZombieProcess
            pass
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_processes(processes: list[psutil.Process], grace_s: float = 0.0) -> None:
    """Kill those still running; psutil checks each is the same process (pid and start time).

    With `grace_s`, they are asked to stop first (SIGTERM / TerminateProcess) and only those still
    running after `grace_s` are killed.
    """
    if grace_s > 0:
        for proc in processes:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        # not psutil.wait_procs: it waits for an orphan's zombie until init reaps it
        deadline = time.monotonic() + grace_s
        while (processes := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
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
