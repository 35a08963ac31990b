"""The job runner: a queue of jobs, each a subprocess in its own process group and folder.

The contract with a job process is `bksdm_ext.job` (the job folder, its progress file, complete
checkpoints, the cancel request, `python -m bksdm_ext.job KIND --job-dir DIR [--resume latest]`, run
through `accelerate launch` when more than one process or machine is configured). Cancelling asks
the job through its folder; a job that does not stop is sent SIGTERM (CTRL_BREAK on Windows) after a
grace period, and its whole process tree is killed after a timeout. The kinds come from
`bksdm_ext.kinds`.

Each launch has BKSDM_JOB=<job id>:<attempt>:<start time> in its environment, which everything it
starts inherits (torch elastic's ranks, data workers): when the job ends, whatever still carries it
is stopped, even workers no poll saw, e.g. under a launcher killed right after it started or while
no runner was watching. Nothing outside the job carries it (the runner never sets it on itself).

The runner's state lives in the job store, so a restarted WebUI re-attaches to a job that is
still running (same pid and start time) and marks one that vanished "interrupted" (resumable
when it left a checkpoint) or "failed".
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import kinds as kind_registry
from ..errors import BKSDMError
from ..job import JobFolder, Progress
from ..job import job_command as job_arguments
from ..job_config import read_toml
from ..kinds import Kind
from . import process
from .store import ACTIVE_STATES, Job, JobStore

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding bksdm_ext
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ORPHAN_GRACE_S = 3.0  # a finished job's leftover workers, after SIGTERM, before they are killed


@dataclass
class LaunchSettings:
    """How many processes a GPU job uses; more than one means `accelerate launch`."""

    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = ""
    main_process_port: int = 29500
    extra_args: tuple[str, ...] = ()

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1 or self.num_machines > 1


@dataclass
class RunnerSettings:
    max_gpu_jobs: int = 1  # queue policy: GPU jobs running at once
    # Call before_gpu_job before a GPU job starts and after_queue_empty once the GPU queue is empty (the
    # WebUI's model unload/reload); before_gpu_job returns False when it had nothing to unload.
    vram_handoff: bool = False
    poll_s: float = 1.0
    cancel_grace_s: float = 60.0  # after `cancel` is created, before SIGTERM
    kill_timeout_s: float = 30.0  # after SIGTERM, before the process tree is killed
    dedupe_window_s: float = 30.0  # the same form launched again within this is the same job
    launch: LaunchSettings = field(default_factory=LaunchSettings)


def job_command(kind: Kind, job_dir: Path, resume: bool, launch: LaunchSettings) -> list[str]:
    job = job_arguments(kind.name, job_dir, resume)
    if not (kind.gpu and launch.distributed):
        return [sys.executable, *job]
    accelerate = ["-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", str(launch.num_processes), "--num_machines", str(launch.num_machines)]
    if launch.num_machines > 1:
        accelerate += ["--machine_rank", str(launch.machine_rank), "--main_process_ip", launch.main_process_ip,
                       "--main_process_port", str(launch.main_process_port)]
    return [sys.executable, *accelerate, *launch.extra_args, *job]


def job_marker(job_id: str, attempt: int, started: float) -> str:
    """The value of process.MARKER_ENV for one launch of a job: a resumed job's new attempt is another
    launch, and a job id that comes back (a rebuilt store) has another start time. Derived from the
    job's row, so a restarted runner knows it too."""
    return f"{job_id}:{attempt}:{started:.6f}"


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "The job's process is gone (it ended while no runner was watching it)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"The job's process was killed ({name})"
    return f"The job's process exited with code {returncode} before finishing"


class Runner:
    """Runs jobs from a data folder: `data_dir/jobs.sqlite3` and one folder per job in `data_dir/jobs/`."""

    def __init__(self, data_dir: str | os.PathLike, settings: RunnerSettings | None = None,
                 kinds: dict[str, Kind] | None = None,
                 before_gpu_job: Callable[[], bool | None] | None = None,
                 after_queue_empty: Callable[[], None] | None = None,
                 during_handoff: Callable[[], None] | None = None,
                 env: dict[str, str] | None = None):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BKSDMError(f"Cannot create the BK-SDM data folder {self.data_dir} ({error.strerror}); "
                             "choose another one in the settings.") from None
        self.store = self._open_store(self.data_dir / "jobs.sqlite3")
        self.settings = settings or RunnerSettings()
        # the kinds this runner starts (default: every registered kind)
        self.kinds = dict(kind_registry.all() if kinds is None else kinds)
        self._register_unknown_folders()
        self.before_gpu_job = before_gpu_job
        self.after_queue_empty = after_queue_empty
        self.during_handoff = during_handoff  # each tick while unloaded: re-free what a generation took back
        self.env = dict(env or {})
        self.handoff_active = False  # the WebUI's model is unloaded for our jobs
        self._procs: dict[str, Any] = {}  # jobs this runner started: id -> Popen
        self._trees: dict[str, list] = {}  # descendants seen per running job and still running (psutil.Process)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle of the runner itself ---

    @staticmethod
    def _open_store(path: Path) -> JobStore:
        """The job store; a damaged one is moved aside (kept for inspection) and rebuilt from the job folders."""
        try:
            return JobStore(path)
        except BKSDMError as error:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if part.exists():
                    os.replace(part, part.with_name(f"{part.name}.damaged-{stamp}"))
            log.warning("BK-SDM: %s Moved aside; the job list is rebuilt from the job folders.", error)
            return JobStore(path)

    def _register_unknown_folders(self) -> None:
        """Job folders the store does not know (a rebuilt store, a folder copied in) become jobs again,
        in the state their progress file tells."""
        known = {job.id for job in self.store.list()}
        for folder in sorted(self.jobs_dir.iterdir()):
            if folder.name in known or not (folder / "config.toml").is_file():
                continue
            try:
                config = read_toml(folder / "config.toml")
            except BKSDMError as error:
                log.warning("BK-SDM: job folder %s not registered: %s", folder, error)
                continue
            kind = config.pop("kind", None)
            if not isinstance(kind, str) or not kind:
                log.warning("BK-SDM: job folder %s not registered: its config.toml names no kind.", folder)
                continue
            job_folder = JobFolder(folder)
            progress = job_folder.read_progress()
            checkpoint = job_folder.has_checkpoint()
            state = progress.state
            if state not in ("done", "failed", "cancelled"):
                state = "interrupted" if checkpoint else "failed"
            job, created = self.store.create(folder.name, kind, str(folder), config, request_id=f"folder:{folder.name}",
                                             dedupe_window_s=0)
            if created:
                updated = progress.updated or folder.stat().st_mtime
                self.store.update(job.id, state=state, created=folder.stat().st_mtime, finished=updated,
                                  resumable=int(checkpoint and state != "done"),
                                  message=progress.message or "Found in the data folder.")

    def start(self) -> "Runner":
        """Re-attach to what ran before, then poll in a background thread."""
        self.poll()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="bksdm-jobs", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching. Running jobs go on; the next runner re-attaches to them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.store.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.poll()
            except Exception:  # the thread must outlive any one bad tick; the error goes to the log
                log.exception("BK-SDM job runner: poll failed")

    # --- user actions ---

    def kind(self, name: str) -> Kind:
        if name not in self.kinds:
            kind_registry.get(name)  # an unknown kind: the registry's error names the known ones
            raise BKSDMError(f"This runner does not start {name!r} jobs; it starts {', '.join(self.kinds)}.")
        return self.kinds[name]

    def submit(self, kind: str, values: dict[str, Any], request_id: str | None = None) -> Job:
        """Validate `values` into the kind's typed config and queue a job; a repeated request returns
        the job it already created."""
        job_kind = self.kind(kind)
        typed = job_kind.build_config(values)
        config = typed.to_dict()
        job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        folder = self.jobs_dir / job_id
        with self._lock:
            job, created = self.store.create(job_id, kind, str(folder), config, request_id,
                                             self.settings.dedupe_window_s)
            if not created:
                return job
            try:
                job_folder = JobFolder(folder).create()
                typed.save(job_folder.config)  # with `kind =`, as the CLI writes it
            except OSError as error:
                self.store.delete(job_id)
                shutil.rmtree(folder, ignore_errors=True)
                raise BKSDMError(f"Cannot write the job folder {folder} ({error.strerror}); check the free "
                                 "space and permissions of the data folder.") from None
        self.poll()
        return self.store.get(job_id)

    def relaunch(self, job_id: str, request_id: str | None = None) -> Job:
        """A new job from an earlier job's config.toml (which the user may have edited)."""
        job = self.store.get(job_id)
        return self.submit(job.kind, read_toml(JobFolder(job.folder).config), request_id)

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.store.get(job_id)
            if job.state == "queued":
                self.store.update(job_id, expect=("queued",), state="cancelled", finished=time.time(),
                                  resumable=int(JobFolder(job.folder).has_checkpoint()),
                                  message="Cancelled before it started.")
            elif job.state == "running":
                try:
                    JobFolder(job.folder).request_cancel()
                except OSError as error:
                    log.warning("BK-SDM: could not ask job %s to cancel (%s); it will be signalled", job.id, error)
                self.store.update(job_id, expect=("running",), state="cancelling", cancel_requested=time.time(),
                                  message="Cancelling: the job saves a checkpoint at its next step.")
            elif job.state != "cancelling":
                raise BKSDMError(f"Job {job_id} is {job.state}; only queued or running jobs can be cancelled.")
        return self.store.get(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue a stopped job again; it continues from its last checkpoint (or starts over without one)."""
        with self._lock:
            job = self.store.get(job_id)
            if job.state in ("queued", "running", "cancelling"):
                return job  # a repeated click: never a second run
            if job.state == "done":
                raise BKSDMError(f"Job {job_id} has finished; use Re-launch to run its config again.")
            checkpoint = JobFolder(job.folder).has_checkpoint()
            self.store.update(job_id, expect=(job.state,), state="queued", resume=int(checkpoint), finished=None,
                              cancel_requested=None, terminate_sent=None,
                              message="Queued to resume from the last checkpoint." if checkpoint
                              else "Queued to start over: it left no checkpoint.")
        self.poll()
        return self.store.get(job_id)

    def delete(self, job_id: str) -> None:
        with self._lock:
            job = self.store.get(job_id)
            if job.state in ACTIVE_STATES:
                raise BKSDMError(f"Job {job_id} is {job.state}; cancel it and wait until it stops before deleting it.")
            if Path(job.folder).resolve().parent != self.jobs_dir.resolve():
                raise BKSDMError(f"Job {job_id}'s folder {job.folder} is not in {self.jobs_dir}; delete it by hand.")
            try:
                shutil.rmtree(job.folder)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise BKSDMError(f"Cannot delete {job.folder} ({error.strerror}); close any program using its "
                                 "files and try again.") from None
            self.store.delete(job_id)

    # --- what the UI and API show ---

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self) -> list[Job]:
        return self.store.list()

    def job_progress(self, job_id: str) -> Progress:
        """The job's progress.json (its defaults while there is none or it cannot be read)."""
        return JobFolder(self.store.get(job_id).folder).read_progress()

    def progress(self, job_id: str) -> dict[str, Any]:
        return self.job_progress(job_id).to_dict()

    def log_tail(self, job_id: str, max_bytes: int = 32768) -> str:
        path = JobFolder(self.store.get(job_id).folder).log
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - max_bytes))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def losses(self, job_id: str) -> list[tuple[int, str, float]]:
        """(step, term, value) rows from losses.csv; the terms are the columns the progress file names
        as losses, or every numeric column when it names none."""
        folder = JobFolder(self.store.get(job_id).folder)
        terms = set(folder.read_progress().losses)
        rows: list[tuple[int, str, float]] = []
        try:
            with open(folder.losses, newline="", encoding="utf-8") as f:
                for record in csv.DictReader(f):
                    try:
                        step = int(float(record.get("step", "")))
                    except ValueError:
                        continue
                    for name, text in record.items():
                        if name == "step" or (terms and name not in terms):
                            continue
                        try:
                            rows.append((step, name, float(text)))
                        except (TypeError, ValueError):
                            pass
        except OSError:
            pass
        return rows

    def samples(self, job_id: str) -> list[Path]:
        """Validation images, oldest first."""
        folder = JobFolder(self.store.get(job_id).folder).samples
        try:
            images = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        except OSError:
            return []
        return sorted(images, key=lambda p: (p.stat().st_mtime, str(p)))

    # --- the queue ---

    def poll(self) -> None:
        """One tick: notice jobs that ended, escalate cancels, start queued jobs, hand VRAM back."""
        with self._lock:
            now = time.time()
            for job in self.store.list(ACTIVE_STATES):
                proc = self._procs.get(job.id)
                if proc is not None:
                    returncode = proc.poll()
                    alive = returncode is None
                else:  # started by an earlier runner: recognise it by pid and start time
                    returncode, alive = None, process.is_running(job.pid, job.pid_started)
                if alive:
                    # Merged, never replaced: the poll that catches a killed launcher between its death and
                    # its reaping sees no descendants (its children already belong to init).
                    self._trees[job.id] = process.merge_tree(self._trees.get(job.id, []),
                                                             process.descendants(job.pid))
                    self._escalate_cancel(job, now)
                else:
                    self._finish(job, returncode, ours=proc is not None)
            self._start_queued()
            if self.handoff_active and not self._gpu_work_left():
                self.handoff_active = False
                self._run_hook(self.after_queue_empty, "after_queue_empty")
            elif self.handoff_active:
                self._run_hook(self.during_handoff, "during_handoff")

    @staticmethod
    def _run_hook(hook: Callable[[], None] | None, name: str) -> None:
        """A WebUI hook of the hand-off (reload, re-free): a failure is reported, never takes the runner down."""
        if hook is None:
            return
        try:
            hook()
        except Exception:
            log.exception("BK-SDM job runner: %s failed", name)

    def _escalate_cancel(self, job: Job, now: float) -> None:
        if job.state != "cancelling" or job.cancel_requested is None or not job.pid:
            return
        if job.terminate_sent is None and now - job.cancel_requested >= self.settings.cancel_grace_s:
            process.terminate(job.pid)
            self.store.update(job.id, terminate_sent=now)
        elif job.terminate_sent is not None and now - job.terminate_sent >= self.settings.kill_timeout_s:
            process.kill_tree(job.pid)

    def _finish(self, job: Job, returncode: int | None, ours: bool) -> None:
        progress = JobFolder(job.folder).read_progress()
        # A progress file from an earlier attempt says nothing about this one (`started` precedes the spawn).
        reported = progress.state if progress.updated >= (job.started or 0) else None
        checkpoint = JobFolder(job.folder).has_checkpoint()
        message = progress.message if reported else ""
        if reported == "done":
            state, message = "done", message or "Finished."
        elif reported == "cancelled" or job.cancel_requested is not None:
            state = "cancelled"
            message = "Cancelled; resume continues from the last checkpoint." if checkpoint else \
                "Cancelled before its first checkpoint; resume starts over."
        elif reported == "failed":
            state, message = "failed", message or f"{_describe_exit(returncode)}; see log.txt."
        else:
            state = "interrupted" if checkpoint else "failed"
            message = f"{_describe_exit(returncode)}; " + (
                "resume continues from the last checkpoint." if checkpoint else "see log.txt.")
        if ours:
            self._procs.pop(job.id, None)
            process.kill_leftovers(job.pid)  # its group's stragglers (data workers, ranks), if any
        # Workers that outlive their launcher (a killed `accelerate launch` leaves its ranks) hold the GPU:
        # those the polls saw, and those carrying this launch's marker (started, or orphaned, unseen).
        marked = process.marked(job_marker(job.id, job.attempts, job.started)) if job.started else []
        process.kill_processes(process.merge_tree(self._trees.pop(job.id, []), marked), grace_s=ORPHAN_GRACE_S)
        self.store.update(job.id, expect=ACTIVE_STATES, state=state, finished=time.time(), message=message,
                          resumable=int(checkpoint and state != "done"))
        self._remove_cancel_file(job)

    def _gpu_work_left(self) -> bool:
        return any(self.kind(job.kind).gpu for job in self.store.list(("queued", *ACTIVE_STATES))
                   if job.kind in self.kinds)

    def _start_queued(self) -> None:
        active = [job for job in self.store.list(ACTIVE_STATES) if job.kind in self.kinds]
        gpu_running = sum(self.kind(job.kind).gpu for job in active)
        for job in reversed(self.store.list(("queued",))):  # oldest first
            kind = self.kinds.get(job.kind)
            if kind is None:
                continue  # a kind this installation lacks; another runner may have it
            if kind.gpu:
                if gpu_running >= self.settings.max_gpu_jobs:
                    waiting = f"Waiting: {gpu_running} GPU job(s) running, {self.settings.max_gpu_jobs} at a time."
                    if job.message != waiting and not job.message.startswith("Queued to"):
                        self.store.update(job.id, expect=("queued",), message=waiting)
                    continue
                if self.settings.vram_handoff and not self.handoff_active and self.before_gpu_job is not None:
                    try:
                        unloaded = self.before_gpu_job()
                    except Exception as error:  # the WebUI's unload: the job fails, the runner goes on
                        log.exception("BK-SDM job runner: before_gpu_job failed")
                        self.store.update(job.id, expect=("queued",), state="failed", finished=time.time(),
                                          message=f"Could not free the GPU for this job ({error}).")
                        continue
                    # A hook that had nothing to unload (no CUDA, setting off) returns False: nothing to reload.
                    self.handoff_active = unloaded is not False
                gpu_running += 1
            self._launch(job, kind)

    def _launch(self, job: Job, kind: Kind) -> None:
        # Claim the job first, so two runners on one data folder never start it twice.
        started, attempt = time.time(), job.attempts + 1
        if not self.store.update(job.id, expect=("queued",), state="running", started=started, pid=None,
                                 pid_started=None, attempts=attempt, message="Starting."):
            return
        folder = Path(job.folder)
        self._remove_cancel_file(job)
        command = job_command(kind, folder, bool(job.resume), self.settings.launch)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        if not kind_registry.is_builtin(kind.name):  # the job process imports the module that registers it
            env[kind_registry.MODULES_ENV] = os.pathsep.join(
                p for p in (env.get(kind_registry.MODULES_ENV, ""), kind.module) if p)
        try:
            with open(JobFolder(folder).log, "a", encoding="utf-8") as f:
                f.write(f"\n=== attempt {attempt}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{' '.join(command)}\n")
            proc = process.spawn(command, JobFolder(folder).log, folder, env, job_marker(job.id, attempt, started))
        except OSError as error:
            self.store.update(job.id, state="failed", finished=time.time(),
                              message=f"Could not start the job ({error}).")
            return
        self._procs[job.id] = proc
        self.store.update(job.id, pid=proc.pid, pid_started=process.start_time(proc.pid), resume=0,
                          message="Running.")

    def _remove_cancel_file(self, job: Job) -> None:
        JobFolder(job.folder).clear_cancel()
