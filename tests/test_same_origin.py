"""Only the user's own page gets in: attacks on `bksdm app` (a real server on loopback) and on the tab's
handlers as the WebUI runs them, each checked on the server's side (no job, no file, nothing deleted).

Every refused request is paired with the same request from the server's own page, which succeeds:
so a check that let everything through, or refused everything, fails here.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import gradio as gr
import httpx
import pytest
from fastapi import FastAPI
from jobs_helpers import free_port, make_runner, press, queued_request, serve, wait_for

from bksdm_ext.jobs.api import jobs_router
from bksdm_ext.jobs.guard import AccessGuard
from bksdm_ext.jobs.logins import Logins
from bksdm_ext.jobs.origin import OriginPolicy
from bksdm_ext.ui.tab import TabContext, build_tab

EVIL = "http://evil.example"
JOB = {"kind": "count", "config": {"steps": 2, "step_s": 0.01}}


# --- the policy ---------------------------------------------------------------------------------

def test_policy_accepts_own_names_and_refuses_others():
    local = OriginPolicy("127.0.0.1", machine_names=())
    own = {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}
    assert local.refusal("http", own) is None
    assert local.refusal("http", {"host": "localhost:7860"}) is None  # curl / scripts: no Origin
    assert local.refusal("ws", {"host": "[::1]:7860", "origin": "http://[::1]:7860"}) is None
    assert "Host 'attacker.example:7860'" in local.refusal("http", {"host": "attacker.example:7860"})
    assert "Origin 'http://evil.example'" in local.refusal("http", {"host": "127.0.0.1:7860", "origin": EVIL})
    assert local.refusal("http", {"host": "127.0.0.1:7860", "origin": "null"})  # sandboxed frames, file://
    assert local.refusal("http", {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7861"})  # another port
    assert local.refusal("http", {"host": "127.0.0.1:7860", "origin": "https://127.0.0.1:7860"})  # another scheme
    assert local.refusal("http", {}) == "the request names no Host"
    # the machine's own names count only when it listens on them
    lan = OriginPolicy("0.0.0.0", machine_names=("box", "192.168.1.5"))
    assert lan.refusal("http", {"host": "192.168.1.5:7860", "origin": "http://192.168.1.5:7860"}) is None
    assert lan.refusal("http", {"host": "box:7860"}) is None
    assert OriginPolicy("127.0.0.1", machine_names=("box",)).refusal("http", {"host": "box:7860"})
    # origins the user allowed (the WebUI's --cors-allow-origins / --cors-allow-origins-regex)
    webui = OriginPolicy.from_cmd_opts(SimpleNamespace(cors_allow_origins="https://proxy.example",
                                                       cors_allow_origins_regex=r"https://.*\.gradio\.live"),
                                       "127.0.0.1")
    assert webui.refusal("https", {"host": "proxy.example", "origin": "https://proxy.example"}) is None
    assert webui.refusal("http", {"host": "127.0.0.1:7860", "origin": "https://proxy.example"}) is None
    assert webui.refusal("https", {"host": "abc.gradio.live", "origin": "https://abc.gradio.live"}) is None
    assert "--cors-allow-origins" in webui.refusal("http", {"host": "127.0.0.1:7860", "origin": EVIL})


def test_logins_take_basic_credentials_of_either_flag_or_a_session_cookie():
    sessions = {"tok-1": "g"}
    logins = Logins.of("u:p", [("g", "h")], lambda: sessions)
    basic = lambda user, password: {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}  # noqa: E731
    request = lambda headers, cookies=None: SimpleNamespace(headers=headers, cookies=cookies or {})  # noqa: E731
    assert logins(request(basic("u", "p"))) and logins(request(basic("g", "h")))
    assert not logins(request(basic("u", "wrong"))) and not logins(request({}))
    assert not logins(request({"authorization": "Basic !!!"}))
    assert logins(request({}, {"access-token": "tok-1"})) and not logins(request({}, {"access-token": "tok-2"}))
    assert Logins.of(None, []) is None


# --- bksdm app, served on loopback ---------------------------------------------------------------

@pytest.fixture
def app_server(tmp_path, monkeypatch):
    """`bksdm app`'s FastAPI app over the count job kind; yields (url, runner, gradio blocks)."""
    from starlette.routing import Mount

    from bksdm_ext.ui.app import create_app

    monkeypatch.chdir(tmp_path)  # gradio would serve anything under the working directory
    runner = make_runner(tmp_path / "data")
    app = create_app(runner, AccessGuard())
    blocks = next(r.app for r in app.routes if isinstance(r, Mount)).get_blocks()
    try:
        with serve(app) as url:
            yield url, runner, blocks
    finally:
        runner.close()


def job_folders(runner) -> list[Path]:
    root = runner.data_dir / "jobs"
    return sorted(root.iterdir()) if root.is_dir() else []


def fn_index(blocks, elem_id: str) -> int:
    ids = {id for id, block in blocks.blocks.items() if getattr(block, "elem_id", None) == elem_id}
    return next(i for i, dep in enumerate(blocks.dependencies) if set(dep["targets"]) & ids)


def handshake_status(url: str, host: str) -> int:
    """The HTTP status a WebSocket upgrade to /queue/join gets with this Host header (a raw client)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall((f"GET /queue/join HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        return int(s.recv(1024).split()[1])


def launch_data(blocks, steps: int = 2) -> list:
    """The count form's values, as the page sends them: the defaults of its inputs, `steps` steps."""
    dep = blocks.dependencies[fn_index(blocks, "bksdm_launch_count")]
    values = [blocks.blocks[i].value for i in dep["inputs"]]
    names = [blocks.blocks[i].elem_id for i in dep["inputs"]]
    values[names.index("bksdm_count_steps")] = steps
    values[names.index("bksdm_count_step_s")] = 0.01
    return values


def test_app_refuses_foreign_pages_and_serves_its_own(app_server):
    url, runner, blocks = app_server
    own = {"Origin": url}
    with httpx.Client(base_url=url, timeout=30) as api:
        # a cross-origin JSON POST (after a preflight the browser would have to pass first)
        preflight = api.options("/bksdm/v1/jobs", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers
        refused = api.post("/bksdm/v1/jobs", json=JOB, headers={"Origin": EVIL})
        assert refused.status_code == 403 and "evil.example" in refused.json()["detail"]
        # a no-cors text/plain POST (no preflight), to our route and to gradio's /run/predict (Launch)
        plain = {"Origin": EVIL, "Content-Type": "text/plain"}
        assert api.post("/bksdm/v1/jobs", content=json.dumps(JOB), headers=plain).status_code == 403
        launch = {"fn_index": fn_index(blocks, "bksdm_launch_count"), "data": launch_data(blocks)}
        assert api.post("/run/predict", content=json.dumps(launch), headers=plain).status_code == 403
        # a page that rebound its name to 127.0.0.1 (DNS rebinding): same-origin for the browser
        rebound = {"Host": "attacker.example:7870", "Origin": "http://attacker.example:7870"}
        assert api.post("/bksdm/v1/jobs", json=JOB, headers=rebound).status_code == 403
        assert api.get("/bksdm/v1/jobs", headers=rebound).status_code == 403  # nor may it read the job list
        assert api.get("/", headers={"Host": "attacker.example"}).status_code == 403
        assert runner.list() == [] and job_folders(runner) == []

        # the server's own page does the same things
        assert api.post("/bksdm/v1/jobs", json=JOB, headers=own).status_code == 200
        assert api.get("/").status_code == 200
    job = runner.list()[0]
    wait_for(runner, job.id, "done")

    # a foreign page's WebSocket to the queue, pressing Launch and then Delete (confirmed)
    from websockets.exceptions import InvalidStatus

    for elem_id, data in (("bksdm_launch_count", launch_data(blocks)), ("bksdm_delete_confirm", [job.id])):
        with pytest.raises(InvalidStatus) as refusal:
            press(url, fn_index(blocks, elem_id), data, origin=EVIL)
        assert refusal.value.response.status_code == 403
    assert handshake_status(url, "attacker.example") == 403
    assert [j.id for j in runner.list()] == [job.id] and Path(job.folder).is_dir()

    # the page itself, over the same WebSocket: its Launch makes a job, its Delete deletes
    launched = press(url, fn_index(blocks, "bksdm_launch_count"), launch_data(blocks, steps=3), origin=url)
    assert "follow it in the Jobs tab" in launched[0] and len(runner.list()) == 2
    deleted = press(url, fn_index(blocks, "bksdm_delete_confirm"), [job.id], origin=url)
    assert f"Deleted {job.id}" in deleted[0] and not Path(job.folder).exists()
    other = runner.list()[0]
    wait_for(runner, other.id, "done")


def test_app_serves_only_the_images_its_page_showed(app_server, tmp_path):
    url, runner, blocks = app_server
    job = runner.submit("count", {"steps": 1, "step_s": 0.01})
    wait_for(runner, job.id, "done")
    shown = tmp_path / "gradio-copy.png"
    shown.write_bytes(b"\x89PNG\r\n\x1a\n")
    blocks.temp_file_sets.append({str(shown)})  # what the gallery's postprocess registers for its copies
    secret = tmp_path / "notes.txt"
    secret.write_text("private")
    with httpx.Client(base_url=url, timeout=30) as api:
        for path in (Path(job.folder) / "config.toml", Path(job.folder) / "log.txt", runner.data_dir / "jobs.sqlite3",
                     secret, tmp_path / "data"):
            answer = api.get(f"/file={path}")
            assert answer.status_code == 403, (path, answer.text)
            assert "private" not in answer.text
        assert api.get(f"/file={shown}").status_code == 200


# --- the tab's handlers as the WebUI runs them ----------------------------------------------------

@pytest.fixture
def webui_tab(tmp_path):
    """The tab as the WebUI adapter builds it (webui/extension.py: its guard and origin from cmd_opts)."""
    cmd_opts = SimpleNamespace(listen=False, share=False, server_name=None, cors_allow_origins=None,
                               cors_allow_origins_regex=None)
    guard = AccessGuard.from_cmd_opts(cmd_opts, environ={})
    runner = make_runner(tmp_path / "data")
    tab = build_tab(TabContext(runner, guard, origin=OriginPolicy.from_cmd_opts(cmd_opts, guard.bound_host)))
    handlers = {}
    for block_fn, dep in zip(tab.fns, tab.dependencies):
        for target in dep["targets"]:
            handlers.setdefault(getattr(tab.blocks[target], "elem_id", None), block_fn.fn)
    try:
        yield runner, handlers, tab
    finally:
        runner.close()


def test_webui_handlers_refuse_foreign_pages(webui_tab):
    runner, handlers, tab = webui_tab
    launch, delete, cancel = handlers["bksdm_launch_count"], handlers["bksdm_delete_confirm"], handlers["bksdm_cancel"]
    form = launch_data(tab)
    foreign = [queued_request(EVIL), queued_request(None, host="attacker.example:7860"),
               queued_request("http://attacker.example:7860", host="attacker.example:7860"), None]
    for request in foreign:
        answer = launch(request, *form)[0]  # (message, the id of the job made)
        assert "Launching a job is refused" in answer, answer
    assert runner.list() == [] and job_folders(runner) == []

    assert "follow it in the Jobs tab" in launch(queued_request("http://127.0.0.1:7860"), *form)[0]
    job = runner.list()[0]
    wait_for(runner, job.id, "done")
    for request in foreign:
        assert "Deleting a job is refused" in delete(job.id, request)
        assert "Cancelling a job is refused" in cancel(job.id, request)
        with pytest.raises(gr.Error, match="refused"):  # nor may it read the job list and logs
            handlers["bksdm_refresh"](None, {}, request)
    assert [j.id for j in runner.list()] == [job.id] and Path(job.folder).is_dir()
    assert job.id in handlers["bksdm_refresh"](None, {}, queued_request(None))[1][0]
    assert f"Deleted {job.id}" in delete(job.id, queued_request("http://localhost:7860", host="localhost:7860"))
    assert runner.list() == [] and not Path(job.folder).exists()


# --- our routes with the WebUI's logins -----------------------------------------------------------

def test_routes_need_a_login_when_the_webui_has_them(tmp_path):
    runner = make_runner(tmp_path / "data")
    sessions: dict[str, str] = {}
    app = FastAPI()
    app.include_router(jobs_router(runner, AccessGuard(), OriginPolicy(), Logins.of("u:p", [("g", "h")], lambda: sessions)))
    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=30) as api:
            assert api.get("/bksdm/v1/jobs").status_code == 401
            denied = api.post("/bksdm/v1/jobs", json=JOB)
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Basic"
            assert api.post("/bksdm/v1/jobs", json=JOB, auth=("u", "nope")).status_code == 401
            assert runner.list() == []
            assert api.get("/bksdm/v1/jobs", auth=("u", "p")).status_code == 200
            sessions["tok"] = "g"  # logged in to the WebUI's page (gradio's app.tokens)
            assert api.get("/bksdm/v1/jobs", cookies={"access-token": "tok"}).status_code == 200
            # a foreign page is refused before its credentials are even looked at
            assert api.post("/bksdm/v1/jobs", json=JOB, auth=("u", "p"), headers={"Origin": EVIL}).status_code == 403
            created = api.post("/bksdm/v1/jobs", json=JOB, auth=("g", "h"))
            assert created.status_code == 200
            wait_for(runner, created.json()["id"], "done")
    finally:
        runner.close()


# --- the WebUI's app: gradio's own endpoints, in front of the handlers --------------------------

def forged(index: int, data: list, host: str) -> dict:
    """A /api/predict body carrying the `request` gradio's queue would add: made-up headers of our own page."""
    return {"fn_index": index, "data": data, "session_hash": "evil",
            "request": {"url": f"http://{host}/", "headers": {"host": host, "origin": f"http://{host}"},
                        "query_params": {}, "path_params": {}, "client": {"host": "127.0.0.1", "port": 1}}}


@pytest.fixture
def webui_app(tmp_path):
    """An app shaped like the WebUI 1.10.1's (webui.py): our tab rendered in a gr.Tab of a queued page
    next to an event of the WebUI's own, launched by gradio; then the WebUI's CORS removal and
    setup_middleware; then what our on_app_started adds; then another extension's rebuild.
    Yields (url, runner, demo, own event's fn_index)."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.gzip import GZipMiddleware

    from bksdm_ext.jobs.origin import OurEvents, install_same_origin

    cmd_opts = SimpleNamespace(listen=False, share=False, server_name=None, cors_allow_origins=None,
                               cors_allow_origins_regex=None)
    guard = AccessGuard.from_cmd_opts(cmd_opts, environ={})
    origin = OriginPolicy.from_cmd_opts(cmd_opts, guard.bound_host)
    runner = make_runner(tmp_path / "data")
    tab = build_tab(TabContext(runner, guard, origin=origin))  # on_ui_tabs
    with gr.Blocks(analytics_enabled=False) as demo:  # ui.create_ui
        with gr.Tab("txt2img"):
            prompt, echo = gr.Textbox(elem_id="webui_prompt"), gr.Textbox()
            gr.Button(elem_id="webui_generate").click(lambda text: text.upper(), [prompt], [echo])
        with gr.Tab("BK-SDM"):
            tab.render()
    demo.queue(64)
    port = free_port()
    app, _, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != "CORSMiddleware"]
        app.middleware_stack = None  # initialize_util.setup_middleware
        app.add_middleware(GZipMiddleware, minimum_size=1000)
        app.add_middleware(CORSMiddleware, allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
        app.build_middleware_stack()
        install_same_origin(app, origin, OurEvents(demo, tab))  # extension.on_app_started
        app.include_router(jobs_router(runner, guard, origin))
        install_same_origin(app, origin, OurEvents(demo, tab))  # a second call adds nothing
        app.middleware_stack = None  # another extension's on_app_started adds its own middleware
        app.add_middleware(GZipMiddleware)
        assert [m.cls.__name__ for m in app.user_middleware].count("SameOriginMiddleware") == 1
        yield f"http://127.0.0.1:{port}", runner, demo, fn_index(demo, "webui_generate")
    finally:
        demo.server.should_exit = True  # demo.close() would wait for ever on a WebSocket left open
        demo.server.thread.join(10)
        assert not demo.server.thread.is_alive(), "a request of the test is still running"
        runner.close()


def test_webui_app_refuses_forged_event_calls_from_foreign_pages(webui_app):
    from websockets.exceptions import ConnectionClosed

    url, runner, demo, own_event = webui_app
    host = urlsplit(url).netloc
    launch, delete = fn_index(demo, "bksdm_launch_count"), fn_index(demo, "bksdm_delete_confirm")
    rebound = {"Host": f"attacker.example:{urlsplit(url).port}"}
    evil_plain = {"Origin": EVIL, "Content-Type": "text/plain"}
    with httpx.Client(base_url=url, timeout=60) as api:
        attacks = [  # (path, body, headers): gradio would make a gr.Request of our own page from each body
            ("/api/predict", forged(launch, launch_data(demo), host), rebound),  # DNS rebinding
            ("/run/predict", forged(launch, launch_data(demo), host), {"Origin": EVIL}),  # cross-origin JSON
            ("/api/predict/", {**forged(launch, launch_data(demo), host), "fn_index": str(launch)}, rebound),
            ("/run/predict", forged(launch - len(demo.dependencies), launch_data(demo), host), evil_plain),
        ]
        for path, body, headers in attacks:
            answer = api.post(path, content=json.dumps(body), headers={"Content-Type": "application/json", **headers})
            assert answer.status_code == 403, (path, answer.text)
            assert "Refused" in answer.json()["detail"]
        assert api.post("/bksdm/v1/jobs", json=JOB, headers=rebound).status_code == 403
        assert runner.list() == [] and job_folders(runner) == []

        # the WebUI's own events stay as they were for a page under another name (a reverse proxy)
        upper = api.post("/api/predict", json={"fn_index": own_event, "data": ["hi"]}, headers=rebound)
        assert upper.status_code == 200 and upper.json()["data"] == ["HI"]
        # an API client of our own (no Origin, Host 127.0.0.1:PORT) presses Launch directly
        direct = api.post("/api/predict", json={"fn_index": launch, "data": launch_data(demo)})
        assert direct.status_code == 200 and "follow it in the Jobs tab" in direct.json()["data"][0]
        job = runner.list()[0]
        wait_for(runner, job.id, "done")
        folder = Path(job.folder)
        answer = api.post("/api/predict", json=forged(delete, [job.id], host), headers=rebound)
        assert answer.status_code == 403
        assert [j.id for j in runner.list()] == [job.id] and folder.is_dir()

    # a foreign page's queue WebSocket pressing Launch, or Delete: closed, nothing done
    for index, data in ((launch, launch_data(demo)), (delete, [job.id])):
        with pytest.raises(ConnectionClosed):
            press(url, index, data, origin=EVIL)
    # joining as the WebUI's own event, then naming Delete in the data: the event joined is what runs
    assert press(url, delete, [job.id], origin=EVIL, join=own_event) == [job.id.upper()]
    assert [j.id for j in runner.list()] == [job.id] and folder.is_dir()

    # the page itself, over the queue (whose own call of /api/predict passes): Launch, then Delete
    launched = press(url, launch, launch_data(demo, steps=3), origin=url)
    assert "follow it in the Jobs tab" in launched[0] and len(runner.list()) == 2
    assert f"Deleted {job.id}" in press(url, delete, [job.id], origin=url)[0] and not folder.exists()
    wait_for(runner, runner.list()[0].id, "done")

