"""The ASGI HTTP connection scope of a parsed Request (event-loop thread, once per request).

Per the ASGI "HTTP & WebSocket" spec (spec_version 2.4): `type`, `asgi`, `http_version`,
`method`, `scheme`, `path` (percent-decoded, UTF-8) and `raw_path` (as received),
`query_string` (raw bytes), `root_path`, `headers` (lower-case name and value bytes, in
order), `client`, `server`, `state` (a shallow copy of the lifespan state) and
`extensions`: `http.response.pathsend` and `rtserve.deadline`
(`{"at": <time.monotonic() seconds> | None, "remaining": <() -> seconds>}`).

`root_path` (`--root-path`) is where the app is mounted: a path under it is passed whole
(the proxy kept the prefix); a path outside it gets it prepended (the proxy stripped it),
so `path` always starts with `root_path`, as Starlette expects. Trusted proxy headers
(`--forwarded-allow-ips`) set `client` and `scheme`, as for WSGI apps.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from .config import Config, ConfigError
from .proxy import ForwardedPolicy
from .request import Request

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
_HTTP_VERSIONS = {"HTTP/1.1": "1.1", "HTTP/1.0": "1.0"}
_NOTABLE = frozenset({"upgrade", "forwarded", "x-forwarded-for", "x-forwarded-proto"})
_NAMES_MAX = 4096


class ScopeBuilder:
    """Builds scopes; holds the per-server constants and a cache of encoded header names.

    One per event loop (its caches are that loop thread's alone).
    """

    __slots__ = ("root_path", "_root_raw", "_proxies", "server", "state", "_names", "scheme")

    def __init__(self, cfg: Config, state: dict[str, Any]) -> None:
        root = cfg.root_path.rstrip("/")
        if root and not root.startswith("/"):
            raise ConfigError(f"invalid value for root_path: {cfg.root_path!r} (starts with /)")
        self.root_path = unquote(root)
        self._root_raw = root.encode("latin-1", "replace")
        try:
            self._proxies = ForwardedPolicy(cfg.forwarded_allow_ips)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.server: tuple[str, int | None] | None = None  # the listener's address (set later)
        self.state = state  # the lifespan state of this loop
        # Every connection of a server with --certfile is TLS: the scheme is a constant.
        self.scheme = "https" if cfg.certfile else "http"
        self._names: dict[str, bytes] = {}

    def build(self, req: Request) -> tuple[dict[str, Any], bool]:
        """The scope, and whether the request asks for a WebSocket upgrade (refused)."""
        names = self._names
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        proxied = websocket = False
        for name, value in req.raw_headers:
            bname = names.get(name)
            if bname is None:
                bname = name.encode("latin-1")
                if len(names) < _NAMES_MAX:
                    names[name] = bname
            if name in _NOTABLE:
                if name == "upgrade":
                    websocket = websocket or "websocket" in value.lower()
                else:
                    proxied = True
            append((bname, value.encode("latin-1")))
        raw = req.path
        path = unquote(raw) if "%" in raw else raw
        raw_path = raw.encode("latin-1")
        root = self.root_path
        if root and not (path.startswith(root) and (len(path) == len(root)
                                                    or path[len(root)] == "/")):
            path = root + path  # the proxy stripped the mount point: put it back
            raw_path = self._root_raw + raw_path
        client = req.client
        if client is not None and client[0] == "unix":
            client = None
        scheme = self.scheme
        if proxied:
            client, scheme = self._forwarded(req, client)
        scope = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": _HTTP_VERSIONS.get(req.version, "1.1"),
            "method": req.method,
            "scheme": scheme,
            "path": path,
            "raw_path": raw_path,
            "query_string": req.query_string.encode("latin-1"),
            "root_path": root,
            "headers": headers,
            "client": client,
            "server": self.server,
            "state": self.state.copy(),
            "extensions": {
                "http.response.pathsend": {},
                "rtserve.deadline": {"at": req.deadline, "remaining": req.remaining},
            },
        }
        return scope, websocket

    def _forwarded(self, req: Request, client: Any) -> tuple[Any, str]:
        """Client and scheme from trusted X-Forwarded-*/Forwarded headers."""
        h = req.headers
        peer = client[0] if client else "unix"
        host, port, scheme = self._proxies.resolve(
            peer, h.get("forwarded"), h.get("x-forwarded-for"), h.get("x-forwarded-proto")
        )
        if host is not None:
            client = (host, port if port is not None else 0)
        return client, scheme or self.scheme
