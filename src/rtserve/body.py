"""How a request body is framed and decoded: Content-Length counted out, chunked decoded.

Conductor thread, inside `RequestParser.next_event` (parser.py). Once a head announces a
body, the parser hands it here. A Content-Length body that came in its head's read (the
usual case) is one slice of the parser's receive buffer (`take_length`); any other body
goes to the parser's `BodyReader` (`length` or `chunked`), which works in that same buffer
and gives back the whole body, or None while bytes are missing (`read` goes on when more
came). Chunked framing (RFC 9112 7.1): size lines with their extensions, the
data, the CRLF after it, then the trailer section, validated and discarded. The head has
checked a Content-Length against the body limit already; a chunked body is checked as its
size lines announce it. Every error is a ParseError subclass carrying its status (400,
413, 431), and the parser that called dies with it.
"""

from __future__ import annotations

import re

from rtserve.errors import BadRequest, HeaderFieldsTooLarge, PayloadTooLarge
from rtserve.parser_rules import (
    FIELD_LINES_RE,
    QUOTED,
    TOKEN,
    check_field_lines,
    diagnose_fields,
)

__all__ = ["BodyReader", "take_length"]

# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS val ] )
# (RFC 9112 7.1.1), val = token / quoted-string. BWS is whitespace a sender must not
# generate but a recipient must parse, so it is accepted, and extensions are ignored.
_BWS = r"[\t ]*+"
_CHUNK_EXT = f"{_BWS};{_BWS}{TOKEN}(?:{_BWS}={_BWS}(?:{TOKEN}|{QUOTED}))?"
_CHUNK_LINE_RE = re.compile(f"([0-9A-Fa-f]{{1,16}})((?:{_CHUNK_EXT})*+)")
# The usual line has no extension: matched in the receive buffer, no slice or decode.
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")

_MAX_CHUNK_LINE = 4096  # one chunk-size line, extensions included
_MAX_CHUNK_EXT_TOTAL = 16384  # all chunk extensions of one request (they cost parse time)

# Fields a sender must not put in a trailer section because they are evaluated before the
# content (RFC 9110 6.5.1: framing, routing, authentication, request modifiers, response
# controls, content format), plus connection control and rtserve's own deadline fields.
# Trailers are never merged into the headers (they are discarded); one of these in them
# is refused with 400, as a client probing for a recipient that would merge it.
_FORBIDDEN_TRAILERS = frozenset((
    # framing (RFC 9112 6, RFC 9110 6.6.2)
    "content-length", "transfer-encoding", "trailer",
    # connection control (RFC 9110 7.6.1, 7.8, 10.1.4)
    "connection", "keep-alive", "proxy-connection", "te", "upgrade",
    # routing (RFC 9110 7.2, 7.6.2; RFC 7239 and its X- forerunners, see proxy.py)
    "host", "max-forwards", "forwarded", "x-forwarded-for", "x-forwarded-host",
    "x-forwarded-proto",
    # authentication and state (RFC 9110 11.6, 11.7; RFC 6265)
    "authorization", "proxy-authorization", "cookie",
    # request modifiers (RFC 9110 10.1.1, 13.1, 14.2; RFC 9111 5.2, 5.4)
    "expect", "range", "if-match", "if-none-match", "if-modified-since",
    "if-unmodified-since", "if-range", "cache-control", "pragma",
    # content format (RFC 9110 8.3, 8.4, 14.4)
    "content-type", "content-encoding", "content-range",
    # the client deadline, read from the head before dispatch (docs/deadlines.md)
    "x-request-deadline-ms", "grpc-timeout", "x-envoy-expected-rq-timeout-ms",
))

# reader states: a Content-Length body, then the steps of chunked framing
_LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS = range(5)


def take_length(buf: bytearray, length: int) -> bytes | None:
    """A body of `length` bytes (a Content-Length within the limit) from the front of
    `buf`: the body, consumed, when all of it is there, else None and nothing consumed."""
    n = len(buf)
    if n < length:
        return None
    if n == length:  # the usual case: the read ended with the body
        body = bytes(buf)
        buf.clear()
        return body
    body = bytes(buf[:length])  # the next request (pipelined) follows
    del buf[:length]
    return body


class BodyReader:
    """Reads one request body at a time from the front of a parser's receive buffer: a
    chunked one, or a Content-Length one that did not come whole with its head.

    One per parser, made at the first body that needs one (a connection whose bodies
    come with their heads never makes one) and used again for each later body: `length`
    and `chunked` set every field the body they begin reads. Conductor-only.
    """

    __slots__ = (
        "_buf",
        "_max_body",
        "_max_fields",
        "_state",
        "_left",
        "_total",
        "_body",
        "_ext_total",
        "_budget",
        "_seen",
        "_checked",
        "_nfields",
    )

    # Set by `length` or `chunked` for the body they begin, never read before.
    _state: int
    _left: int  # body bytes (Content-Length) or chunk bytes still to read
    _total: int  # decoded chunked body size so far
    _body: bytearray  # the chunked body decoded so far
    _ext_total: int  # chunk-extension bytes so far
    _budget: int  # bytes left for the trailer section (what the head left of its limit)
    _seen: int  # len(_buf) at the last look at a size line or trailers: only later bytes are new
    _checked: int  # trailer lines before this offset are validated
    _nfields: int  # trailer lines validated so far

    def __init__(self, buf: bytearray, max_body_size: int, max_fields: int) -> None:
        """`buf` is the parser's receive buffer (never replaced); `max_fields` limits the
        trailer section's lines, as the head's."""
        self._buf = buf
        self._max_body = max_body_size
        self._max_fields = max_fields

    # --- a body begins (the parser, right after its head) ------------------------------------

    def length(self, length: int) -> None:
        """A body of `length` bytes (a Content-Length within the limit) whose bytes are not
        all in yet (`take_length` said so): `read` takes it once they are."""
        self._state = _LENGTH
        self._left = length

    def chunked(self, trailer_budget: int) -> bytes | None:
        """A chunked body: the decoded body once its last chunk and trailers are in, else
        None. `trailer_budget` is what the head left of the header-block limit."""
        self._state = _CHUNK_SIZE
        self._total = 0
        self._ext_total = 0
        self._body = bytearray()
        self._budget = trailer_budget
        self._seen = 0
        return self.read()

    # --- more bytes came ---------------------------------------------------------------------

    def read(self) -> bytes | None:
        """Go on with the body begun: the whole body once it is complete, else None."""
        state = self._state
        if state == _LENGTH:
            return take_length(self._buf, self._left)
        buf = self._buf
        while True:
            if state == _CHUNK_SIZE:
                if not self._read_chunk_size():
                    return None
            elif state == _CHUNK_DATA:
                n = min(len(buf), self._left)
                if n == 0:
                    return None
                self._body += buf[:n]
                del buf[:n]
                self._left -= n
                if self._left:
                    return None
                self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    if buf and buf[0] != 13:
                        raise BadRequest("missing CRLF after chunk data")
                    return None
                if buf[0] != 13 or buf[1] != 10:
                    raise BadRequest("missing CRLF after chunk data")
                del buf[:2]
                self._state = _CHUNK_SIZE
            else:  # _TRAILERS
                if not self._read_trailers():
                    return None
                body = bytes(self._body)
                self._body = bytearray()  # a large body's buffer goes now, not at the next
                return body
            state = self._state

    def _read_chunk_size(self) -> bool:
        """Consume one chunk-size line; False if it is not complete yet."""
        buf = self._buf
        start = self._seen - 1 if self._seen > 0 else 0
        i = buf.find(b"\r\n", start)
        if i < 0:
            n = len(buf)
            if buf.find(b"\n", start) >= 0 or buf.find(b"\r", start, n - 1) >= 0:
                raise BadRequest("bare CR or LF in chunk-size line")
            if n > _MAX_CHUNK_LINE + 1:
                raise BadRequest("chunk-size line too long")
            self._seen = n
            return False
        if i > _MAX_CHUNK_LINE:
            raise BadRequest("chunk-size line too long")
        if _CHUNK_SIZE_RE.fullmatch(buf, 0, i) is not None:  # no extension: the common line
            size = int(buf[:i], 16)
        else:
            m = _CHUNK_LINE_RE.fullmatch(buf[:i].decode("latin-1"))
            if m is None:
                raise BadRequest("invalid chunk-size line")
            size_hex, ext = m.groups()
            self._ext_total += len(ext)
            if self._ext_total > _MAX_CHUNK_EXT_TOTAL:
                raise BadRequest("chunk extensions too long")
            size = int(size_hex, 16)
        del buf[: i + 2]
        self._seen = 0
        if size == 0:
            self._state = _TRAILERS
            self._checked = 0
            self._nfields = 0
            return True
        self._total += size
        if self._total > self._max_body:
            raise PayloadTooLarge("chunked body exceeds the body limit")
        self._left = size
        self._state = _CHUNK_DATA
        return True

    def _read_trailers(self) -> bool:
        """Consume the trailer section (validated, then discarded); False if incomplete."""
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[0] == 13 and buf[1] == 10:
            del buf[:2]
            return True
        end = buf.find(b"\r\n\r\n", self._seen - 3 if self._seen > 3 else 0)
        if end < 0:
            self._checked, self._nfields = check_field_lines(
                buf, self._seen - 1 if self._seen > 0 else 0, self._checked, self._nfields,
                self._max_fields,
            )
            if len(buf) >= self._budget:
                raise HeaderFieldsTooLarge("trailer section too large")
            self._seen = len(buf)
            return False
        if end + 4 > self._budget:
            raise HeaderFieldsTooLarge("trailer section too large")
        block = buf[: end + 2].decode("latin-1")
        lines = block.split("\r\n")[:-1]
        if FIELD_LINES_RE.fullmatch(block) is None:
            diagnose_fields(lines)
        if len(lines) > self._max_fields:
            raise HeaderFieldsTooLarge("too many trailer fields")
        for line in lines:
            if line[: line.index(":")].lower() in _FORBIDDEN_TRAILERS:
                raise BadRequest("forbidden field in trailer section")
        del buf[: end + 4]
        self._seen = 0
        return True
