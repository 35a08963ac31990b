"""`bksdm app` as a process: it stops when asked, also while a page is in the middle of an event."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
from jobs_helpers import free_port, wait_until


def test_the_app_stops_on_sigterm_while_a_page_waits_in_an_event(tmp_path):
    """The Jobs view presses its refresh every 2 s: a page closed mid-event left a gradio queue WebSocket that
    kept uvicorn's graceful shutdown waiting for ever (SIGTERM and a first Ctrl+C did nothing)."""
    from websockets.sync.client import connect

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bksdm_ext.cli", "app", "--data-dir", str(tmp_path / "data"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/", timeout=2).status_code == 200
            except httpx.HTTPError:
                return server.poll() is not None

        wait_until(up, 120, "bksdm app to answer")
        config = httpx.get(url + "/config", timeout=30).json()
        refresh = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "bksdm_refresh")
        index = next(i for i, dep in enumerate(config["dependencies"]) if refresh in dep["targets"])
        with connect(url.replace("http", "ws") + "/queue/join", open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=30))["msg"] == "send_hash"
            ws.send(json.dumps({"session_hash": "page", "fn_index": index}))
            assert json.loads(ws.recv(timeout=30))["msg"] in ("estimation", "send_data")  # the event has begun
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) is not None  # before the fix: still running after minutes
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
