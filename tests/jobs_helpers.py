"""Shared helpers of the job tests: a runner over the `count` test job kind, and waiting on states."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
from count_job import KIND

from bksdm_ext.jobs.runner import Runner, RunnerSettings

TESTS_DIR = str(Path(__file__).resolve().parent)


def make_runner(data_dir, **settings) -> Runner:
    options = dict(poll_s=0.1, cancel_grace_s=2.0, kill_timeout_s=1.0)
    options.update(settings)
    hooks = {k: options.pop(k) for k in ("before_gpu_job", "after_queue_empty", "during_handoff") if k in options}
    kinds = options.pop("kinds", {"count": KIND})
    # tiny models run fastest on one thread, and the jobs of a test must not crowd each other
    env = {"PYTHONPATH": TESTS_DIR, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return Runner(data_dir, RunnerSettings(**options), kinds=kinds, env=env, **hooks)


def wait_for(runner: Runner, job_id: str, states, timeout: float = 60.0, poll: bool = True):
    """Poll until the job is in one of `states`; the job as it is then."""
    states = (states,) if isinstance(states, str) else tuple(states)
    deadline = time.time() + timeout
    while True:
        if poll:
            runner.poll()
        job = runner.get(job_id)
        if job.state in states:
            return job
        if time.time() > deadline:
            raise AssertionError(f"job {job_id} stayed {job.state} ({job.message}); log:\n{runner.log_tail(job_id)}")
        time.sleep(0.05)


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def press(url: str, index: int, data: list, origin: str | None = None, join: int | None = None) -> list:
    """Press a button the way gradio 3.41's page does: over the queue's WebSocket; its outputs.
    `join`: the event named when joining the queue, when not `index` (the one the data names)."""
    import json

    from websockets.sync.client import connect

    with connect(url.replace("http", "ws", 1) + "/queue/join", origin=origin, open_timeout=30) as ws:
        while True:
            message = json.loads(ws.recv(timeout=60))
            if message["msg"] == "send_hash":
                ws.send(json.dumps({"session_hash": "test", "fn_index": index if join is None else join}))
            elif message["msg"] == "send_data":
                ws.send(json.dumps({"data": data, "event_data": None, "fn_index": index, "session_hash": "test"}))
            elif message["msg"] == "process_completed":
                return message["output"]["data"]


@contextmanager
def serve(app):
    """Serve an ASGI app with uvicorn on a loopback port in a thread; yields its base URL.

    (starlette's TestClient of fastapi 0.94 does not work with the httpx that gradio brings.)
    """
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the server to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def write_tiny_dataset(folder, count: int = 4, side: int = 64) -> Path:
    """An image folder with metadata.jsonl, the layout of the paper's LAION-Aesthetics sets."""
    import json

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        Image.new("RGB", (side, side), (40 * i % 256, 120, 200 - 30 * i)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of square number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def tiny_distill_values(teacher, data, steps: int = 8) -> dict:
    """A distillation config for the tiny teacher that finishes in seconds on a CPU."""
    return {"teacher": str(teacher), "data": str(data), "layout": "tiny", "resolution": 64, "train_batch_size": 1,
            "gradient_accumulation_steps": 1, "max_steps": steps, "mixed_precision": "no", "teacher_half": False,
            "num_workers": 0, "checkpoint_every": 2, "sample_every": steps, "sample_steps": 2,
            "sample_prompts": ["a photo of a square"], "log_every": 1, "channels_last": False}


def queued_request(origin: str | None, host: str = "127.0.0.1:7860") -> gr.Request:
    """What gradio 3.41's queue hands a handler: the WebSocket's url and headers (queueing.get_request_params)."""
    headers = {"host": host, **({"origin": origin} if origin else {})}
    return gr.Request(url=f"ws://{host}/queue/join", headers=headers, query_params={}, path_params={},
                      client={"host": "127.0.0.1", "port": 50000})
