"""Logins for our routes where the server has them: the WebUI's --api-auth and --gradio-auth.

The WebUI guards its own /sdapi routes with HTTP Basic (--api-auth) through `Api.add_api_route`, and
its page with gradio's login (--gradio-auth, a session cookie); routes an extension adds with
`include_router` get neither. Ours accept both: Basic credentials of either flag, or the session
cookie of a user logged in to the page.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import Any, Callable, Iterable, Mapping


def parse_credentials(text: str | None) -> dict[str, str]:
    """{user: password} of 'u1:p1,u2:p2' (the flags' format)."""
    pairs = (item.strip().split(":", 1) for item in (text or "").split(",") if ":" in item)
    return {user: password for user, password in pairs}


@dataclass(frozen=True)
class Logins:
    credentials: Mapping[str, str]
    sessions: Callable[[], Mapping[str, Any]] = field(default=lambda: {})  # gradio's app.tokens: cookie -> user

    def __call__(self, request) -> bool:
        """Whether the starlette request carries valid Basic credentials or a logged-in session cookie."""
        header = request.headers.get("authorization", "")
        if header[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            known = self.credentials.get(user)
            return known is not None and compare_digest(password.encode(), known.encode())
        token = request.cookies.get("access-token") or request.cookies.get("access-token-unsecure")
        return bool(token) and token in (self.sessions() or {})

    @classmethod
    def of(cls, api_auth: str | None, gradio_creds: Iterable[tuple[str, str]] = (),
           sessions: Callable[[], Mapping[str, Any]] | None = None) -> "Logins | None":
        """The logins of the WebUI's flags; None when it has none (then our routes need none either)."""
        credentials = {**dict(gradio_creds), **parse_credentials(api_auth)}
        if not credentials:
            return None
        return cls(credentials, sessions or (lambda: {}))
