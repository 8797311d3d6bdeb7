"""The parser's cache of heads seen before, by their exact bytes. Conductor thread (inside
`RequestParser.next_event`, parser.py, which looks heads up and enters them).

Clients repeat the very same head (a keep-alive client polling one URL, a load balancer's
health check, a benchmark), so a hit replaces the regex, the decode, both splits and the
field loop with one bytes copy and one dict lookup. Only heads of requests without a
body to frame (no Transfer-Encoding, no Expect) of at most HEAD_CACHE_BYTES enter (a
Content-Length is kept: its body is read as after a parsed head, each request its own);
the dict is emptied when full, so a client sending unique heads only costs itself the
miss. docs/parser.md, "Head cache", has the rules and the costs.

The parser reads `heads` and `once` directly and builds the common hit's `Request`
inline (a call there is ~360 instructions of a ~11k parse); `cached_request` is the same
build for its other hits (with a body, or pipelined), where a call was made anyway.
"""

from __future__ import annotations

from typing import Any

from .request import Request

HEAD_CACHE_BYTES = 2048  # the longest head that enters (and is looked up)
HEAD_CACHE_MAX = 256  # entries (and heads seen once) before the dict (or the set) is emptied


class HeadCache:
    """Parsed heads (none chunked or with an Expect) by their exact bytes, shared by the
    parsers given it.

    `heads` maps head bytes to the positional arguments of their `Request` (the headers as
    the cache's own list, never handed out: each request gets a copy). That tuple is shared
    by every request whose head had those bytes (`Request.head`), so a consumer can key its
    own per-head work on it by identity (the WSGI adapter's environ template: see wsgi.py).
    A head enters only the second time it is seen (`once` holds the heads seen once), so
    a stream of unique heads costs a set insert each, not an entry built and thrown away.
    Parsers may share a cache only if they share their limits: a head enters only after
    it passed them (the reader gives one to all of a server's connections).
    """

    __slots__ = ("heads", "once")

    def __init__(self) -> None:
        self.heads: dict[bytes, tuple[Any, ...]] = {}
        self.once: set[bytes] = set()


def cached_request(known: tuple[Any, ...]) -> Request:
    """A new `Request` of the cached head `known` (an entry of `HeadCache.heads`): its
    own header list, and `head` the entry itself (the identity per-head work keys on)."""
    request = Request(*known)
    request.raw_headers = list(known[5])
    request.head = known
    return request
