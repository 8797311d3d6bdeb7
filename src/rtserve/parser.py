"""Strict, sans-IO HTTP/1.1 request parser run by the conductor for every connection.

It is the security boundary (request smuggling, resource limits) and it runs on the single
conductor thread, so it is both strict (RFC 9112 as gunicorn 27 reads it) and cheap: a
complete head costs one `find`, one `decode`, one precompiled `fullmatch` that validates the
whole head at once, one `split`, and a short loop over the header lines. Byte-by-byte input
takes the slow path, which keeps search offsets so total work stays linear in the input.

Interface (see docs/parser.md): `feed(bytes)`, then `next_event()` returns one complete
`Request` (body read, chunked decoded, trailers discarded) or `NEED_DATA`, and raises a
`ParseError` subclass carrying the HTTP status. After an error the parser is dead. This
module reads the head and decides the framing; body.py reads the body it announced.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_to_bytes

from rtserve.body import BodyReader, take_length
from rtserve.deadlines import BUDGET_HEADERS
from rtserve.errors import (
    BadRequest,
    ExpectationFailed,
    HeaderFieldsTooLarge,
    NotImplementedFraming,
    ParseError,
    PayloadTooLarge,
    URITooLong,
)
from rtserve.head_cache import HEAD_CACHE_BYTES, HEAD_CACHE_MAX, HeadCache, cached_request
from rtserve.parser_rules import (
    FIELD_LINE,
    TARGET,
    TOKEN,
    check_field_lines,
    check_request_line,
    diagnose_head,
    host_named,
    other_target_form,
    reject_transfer_encoding,
)
from rtserve.request import Request

# HeadCache is head_cache.py's, named here too: what a parser is given comes with it.
__all__ = ["CLOSED_PARSER", "NEED_DATA", "UNFED_PARSER", "HeadCache", "RequestParser"]


class _NeedData:
    """Sentinel type: more bytes are needed before the next request is complete."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: object = _NeedData()

# The whole head (request line, field lines, empty line) in one call: the fast path. Run on
# the receive buffer (bytes) so the same call also finds where the head ends.
# Any HTTP/1.x: a minor version above 1 is read as 1.1 (RFC 9110 6.2).
_HEAD_RE = re.compile(
    f"{TOKEN} {TARGET} HTTP/1\\.[0-9]\\r\\n(?:{FIELD_LINE})*+\\r\\n".encode("latin-1")
)
# Partial request line: anything but VCHAR/SP, or a CR that is not the last byte.
_LINE_PREFIX_BAD_RE = re.compile(rb"[^\x21-\x7e \r]|\r(?=[^\n])")

# Field lines already split (see _split_field): at most 1024 lines of at most 256 chars.
_FIELD_CACHE: dict[str, tuple[str, str]] = {}
_FIELD_CACHE_MAX = 1024
_FIELD_CACHE_LINE = 256
# Host values already validated: clients repeat the same few, so a set lookup replaces the
# regex. Only valid values enter; the set is emptied when full, so it stays small.
_VALID_HOSTS: set[str] = set()
_VALID_HOSTS_MAX = 256
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,18}")
_MAX_EMPTY_LINES = 2  # CRLFs tolerated before a request line (RFC 9112 2.2)

# Fields the parser itself interprets, and the client-budget fields it notes the presence
# of (`Request.budget_header`: admission reads them only when there are some).
_SPECIAL = frozenset(
    ("host", "content-length", "transfer-encoding", "connection", "expect")
) | BUDGET_HEADERS


# parser states: reading a head, a body (body.py reads it), dead after an error
_HEAD, _BODY, _DEAD = range(3)


class RequestParser:
    """Turns received bytes into complete `Request`s, one per `next_event()` call.

    Conductor-only (not thread-safe). Serial pipelining: bytes past the current request stay
    buffered until the next call.
    """

    __slots__ = (
        "max_request_line",
        "max_header_block",
        "max_header_count",
        "max_body_size",
        "pending",
        "buf",
        "_buf",
        "_state",
        "_error",
        "_seen",
        "_line_ok",
        "_checked",
        "_nfields",
        "_empty_lines",
        "_slow",
        "_bodies",
        "_heads",
        "_once",
    )

    def __init__(
        self,
        max_request_line: int = 8192,
        max_header_block: int = 65536,
        max_header_count: int = 100,
        max_body_size: int = 1 << 20,
        head_cache: HeadCache | None = None,
    ) -> None:
        """The limits may be given by position too: a server makes one parser per
        connection, and `partial(RequestParser, a, b, c, d, cache)()` costs ~1.7k
        instructions less than the same partial with keywords."""
        self.max_request_line = max_request_line
        self.max_header_block = max_header_block
        self.max_header_count = max_header_count
        self.max_body_size = max_body_size
        # The request whose head is parsed but whose body is still arriving (else None).
        self.pending: Request | None = None
        # The receive buffer, never replaced: `buf` is the same object, for the conductor
        # to test for held bytes without a call (read it only: `buffered` is its length).
        self._buf = self.buf = bytearray()
        self._state = _HEAD
        self._error: ParseError | None = None
        # Incremental-scan bookkeeping, all offsets into _buf (reset when bytes are consumed).
        self._seen = 0  # len(_buf) at the last NEED_DATA: only bytes past it are new
        self._line_ok = False  # request line of the current head already validated
        self._checked = 0  # field lines before this offset are validated
        self._nfields = 0  # field lines validated so far
        self._empty_lines = 0  # CRLFs skipped before the current request line
        self._slow = False  # a slow path touched the head-scan state above
        # Made at the first body that needs one (_body_reader), so a connection's parser
        # has no body state until then (one parser per connection).
        self._bodies: BodyReader | None = None
        # Parsed heads by their bytes (HEAD_CACHE_BYTES): this parser's own cache unless
        # it is given one shared with parsers of the same limits.
        cache = HeadCache() if head_cache is None else head_cache
        self._heads = cache.heads
        self._once = cache.once

    # --- conductor API ----------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """Append received bytes; parsing happens in `next_event()`."""
        if self._state != _DEAD:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes held and not yet consumed (bounds pipelining read-ahead)."""
        return len(self._buf)

    def has_partial(self) -> bool:
        """True if bytes of a not-yet-complete request are held (header timeout applies)."""
        return self._state != _DEAD and (self._state != _HEAD or len(self._buf) > 0)

    def next_event(self) -> Request | object:
        """The next complete request, or NEED_DATA; raises ParseError (then the parser is dead)."""
        try:
            if self._state == _HEAD:
                return self._parse_head()
            return self._read_body()
        except ParseError as exc:
            self._state = _DEAD
            self._error = exc
            self._buf.clear()
            self.pending = None
            raise

    # --- head -----------------------------------------------------------------------------

    def _parse_head(self) -> Request | object:
        """Parse a request head; complete bodyless requests are returned at once."""
        buf = self._buf
        if not buf:
            return NEED_DATA
        if buf[0] == 13 and not self._skip_empty_lines():
            return NEED_DATA
        # A head seen before: usually the buffer holds exactly one head (one recv, no
        # pipelining), and then its bytes are the cache key. A buffer holding more never
        # matches (every entry is one head), and goes the way of a new head.
        key = None
        if buf[-1] == 10 and len(buf) <= HEAD_CACHE_BYTES:
            key = bytes(buf)
            known = self._heads.get(key)
            if known is not None:
                buf.clear()
                if known[6]:  # a Content-Length: its body follows in the next read
                    if self._slow:
                        self._reset_head_scan()
                    return self._length_body(cached_request(known), known[6])
                if self._slow:
                    self._reset_head_scan()
                request = Request(*known)  # the common case (a keep-alive GET): inlined
                request.raw_headers = list(known[5])
                request.head = known
                return request
        elif not self._seen:
            # A head followed by more bytes in the buffer (its body, or the next request
            # pipelined): the key is the head alone, up to its blank line. (A buffer that
            # ends as a head does is taken for one head above: a head that never repeats
            # pays for no search.)
            end = buf.find(b"\r\n\r\n", 0, HEAD_CACHE_BYTES)
            if end > 0 and end + 4 < len(buf):
                hend = end + 4
                key = bytes(buf[:hend])
                known = self._heads.get(key)
                if known is not None:
                    del buf[:hend]
                    if self._slow:
                        self._reset_head_scan()
                    request = cached_request(known)
                    length = known[6]
                    return self._length_body(request, length) if length else request
        # First look at this head: one regex both validates it and finds its end. Later
        # looks (the head arrived in pieces) search for the end from where the last one
        # stopped, so byte-by-byte input stays linear, and validate once it is complete.
        m = _HEAD_RE.match(buf) if not self._seen else None
        if m is not None:
            hend = m.end()
        else:
            end = buf.find(b"\r\n\r\n", self._seen - 3 if self._seen > 3 else 0)
            if end < 0:
                self._check_partial_head()
                return NEED_DATA
            hend = end + 4
            m = _HEAD_RE.match(buf)  # None or ending at hend: field lines contain no CR
        if hend > self.max_header_block:
            # Same order as the incremental path: the request line's verdict comes first.
            le = buf.find(b"\r\n")
            if le > self.max_request_line:
                raise URITooLong("request line too long")
            check_request_line(buf[:le].decode("latin-1"))
            raise HeaderFieldsTooLarge("header section too large")
        # Consume the head now (an error kills the parser anyway); decode it in one call.
        if hend == len(buf):
            head = buf.decode("latin-1") if key is None else key.decode("latin-1")
            buf.clear()
        else:
            if key is not None and len(key) != hend:
                key = None  # the key must be this head alone
            head = buf[:hend].decode("latin-1") if key is None else key.decode("latin-1")
            del buf[:hend]
        if self._slow:
            self._reset_head_scan()
        lines = head.split("\r\n")  # request line, field lines, "", ""
        if len(lines[0]) > self.max_request_line:
            raise URITooLong("request line too long")
        if m is None:
            diagnose_head(lines)  # always raises
        method, target, version = lines[0].split(" ")
        if len(lines) - 3 > self.max_header_count:
            raise HeaderFieldsTooLarge("too many header fields")

        raw_headers: list[tuple[str, str]] = []
        append = raw_headers.append
        specials: list[tuple[str, str]] = []  # the few fields that decide framing
        cached = _FIELD_CACHE.get
        for line in lines[1:-2]:
            field = cached(line)
            if field is None:
                field = _split_field(line)
            append(field)
            if field[0] in _SPECIAL:
                specials.append(field)
        host = cl = te = conn = expect = None
        budget = False
        for name, value in specials:  # usually just Host (and Connection)
            if name == "host":
                if host is not None:
                    raise BadRequest("duplicate Host")
                host = value
            elif name == "connection":
                conn = value if conn is None else conn + "," + value
            elif name == "content-length":
                if cl is not None:
                    raise BadRequest("duplicate Content-Length")
                cl = value
            elif name == "transfer-encoding":
                if te is not None:
                    raise BadRequest("duplicate Transfer-Encoding")
                te = value
            elif name == "expect":
                if expect is None or expect.lower() == "100-continue":
                    expect = value  # Expect: 100-continue holds only if every value says so
            else:
                budget = True  # a client-budget field: admission parses it

        if target[0] == "/":
            path, _, query = target.partition("?")
        else:
            path, query = other_target_form(method, target)
        if method == "CONNECT":
            raise NotImplementedFraming("CONNECT not implemented")
        raw_path = path
        if "%" in path:  # decode only then: the common path costs one `in`
            # UTF-8, invalid sequences replaced (U+FFFD); half the cost of unquote().
            path = unquote_to_bytes(path).decode("utf-8", "replace")

        http11 = version == "HTTP/1.1"
        if not http11 and version != "HTTP/1.0":
            # HTTP/1.2 and up: processed as the highest 1.x we implement (RFC 9110 6.2).
            version = "HTTP/1.1"
            http11 = True
        if host is None:
            if http11:
                raise BadRequest("missing Host")
        elif host not in _VALID_HOSTS:
            if host_named(host, "Host"):
                if len(_VALID_HOSTS) >= _VALID_HOSTS_MAX:
                    _VALID_HOSTS.clear()
                _VALID_HOSTS.add(host)
            elif target[0] == "/" or target == "*":
                # The target URI takes its authority from Host; an http(s) URI with an
                # empty host is invalid (RFC 9110 4.2.1, RFC 9112 3.3). In absolute-form
                # the target's own authority is used instead (RFC 9112 3.2.2).
                raise BadRequest("Host names no host")

        if conn is None:
            keep_alive = http11
        else:
            conn = conn.lower()
            if conn == "keep-alive":
                keep_alive = True
            elif conn == "close":
                keep_alive = False
            else:
                tokens = {t.strip(" \t") for t in conn.split(",")}
                keep_alive = "close" not in tokens and (http11 or "keep-alive" in tokens)

        chunked = False
        length = 0
        if te is not None:
            if cl is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if not http11:
                raise BadRequest("Transfer-Encoding in HTTP/1.0")
            if te.lower() != "chunked":
                reject_transfer_encoding(te)  # always raises
            chunked = True
        elif cl is not None:
            if _CONTENT_LENGTH_RE.fullmatch(cl) is None:
                raise BadRequest("invalid Content-Length")
            length = int(cl)
            if length > self.max_body_size:
                raise PayloadTooLarge("Content-Length exceeds the body limit")

        expect_continue = False
        if expect is not None and http11:
            if expect.lower() != "100-continue":
                raise ExpectationFailed("unsupported expectation")
            expect_continue = True

        request = Request(
            method,
            target,
            path,
            query,
            version,
            raw_headers,
            length if cl is not None else None,
            chunked,
            keep_alive,
            expect_continue,
            raw_path,
            budget,
        )
        if chunked:  # what the head left of the header-block limit is the trailers'
            return self._chunked_body(request, self.max_header_block - hend)
        if key is not None and not expect_continue:
            once = self._once
            if key in once:  # the second time: worth an entry
                heads = self._heads
                if len(heads) >= HEAD_CACHE_MAX:
                    heads.clear()
                # One object for the entry and this request (typed as a variable-length
                # tuple so that the compiled build boxes it once: identity is the contract).
                entry: tuple[Any, ...] = (
                    method, target, path, query, version, list(raw_headers),
                    request.content_length, False, keep_alive, False, raw_path, budget,
                )
                heads[key] = entry
                request.head = entry
            else:
                if len(once) >= HEAD_CACHE_MAX:
                    once.clear()
                once.add(key)
        if length:
            return self._length_body(request, length)
        return request

    def _reset_head_scan(self) -> None:
        """Forget the incremental-scan state of the head just consumed."""
        self._seen = 0
        self._line_ok = False
        self._checked = 0
        self._nfields = 0
        self._empty_lines = 0
        self._slow = False

    def _skip_empty_lines(self) -> bool:
        """Drop up to _MAX_EMPTY_LINES CRLFs before a request line; False if more bytes needed."""
        buf = self._buf
        while buf and buf[0] == 13:
            if len(buf) < 2:
                return False
            if buf[1] != 10:
                raise BadRequest("bare CR before request line")
            if self._empty_lines >= _MAX_EMPTY_LINES:
                raise BadRequest("too many empty lines before request line")
            del buf[:2]
            self._empty_lines += 1
            self._slow = True
        self._seen = 0
        return bool(buf)

    def _check_partial_head(self) -> None:
        """Reject an incomplete head as early as its bytes allow; keep scanning linear.

        Without this, a bare-LF or HTTP/0.9 request would wait for the header timeout
        instead of getting its 400 at once.
        """
        buf = self._buf
        n = len(buf)
        start = self._seen - 1 if self._seen > 0 else 0
        self._slow = True
        if not self._line_ok:
            le = buf.find(b"\r\n", start)
            if le < 0:
                if n - (buf[-1] == 13) > self.max_request_line:
                    raise URITooLong("request line too long")
                if _LINE_PREFIX_BAD_RE.search(buf, start) is not None:
                    raise BadRequest("invalid byte in request line")
                self._seen = n
                return
            if le > self.max_request_line:
                raise URITooLong("request line too long")
            check_request_line(buf[:le].decode("latin-1"))
            self._line_ok = True
            self._checked = le + 2
            start = le + 2
        self._checked, self._nfields = check_field_lines(
            buf, start, self._checked, self._nfields, self.max_header_count
        )
        if n >= self.max_header_block:
            raise HeaderFieldsTooLarge("header section too large")
        self._seen = n

    # --- body (body.py reads it) ----------------------------------------------------------

    def _length_body(self, request: Request, length: int) -> Request | object:
        """The request with its Content-Length body, or NEED_DATA with the request pending
        until the rest of the body came."""
        body = take_length(self._buf, length)
        if body is None:  # the rest comes in later reads
            self._body_reader().length(length)
            self.pending = request
            self._state = _BODY
            return NEED_DATA
        request.body = body  # the usual case: it came in its head's read
        return request

    def _chunked_body(self, request: Request, trailer_budget: int) -> Request | object:
        """The request with its decoded chunked body, or NEED_DATA with the request pending
        until the rest came (`trailer_budget`: what the head left for the trailers)."""
        body = self._body_reader().chunked(trailer_budget)
        if body is None:
            self.pending = request
            self._state = _BODY
            return NEED_DATA
        request.body = body
        return request

    def _body_reader(self) -> BodyReader:
        """This parser's BodyReader, made at the first body that needs one."""
        bodies = self._bodies
        if bodies is None:
            bodies = self._bodies = BodyReader(self._buf, self.max_body_size,
                                               self.max_header_count)
        return bodies

    def _read_body(self) -> Request | object:
        """Bytes came for the pending request's body: the request once its body is whole."""
        if self._state == _DEAD:
            raise self._error  # type: ignore[misc]
        body = self._bodies.read()  # type: ignore[union-attr]
        if body is None:
            return NEED_DATA
        request = self.pending
        request.body = body  # type: ignore[union-attr]
        self.pending = None
        self._state = _HEAD
        return request


def _closed_parser() -> RequestParser:
    """A dead parser that holds no bytes: what a closed connection keeps (CLOSED_PARSER)."""
    parser = RequestParser(max_header_block=0, head_cache=HeadCache())
    parser._state = _DEAD
    parser._error = BadRequest("connection closed")
    return parser


#: What a closed Connection holds instead of its own parser (connection.Connection.closed),
#: so that parser and its buffers go at the close, not when the connection's last stale
#: timer entry does (timers.py deletes lazily): under connection churn those parsers made
#: up a quarter of what the cyclic collector walked. It takes no bytes (`feed` is a no-op,
#: `buf` stays empty, `has_partial()` is False) and `next_event()` raises.
CLOSED_PARSER = _closed_parser()


def _split_field(line: str) -> tuple[str, str]:
    """(lower-case name, value without OWS) of a validated field line; remembers short ones.

    Clients repeat most field lines verbatim (Host, User-Agent, Accept...), so a dict hit
    replaces partition + lower + strip + tuple. The mapping is a pure function of the line
    (validation already happened), the cache only holds short lines and is emptied when
    full, so a client sending unique lines only costs itself the miss.
    """
    name, _, value = line.partition(":")
    field = (name.lower(), value.strip(" \t"))
    if len(line) <= _FIELD_CACHE_LINE:
        if len(_FIELD_CACHE) >= _FIELD_CACHE_MAX:
            _FIELD_CACHE.clear()
        _FIELD_CACHE[line] = field
    return field


#: What a new Connection holds until it needs a parser of its own. A read that is one
#: whole head seen before (the head cache's common hit, without a body) becomes its
#: Request in the reader without a parser (reader.Reader.received), so a connection whose
#: every read is such a head (a fresh connection's one request, a keep-alive client
#: repeating one URL) never makes one; any other read swaps in the connection's own
#: parser first. Shared by every such connection, so nothing may feed it: it holds no
#: bytes, `has_partial()` is False and `next_event()` says NEED_DATA, as a new parser's do.
UNFED_PARSER = RequestParser(head_cache=HeadCache())
