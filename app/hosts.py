"""Which requests sai-app answers: those addressed to this machine under a name it knows.

A web page the user visits can point its own domain at 127.0.0.1 (DNS rebinding) and then
call the app as if the app were that site: its requests carry the page's name in ``Host``.
A page on another site can also post to the app directly: its requests carry that site in
``Origin``. ``HostCheck`` answers both with 400 before gradio routes the request, so no
handler (the Train tab's included) runs for them.

The rule, port aside and case aside (docs/training.md, "In the browser: sai-app"):

- ``Host`` must be 127.0.0.1, localhost, ::1 or the ``--host`` the app was started with.
  Served beyond this machine (``--host 0.0.0.0``, ``::`` or a network address) it may also
  be this machine's own name or any IP address: a rebinding page always uses a domain name.
- ``Origin``, when sent, must be 127.0.0.1, localhost, ::1 or the name in ``Host`` (a page
  this app served itself). ``null`` (sandboxed frames, local files) is refused.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SHOWN = 60  # characters of a refused header quoted back


def is_loopback(host: str) -> bool:
    """Whether serving on ``host`` reaches this machine only."""
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """A ``Host`` header or ``--host`` -> the name alone, lower case, without the port, the
    IPv6 brackets or a final dot: ``"[::1]:7860"`` -> ``"::1"``."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # name:port; more colons: an IPv6 address without brackets
        value = value.partition(":")[0]
    return value.rstrip(".")


def machine_names() -> set[str]:
    """This machine's own names, as a browser on the network would write them."""
    names = {host_name(name) for name in (socket.gethostname(), socket.getfqdn()) if name}
    names -= {"localhost", "localhost.localdomain"}  # what getfqdn says without a DNS name
    return names | {f"{name.partition('.')[0]}.local" for name in names}  # and its mDNS name


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostRule:
    """The names ``HostCheck`` accepts for an app served on ``host`` (see the module
    docstring); ``extra`` names are accepted as well (a name of this machine in the local
    DNS, a reverse proxy's)."""

    def __init__(self, host: str, extra: Iterable[str] = ()) -> None:
        self.beyond_loopback = not is_loopback(host)
        names = {*LOOPBACK_NAMES, host_name(host), *(host_name(n) for n in extra)}
        if self.beyond_loopback:
            names |= machine_names()
        self.names = frozenset(names)
        others = sorted(self.names - {*LOOPBACK_NAMES, "0.0.0.0", "::"})
        shown = [*LOOPBACK_NAMES, *others, *(["an IP address"] if self.beyond_loopback else [])]
        self.listed = ", ".join(shown[:-1]) + " or " + shown[-1]

    def allows_host(self, name: str) -> bool:
        return name in self.names or (self.beyond_loopback and _is_address(name))

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """Why a request with these ``Host`` and ``Origin`` headers is refused, in one line;
        None when it is answered."""
        if not host or not self.allows_host(host_name(host)):
            return (
                f"sai-app answers requests addressed to {self.listed}, not to Host "
                f"{_shown(host)}. Open the app by one of those names."
            )
        if origin is None:
            return None
        try:
            origin_name = host_name(urlsplit(origin).hostname or "")
        except ValueError:  # an unbalanced "[" in the header
            origin_name = ""
        if origin_name in LOOPBACK_NAMES or origin_name == host_name(host):
            return None
        return (
            f"sai-app answers its own pages only, not a page from {_shown(origin)}. Open the "
            f"app at http://{host.strip()} instead."
        )


def _shown(value: str | None) -> str:
    if value is None:
        return "(none)"
    return repr(value if len(value) <= SHOWN else value[:SHOWN] + "…")


class HostCheck:
    """ASGI middleware: a request whose ``Host`` or ``Origin`` ``HostRule`` refuses gets 400
    with the reason as plain text (a websocket: closed before it opens), and the app behind
    never sees it."""

    def __init__(self, app: ASGIApp, *, host: str, extra: Iterable[str] = ()) -> None:
        self.app = app
        self.rule = HostRule(host, extra)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan: the server's own events
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        reason = self.rule.refusal(headers.get("host"), headers.get("origin"))
        if reason is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # the server answers 403
        else:
            await PlainTextResponse(reason + "\n", status_code=400)(scope, receive, send)
