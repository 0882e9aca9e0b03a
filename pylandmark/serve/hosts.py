"""Which Host headers the service answers: the names and addresses it was bound to, this machine's
loopback names, and the names given by ``--allowed-host``. A page in a user's browser that
rebinds its own DNS name to 127.0.0.1 (DNS rebinding) sends its own name as Host, so it gets a
400 instead of the index's facts and photos."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

__all__ = ["allowed_hosts", "host_of", "HostCheck"]

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names (lower case, without port or IPv6 brackets) a service bound to ``bound``
    answers; None when ``extra`` holds ``*`` (any). A wildcard address (0.0.0.0, ::) adds this
    machine's host name, its fully qualified name and the addresses they resolve to."""
    extra = [h.strip().lower().strip("[]") for h in extra if h.strip()]
    if "*" in extra:
        return None
    names = {*_LOOPBACK_NAMES, bound.lower().strip("[]"), *extra}
    if _is_wildcard(bound):
        for name in {socket.gethostname(), socket.getfqdn()}:
            names.add(name.lower())
            try:
                names.update(str(info[4][0]).lower() for info in socket.getaddrinfo(name, None))
            except OSError:
                pass
    return frozenset(n for n in names if n)


def host_of(header: str) -> str:
    """The name in a Host header: ``"[::1]:8000"`` -> ``"::1"``, ``"Example.com:80"`` ->
    ``"example.com"``."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostCheck:
    """ASGI middleware: answers 400 (JSON) to a request whose Host header is not in ``allowed``
    (None: every host)."""

    def __init__(self, app, allowed: frozenset[str] | None, error):
        self.app, self.allowed, self.error = app, allowed, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allowed is None:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
        name = host_of(header)
        if name not in self.allowed:
            shown = header[:100] or "(none)"
            return await self.error(400, f"Host {shown!r} is not a name this service answers to; start it with "
                                         f"--allowed-host {name or 'NAME'} to allow it")(scope, receive, send)
        return await self.app(scope, receive, send)
