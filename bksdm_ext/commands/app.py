"""`bksdm app`: run the BK-SDM tab and jobs API without the WebUI."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("app", help="the BK-SDM tab and job runner in the browser, without the WebUI")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the job store, job folders and timings live (default: $BKSDM_DATA_DIR, else ~/.bksdm)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback refuses jobs unless the next flag is given")
    p.add_argument("--port", type=int, default=7870)
    p.add_argument("--enable-insecure-extension-access", action="store_true",
                   help="allow jobs even when the server is reachable from other machines")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="another origin (scheme://host:port, e.g. of a reverse proxy) whose pages may use this "
                        "server; only its own pages may by default. Repeat for more")
    p.add_argument("--max-gpu-jobs", type=int, default=1, help="GPU jobs running at once (queue policy)")
    p.set_defaults(run=app_command)


def app_guard(args: argparse.Namespace):
    """The app binds exactly --host, so that address decides whether jobs are allowed."""
    from ..jobs.guard import AccessGuard

    return AccessGuard(server_name=args.host, allow_insecure=args.enable_insecure_extension_access, host_flag="--host")


def app_origin(args: argparse.Namespace):
    """Pages of this server (its --host, and this machine's names when that is every interface) and --allowed-origin."""
    from ..jobs.origin import OriginPolicy

    return OriginPolicy(bound_host=args.host, allowed_origins=tuple(args.allowed_origin))


SHUTDOWN_S = 5  # seconds open requests get to finish when the app is asked to stop


def app_command(args: argparse.Namespace) -> int:
    import uvicorn

    from ..jobs.runner import Runner, RunnerSettings
    from ..ui.app import create_app, default_data_dir

    data_dir = args.data_dir or default_data_dir()
    runner = Runner(data_dir, RunnerSettings(max_gpu_jobs=args.max_gpu_jobs)).start()
    guard = app_guard(args)
    if not guard.allowed:
        print(f"bksdm app: jobs are refused on this server: {guard.exposure}.")
    print(f"bksdm app: data in {data_dir}; open http://{args.host}:{args.port}/", flush=True)
    try:
        # a page in the middle of an event (the Jobs view asks every 2 s) holds a gradio queue WebSocket that
        # never ends by itself: without a bound, SIGTERM or one Ctrl+C would wait on it for ever
        uvicorn.run(create_app(runner, guard, app_origin(args)), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=SHUTDOWN_S)
    finally:
        runner.stop()
    return 0
