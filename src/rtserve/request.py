"""The Request object handlers receive; the parser fills it, the conductor stamps it.

One object per request from parse to completion: no copies on the hot path. Headers are
kept as the parser produced them (lower-case names, in order) and turned into a
case-insensitive mapping only when a handler asks for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, overload
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from .app import Route
    from .tls import TLSInfo


class Headers(Mapping[str, str]):
    """Case-insensitive, read-only view of request headers; duplicates joined by ", "."""

    __slots__ = ("_items", "_map")

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items
        joined: dict[str, str] = {}
        for name, value in items:
            if name in joined:
                joined[name] = joined[name] + ", " + value
            else:
                joined[name] = value
        self._map = joined

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def get(self, name: str, default=None):
        return self._map.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def getall(self, name: str) -> list[str]:
        """Every value of a header, in arrival order."""
        lname = name.lower()
        return [v for n, v in self._items if n == lname]

    def raw(self) -> list[tuple[str, str]]:
        """The (lower-case name, value) pairs as received."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


class Request:
    """An HTTP request as a handler sees it.

    Filled by the parser (method .. body), stamped by the conductor (client, start_ns,
    deadline_ns, and `tls_info` on a TLS connection). `deadline` and `remaining()` let a
    handler cut its own work short; `scheme` and `tls` say how the connection is secured.

    `path` is the percent-decoded path (UTF-8, invalid sequences replaced by U+FFFD) that
    the native App routes on; `raw_path` is the path exactly as sent, and is the same str
    object as `path` when the target has no `%`, so "was anything decoded" is one `is`.
    An encoded slash `%2F` decodes to `/` in `path`; only `raw_path` tells it from a
    separator (the App does: see docs/parser.md, "Paths").
    """

    __slots__ = (
        "method",
        "target",
        "path",
        "raw_path",
        "query_string",
        "version",
        "raw_headers",
        "content_length",
        "chunked",
        "keep_alive",
        "expect_continue",
        "body",
        "client",
        "start_ns",
        "deadline_ns",
        "respond_by_ns",
        "route",
        "status",
        "t_queued",
        "t_start",
        "t_end",
        "_headers",
        "_query",
        "tls_info",
        "head",
        "budget_header",
        "charge",
        "cpu_thread",
        "cpu_t0",
        "cpu_seen",
    )

    # Set by tlsio.TLSReader on requests that came over TLS and never assigned otherwise,
    # so plain HTTP pays nothing for it; read it through `tls` and `scheme`.
    tls_info: TLSInfo
    # Set by the worker that runs a request the CPU gate charged (`charge`) and that has
    # no deadline, before its handler starts: the thread's ident and its CPU clock then.
    # The gate reads them to see how much of its charge the handler has used
    # (handoff.Handoff._lapse_charges).
    cpu_thread: int
    cpu_t0: int
    cpu_seen: int  # the thread's CPU clock at the gate's last look (conductor only)

    def __init__(
        self,
        method: str,
        target: str,
        path: str,
        query_string: str,
        version: str,
        raw_headers: list[tuple[str, str]],
        content_length: int | None = None,
        chunked: bool = False,
        keep_alive: bool = True,
        expect_continue: bool = False,
        raw_path: str | None = None,
        budget_header: bool = True,
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.raw_path = path if raw_path is None else raw_path
        self.query_string = query_string
        self.version = version
        self.raw_headers = raw_headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.body = b""
        self.client: tuple[str, int] | None = None
        self.start_ns = 0  # when its first bytes arrived (monotonic ns; see arrival.py)
        self.deadline_ns = 0  # 0 = no deadline
        self.respond_by_ns = 0  # when the conductor sends the fallback instead (0 = none)
        self.route: Route | None = None  # set by the reader when routed
        self.status = 0  # the status sent (set when the response is built)
        self.t_queued = 0  # monotonic ns: handed to the queue / a worker
        self.t_start = 0  # handler started
        self.t_end = 0  # handler returned
        self._headers: Headers | None = None
        self._query: dict[str, list[str]] | None = None
        # The parser's record of this head when requests with the same head bytes share
        # one (an immutable tuple, see head_cache.HeadCache): per-head work may be keyed on it.
        self.head: Any = None
        # The head has a client-budget field (X-Request-Deadline-Ms, grpc-timeout,
        # x-envoy-expected-rq-timeout-ms): False lets admission skip looking for one.
        self.budget_header = budget_header
        self.charge = 0  # CPU ns the CPU gate charged while its handler runs (0: none)

    @property
    def headers(self) -> Headers:
        """Case-insensitive header mapping (built on first use)."""
        h = self._headers
        if h is None:
            h = self._headers = Headers(self.raw_headers)
        return h

    @property
    def scheme(self) -> str:
        """"https" for a request that came over TLS, else "http" (the connection's own
        scheme: proxy headers are the WSGI adapter's business, see docs/wsgi.md)."""
        try:
            self.tls_info  # noqa: B018  (set on TLS requests only)
        except AttributeError:
            return "http"
        return "https"

    @property
    def tls(self) -> Mapping[str, Any] | None:
        """What the TLS handshake established, read-only (docs/tls.md lists the keys:
        version, cipher, alpn, client_verify, client_subject ...); None over plain HTTP."""
        try:
            return self.tls_info.fields
        except AttributeError:
            return None

    @property
    def query(self) -> dict[str, list[str]]:
        """The parsed query string: name -> list of values."""
        q = self._query
        if q is None:
            q = self._query = parse_qs(self.query_string, keep_blank_values=True)
        return q

    @overload
    def query_param(self, name: str) -> str | None: ...
    @overload
    def query_param(self, name: str, default: str) -> str: ...
    @overload
    def query_param(self, name: str, default: str | None) -> str | None: ...

    def query_param(self, name: str, default: str | None = None) -> str | None:
        """The first value of a query parameter, or `default` (a str default gives a
        str, for the type checker too)."""
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def deadline(self) -> float | None:
        """The respond-by time on the `time.monotonic()` clock, or None without a deadline."""
        return self.deadline_ns / 1e9 if self.deadline_ns else None

    @property
    def respond_by(self) -> float | None:
        """When, on the `time.monotonic()` clock, the conductor stops waiting for this
        handler and sends the fallback or 504: the deadline less the margin and the recent
        timer lateness. An answer must be ready before this, not before `deadline`."""
        return self.respond_by_ns / 1e9 if self.respond_by_ns else None

    def remaining(self) -> float:
        """Seconds left before the deadline (negative when late; inf without a deadline)."""
        if not self.deadline_ns:
            return float("inf")
        return (self.deadline_ns - time.monotonic_ns()) / 1e9

    def text(self, encoding: str = "utf-8") -> str:
        return self.body.decode(encoding)

    def json(self):
        import json

        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} {self.version}>"
