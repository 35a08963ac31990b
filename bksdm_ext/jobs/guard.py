"""The access guard: no jobs (which run code and read/write server paths) for a server others can reach.

The WebUI's own rule for extension installs (modules/shared_cmd_options.py, 1.6-1.10):
`disable_extension_access = (share or listen or ngrok or server_name) and not
enable_insecure_extension_access`. We follow it, judging locality by the address actually bound
rather than by the presence of --server-name: `--server-name 127.0.0.1` stays local, a name
that resolves to anything but loopback does not. What gets bound: --server-name if given, else
0.0.0.0 for --listen, else 0.0.0.0 for the API-only server (--nowebui hands uvicorn no host),
else gradio's default ($GRADIO_SERVER_NAME or 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import BKSDMError

INSECURE_FLAG = "--enable-insecure-extension-access"


class AccessDenied(BKSDMError):
    pass


def is_loopback(host: str) -> bool:
    """True if every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False  # a name we cannot resolve: assume the worst
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


@dataclass(frozen=True)
class AccessGuard:
    share: bool = False
    listen: bool = False
    ngrok: bool = False
    server_name: str | None = None
    api_only: bool = False  # the WebUI's --nowebui
    allow_insecure: bool = False  # --enable-insecure-extension-access
    gradio_default_host: str = "127.0.0.1"
    host_flag: str = "--server-name"  # how the user names the address: `bksdm app` says --host

    @classmethod
    def from_cmd_opts(cls, cmd_opts: Any, environ: Mapping[str, str] = os.environ) -> "AccessGuard":
        """From the WebUI's parsed command line (any object with its attribute names)."""
        opt = lambda name, default=False: getattr(cmd_opts, name, default) or default  # noqa: E731
        return cls(share=bool(opt("share")), listen=bool(opt("listen")), ngrok=bool(opt("ngrok", None)),
                   server_name=opt("server_name", None), api_only=bool(opt("nowebui")),
                   allow_insecure=bool(opt("enable_insecure_extension_access")),
                   gradio_default_host=environ.get("GRADIO_SERVER_NAME") or "127.0.0.1")

    @property
    def bound_host(self) -> str:
        if self.server_name:
            return self.server_name
        if self.listen or self.api_only:
            return "0.0.0.0"
        return self.gradio_default_host

    @property
    def exposure(self) -> str | None:
        """Why other machines can reach this server, or None when only this machine can."""
        if self.share:
            return "--share publishes it through a public link"
        if self.ngrok:
            return "--ngrok publishes it through a public tunnel"
        host = self.bound_host
        if is_loopback(host):
            return None
        if self.server_name:
            return f"{self.host_flag} {host} is not a loopback address"
        if self.listen:
            return "--listen binds 0.0.0.0 (every network interface)"
        if self.api_only:
            return "the API-only server (--nowebui) binds 0.0.0.0 when no --server-name is given"
        return f"it listens on {host} ($GRADIO_SERVER_NAME)"

    @property
    def allowed(self) -> bool:
        return self.allow_insecure or self.exposure is None

    def check(self, action: str) -> None:
        """Raise AccessDenied, saying why and what to do, if `action` must be refused."""
        reason = self.exposure
        if reason and not self.allow_insecure:
            raise AccessDenied(
                f"{action} is refused: this server can be reached from other machines ({reason}), and jobs run "
                f"code and use files on this machine. Bind it to 127.0.0.1, or start it with {INSECURE_FLAG} "
                "if everyone who can reach it may do that.")
