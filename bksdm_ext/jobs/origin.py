"""Same-origin only: a request that changes state must come from a page this server served.

Two checks, on every request to our routes and inside every state-changing handler of the tab:
- The Host header names this server: a loopback name, the bound address, the machine's own names and
  addresses when it listens on every interface, or an origin the user allowed. Anything else is a
  page that rebound its own name to this machine (DNS rebinding).
- An Origin header, when present, has the request's own scheme, host and port (or is allowed). A
  foreign web page's fetch, form post or WebSocket always carries its own Origin.

Clients that are not browsers (curl, scripts) send no Origin and name the server as Host: they pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..errors import BKSDMError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
DEFAULT_PORTS = {"http": 80, "https": 443}


class CrossOrigin(BKSDMError):
    """A request from a page this server did not serve: refused (403)."""


def split_host(host: str) -> tuple[str, int | None]:
    """('name', port) of a Host header value or netloc; IPv6 brackets removed, the name lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, port = host.split(":")
    else:
        name, port = host, ""
    return name.rstrip("."), int(port) if port.isdigit() else None


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin(value: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of an Origin, its default port filled in; None for 'null' or anything unparsable."""
    parts = urlsplit(value.strip())
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return None
    name, port = split_host(parts.netloc)
    return parts.scheme, name, port or DEFAULT_PORTS[parts.scheme]


@dataclass(frozen=True)
class OriginPolicy:
    """Which Host and Origin headers are this server's own.

    `bound_host` is the address the server listens on (the WebUI's --server-name / --listen, `bksdm
    app --host`); `allowed_origins` and `allowed_origin_regex` are the user's own additions
    (`bksdm app --allowed-origin`, the WebUI's --cors-allow-origins / --cors-allow-origins-regex).
    """

    bound_host: str = "127.0.0.1"
    allowed_origins: tuple[str, ...] = ()
    allowed_origin_regex: str | None = None
    flag: str = "--allowed-origin"  # how the user adds an origin where this policy runs
    machine_names: tuple[str, ...] | None = field(default=None, compare=False)  # tests pass their own

    @classmethod
    def from_cmd_opts(cls, cmd_opts: Any, bound_host: str) -> "OriginPolicy":
        """The WebUI's policy: its bound address and its CORS flags."""
        origins = tuple(o for o in (getattr(cmd_opts, "cors_allow_origins", None) or "").split(",") if o.strip())
        return cls(bound_host=bound_host, allowed_origins=origins,
                   allowed_origin_regex=getattr(cmd_opts, "cors_allow_origins_regex", None) or None,
                   flag="--cors-allow-origins")

    @cached_property
    def _allowed(self) -> frozenset[tuple[str, str, int | None]]:
        return frozenset(o for o in map(_origin, self.allowed_origins) if o)

    @cached_property
    def own_names(self) -> frozenset[str]:
        """Host names and addresses that are this server's own (loopback ones are always)."""
        bound = split_host(self.bound_host)[0] if self.bound_host else ""
        names = {bound} if bound not in WILDCARD_ADDRESSES else set()
        if bound in WILDCARD_ADDRESSES or not _is_loopback(bound):
            names |= set(self.machine_names if self.machine_names is not None else _machine_names())
        if bound and bound not in WILDCARD_ADDRESSES and not _is_ip(bound):
            names |= _addresses(bound)
        return frozenset(n.lower().rstrip(".") for n in names if n)

    def _configured(self, scheme: str, name: str, port: int | None) -> bool:
        port = port or DEFAULT_PORTS.get(scheme)
        if (scheme, name, port) in self._allowed:
            return True
        if self.allowed_origin_regex:
            shown = f"[{name}]" if ":" in name else name
            netloc = shown if port == DEFAULT_PORTS.get(scheme) else f"{shown}:{port}"
            return re.fullmatch(self.allowed_origin_regex, f"{scheme}://{netloc}") is not None
        return False

    def refusal(self, scheme: str, headers: Mapping[str, str]) -> str | None:
        """Why a request with these headers (lower-case names) must be refused, or None when it is our own.

        `scheme` is how the request reached us: http/https (ws/wss are taken for them).
        """
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        host = headers.get("host") or ""
        name, port = split_host(host)
        if not name:
            return "the request names no Host"
        if not (_is_loopback(name) or name in self.own_names or self._configured(scheme, name, port)):
            return (f"Host {host!r} is not this server's own name (a page rebinding its name to this machine?); "
                    f"open the server by its address, or allow that origin with {self.flag}")
        origin = headers.get("origin")
        if origin is None:
            return None
        parsed = _origin(origin)
        if parsed is None:
            return f"Origin {origin!r} is not a web page's origin"
        if parsed == (scheme, name, port or DEFAULT_PORTS.get(scheme)) or self._configured(*parsed):
            return None
        return (f"Origin {origin!r} is another site than this server ({scheme}://{host}); only the server's own "
                f"page may do this. Allow that origin with {self.flag} if you trust it")

    def check(self, scheme: str, headers: Mapping[str, str], action: str) -> None:
        reason = self.refusal(scheme, headers)
        if reason:
            raise CrossOrigin(f"{action} is refused: {reason}.")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _addresses(name: str) -> set[str]:
    try:
        return {info[4][0].split("%")[0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return set()


def _machine_names() -> set[str]:
    """This machine's host names and the addresses they resolve to (what a LAN browser puts in Host)."""
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        names |= _addresses(name)
    try:  # the address of the interface that routes outward (no packet is sent)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            names.add(probe.getsockname()[0])
    except OSError:
        pass
    return names


def request_parts(request: Any) -> tuple[str, dict[str, str]]:
    """(scheme, lower-case headers) of a gradio Request, a starlette Request/WebSocket or an ASGI scope.

    Through gradio's queue a handler's Request holds the WebSocket's url and headers (the browser's own);
    a direct call holds the HTTP request itself.
    """
    if isinstance(request, Mapping) and "type" in request:  # an ASGI scope
        headers: dict[str, str] = {}
        for k, v in request.get("headers", []):  # the first of a repeated header, as starlette reads it
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        return request.get("scheme", "http"), headers
    inner = getattr(request, "request", None)
    if inner is not None:  # gradio's Request around a starlette one
        request = inner
    if hasattr(request, "url") and hasattr(request.url, "scheme"):  # starlette
        return request.url.scheme, {k.lower(): v for k, v in request.headers.items()}
    kwargs = getattr(request, "kwargs", None) or {}
    headers = kwargs.get("headers") or {}
    return urlsplit(str(kwargs.get("url", ""))).scheme or "http", {str(k).lower(): str(v) for k, v in dict(headers).items()}


GRADIO_PREDICT = re.compile(r"(?:^|/)(?:api|run)/([^/]+)/?$")  # gradio 3.41's POST /api|run/{api_name}
QUEUE_JOIN = re.compile(r"(?:^|/)queue/join/?$")


@dataclass
class OurEvents:
    """The part of a shared server that is ours: our routes (`paths`) and the gradio events of our tab.

    In the WebUI the app serves its own pages too, and those keep their own rules (a reverse proxy
    naming the WebUI by another Host still reaches them): the middleware refuses a foreign request
    only when it reaches something of ours. A gradio event names its function by `fn_index` (or by
    `api_name` in the path); what cannot be told apart from one of ours counts as ours.
    """

    blocks: Any = None  # the whole page (the WebUI's demo); None: no page (the WebUI's --nowebui)
    tab: Any = None  # our tab's Blocks, rendered into `blocks`
    paths: tuple[str, ...] = ("/bksdm/",)

    @cached_property
    def _ours(self) -> frozenset[int]:
        if self.blocks is None or self.tab is None:
            return frozenset()
        ids = set(self.tab.blocks) | {self.tab._id}
        fns = {id(fn) for fn in self.tab.fns}
        return frozenset(i for i, (dep, fn) in enumerate(zip(self.blocks.dependencies, self.blocks.fns))
                         if set(dep.get("targets") or ()) & ids or id(fn) in fns)

    def path(self, path: str) -> bool:
        return path.startswith(self.paths)

    def event(self, fn_index: Any, api_name: str | None = None) -> bool:
        """Whether an event call may reach one of our handlers (as gradio would resolve it)."""
        if self.blocks is None:
            return False
        count = len(self.blocks.dependencies)
        if fn_index is None and api_name not in (None, "predict"):
            names = [i for i, dep in enumerate(self.blocks.dependencies) if dep.get("api_name") == api_name]
            fn_index = names[0] if names else None
        if type(fn_index) is not int or not -count <= fn_index < count:  # gradio would coerce "3" or 3.0
            return True
        return fn_index % count in self._ours


class SameOriginMiddleware:
    """ASGI middleware refusing (403) the HTTP requests and WebSockets that are not the server's own.

    `bksdm app` puts it in front of everything it serves (gradio's /run, /api, /upload, /queue/join,
    /file= and our routes). In the WebUI (`only` = our part of it, `install_same_origin`) it refuses
    a foreign request to our routes, and a foreign call of one of our tab's events: a POST to
    /api|run/predict (whose body gradio would turn into the handler's gr.Request, headers and all)
    or a message on the queue's WebSocket naming one of them. Gradio's queue calls /api/predict on
    itself with its own Host and no Origin, so that call passes. `file_allowed(path)` further limits
    gradio's /file= route.
    """

    def __init__(self, app, policy: OriginPolicy, file_allowed=None, only: OurEvents | None = None):
        self.app, self.policy, self.file_allowed, self.only = app, policy, file_allowed, only

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        reason = self.policy.refusal(*request_parts(scope))
        path = scope.get("path", "")
        if reason is None and self.file_allowed is not None and path.startswith(("/file=", "/file/")):
            wanted = path[len("/file="):] if path.startswith("/file=") else path[len("/file/"):]
            if not self.file_allowed(wanted):
                reason = "this server shows only the images of its jobs"
        if reason and self.only is not None and not self.only.path(path):
            if scope["type"] == "websocket":
                if QUEUE_JOIN.search(path):
                    receive = self._queue_messages(receive, send, reason)
                reason = None
            elif scope.get("method") == "POST" and (predict := GRADIO_PREDICT.search(path)):
                body = await _read_body(receive)
                receive = _replay(body)
                data = _json(body)
                fn_index = data.get("fn_index") if isinstance(data, dict) else _MISSING
                if not self.only.event(fn_index, predict.group(1)):
                    reason = None
            else:
                reason = None
        if reason:
            await _refuse(scope, receive, send, reason)
            return
        await self.app(scope, receive, send)

    def _queue_messages(self, receive, send, reason: str):
        """A foreign page's queue WebSocket. Its first message names the event it joins: one of ours
        closes it (1008; gradio's join_queue then ends on its own 5 s timeout). The event's data, sent
        later, names the event that actually runs: it is held to the one joined."""
        joined = _MISSING

        async def checked():
            nonlocal joined
            message = await receive()
            if message["type"] != "websocket.receive":
                return message
            data = _json(message.get("text") or message.get("bytes") or b"")
            if joined is _MISSING:
                joined = data.get("fn_index") if isinstance(data, dict) else _MISSING
                if self.only.event(joined):
                    await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
                    await asyncio.Event().wait()
            elif isinstance(data, dict) and data.get("fn_index", _MISSING) != joined:
                return {"type": "websocket.receive", "text": json.dumps({**data, "fn_index": joined})}
            return message
        return checked


_MISSING = object()


def _json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return _MISSING


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}
    return receive


def install_same_origin(app, policy: OriginPolicy, only: OurEvents | None = None, file_allowed=None) -> None:
    """Put SameOriginMiddleware in front of an app, also one that is already serving: the way the WebUI
    adds its own middleware after launch (modules/initialize_util.setup_middleware), reset the stack
    and add; starlette rebuilds it at the next request. It goes into `app.user_middleware`, outermost,
    so a later rebuild (the WebUI's own, another extension's) keeps it. Once per app."""
    if any(m.cls is SameOriginMiddleware for m in app.user_middleware):
        return
    app.middleware_stack = None
    app.add_middleware(SameOriginMiddleware, policy=policy, file_allowed=file_allowed, only=only)


async def _refuse(scope, receive, send, reason: str) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})  # the client sees a 403
        return
    from starlette.responses import JSONResponse

    await JSONResponse({"detail": f"Refused: {reason}."}, status_code=403)(scope, receive, send)
