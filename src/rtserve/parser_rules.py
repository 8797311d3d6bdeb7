"""The HTTP/1.1 grammar the parser is built from, and the checks it runs off its fast path.

Any thread (pure functions), called by parser.py on the conductor: the grammar strings its
fast-path regexes are made of (RFC 9110 5.6.2, 5.5; RFC 9112 3, 5, 7.1), the Host and
absolute-form authority rules (RFC 9110 7.2, RFC 3986 3.2.2-3.2.3), the Transfer-Encoding
classification, and the diagnoses that turn a head the fast-path regex refused into the
error, and status, of the first rule it broke, and the check of a field section still
arriving (a head or a trailer section in pieces). None of this runs for a valid request
with a Host value seen before.
"""

from __future__ import annotations

import ipaddress
import re

from rtserve.errors import (
    BadRequest,
    HeaderFieldsTooLarge,
    NotImplementedFraming,
    VersionNotSupported,
)

# --- grammar (RFC 9110 5.6.2, 5.5; RFC 9112 3, 5, 7.1) --------------------------------------
# Possessive quantifiers (*+, ++) make every pattern backtracking-free: linear time on any
# input (the ReDoS class of CVE-2020-5236).
TCHAR = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
TOKEN = f"[{TCHAR}]++"
# field-value: VCHAR / obs-text / SP / HTAB; no CTLs, no CR, no LF. OWS is stripped later.
FIELD_LINE = f"[{TCHAR}]++:[\\t\\x20-\\x7e\\x80-\\xff]*+\\r\\n"
# request-target: VCHAR except '#' (a fragment is never part of a request-target).
TARGET = r"[\x21\x22\x24-\x7e]++"

QUOTED = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*+"'

# Request line with any one-digit version, to tell 505 (well-formed, other version) from 400.
_REQUEST_LINE_RE = re.compile(f"({TOKEN}) ({TARGET}) HTTP/([0-9])\\.([0-9])")
_FIELD_LINE_RE = re.compile(FIELD_LINE)
# A block of complete field lines (a head's or a trailer section's), validated at once.
FIELD_LINES_RE = re.compile(f"(?:{FIELD_LINE})*+")
# Partial field line (no CRLF in it yet): a CTL other than HTAB, or a CR that is not last.
_FIELD_PREFIX_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x0c\x0e-\x1f\x7f]|\r(?=[\x00-\xff])")
# Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2-3.2.3): an IP-literal in
# brackets (group 1, checked by host_named) or a reg-name of unreserved / sub-delims /
# pct-encoded (group 2, may be empty), then an optional port of digits (may be empty).
_REG_NAME = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=]++|%[0-9A-Fa-f]{2})*+"
_HOST_RE = re.compile(f"(?:\\[([^\\]]*+)\\]|({_REG_NAME}))(?::[0-9]*+)?")
_IPVFUTURE_RE = re.compile(r"[vV][0-9A-Fa-f]++\.[A-Za-z0-9\-._~!$&'()*+,;=:]++")
# absolute-form: authority (group 1, checked as a Host value), path, query.
_ABSOLUTE_RE = re.compile(r"(?i:https?)://([^/?]*+)(/[^?]*+)?(?:\?(.*+))?")
_CONTENT_TOKEN_RE = re.compile(TOKEN)


def check_request_line(line: str) -> None:
    """Raise the right error for a bad request line (505 for a well-formed other version)."""
    m = _REQUEST_LINE_RE.fullmatch(line)
    if m is None:
        raise BadRequest("invalid request line")
    if m[3] != "1":  # another major version (2, 3, 0.9 spelled out): RFC 9110 6.2, 15.6.6
        raise VersionNotSupported("HTTP version not supported")


def diagnose_head(lines: list[str]) -> None:
    """Called with the head's lines when the fast-path head regex fails; always raises."""
    check_request_line(lines[0])
    diagnose_fields(lines[1:-2])
    raise BadRequest("invalid header section")  # pragma: no cover - regexes agree


def diagnose_fields(lines: list[str]) -> None:
    """Raise a 400 naming the first invalid field line."""
    for line in lines:
        if _FIELD_LINE_RE.fullmatch(line + "\r\n") is None:
            if not line:
                raise BadRequest("empty line in header section")
            if line[0] in " \t":
                raise BadRequest("obsolete line folding or leading whitespace")
            name, sep, _ = line.partition(":")
            if not sep:
                raise BadRequest("header line without colon")
            if name and name[-1] in " \t":
                raise BadRequest("whitespace before colon")
            if _FIELD_LINE_RE.fullmatch(name + ":\r\n") is None:
                raise BadRequest("invalid header name")
            raise BadRequest("invalid character in header value")
    raise BadRequest("invalid header section")


def check_field_lines(buf: bytearray, start: int, checked: int, nfields: int,
                      max_fields: int) -> tuple[int, int]:
    """Check a field section that is still arriving; the new (checked, nfields).

    For a head's field lines and a chunked body's trailer section alike, so that a bad
    line is refused on the read that brings it, not at a timeout. The complete lines from
    `checked` (where the last look stopped) to the last CRLF are validated and counted
    once each against `max_fields` (431 beyond); the partial line after them is checked
    only from `start` on (the bytes not seen before) for a CTL or a bare CR/LF, and for
    obs-fold at its start (400). Each byte is looked at a bounded number of times, so
    input fed one byte at a time stays linear.
    """
    n = len(buf)
    if start < checked:
        start = checked
    last = buf.rfind(b"\r\n", start)
    if last >= 0:
        block = buf[checked : last + 2].decode("latin-1")
        if FIELD_LINES_RE.fullmatch(block) is None:
            diagnose_fields(block.split("\r\n")[:-1])
        nfields += block.count("\r\n")
        if nfields > max_fields:
            raise HeaderFieldsTooLarge("too many fields")
        checked = start = last + 2
    if checked < n and buf[checked] in b" \t":
        raise BadRequest("obsolete line folding or leading whitespace")
    if _FIELD_PREFIX_BAD_RE.search(buf, start) is not None:
        raise BadRequest("control character or bare CR/LF in header section")
    return checked, nfields


def other_target_form(method: str, target: str) -> tuple[str, str]:
    """Path and query of an absolute-form or asterisk-form target (RFC 9112 3.2)."""
    if target == "*":
        if method != "OPTIONS":
            raise BadRequest("asterisk-form only for OPTIONS")
        return "*", ""
    if method == "CONNECT":
        raise NotImplementedFraming("CONNECT not implemented")
    m = _ABSOLUTE_RE.fullmatch(target)
    if m is None:
        raise BadRequest("invalid request-target")
    if not host_named(m[1], "request-target authority"):
        raise BadRequest("absolute-form without a host")  # RFC 9110 4.2.1
    return m[2] or "/", m[3] or ""


def host_named(value: str, what: str) -> bool:
    """Check a Host value (or an absolute-form authority) against `host [ ":" port ]`.

    True if it names a host, False if the host part is empty (`""`, `":80"`: valid syntax,
    meaning "no authority"); raises BadRequest for anything else: userinfo, bad
    percent-encoding, characters outside reg-name, a port that is not digits, or an
    IP-literal that is neither an IPv6 address (no zone id) nor an IPvFuture.
    """
    m = _HOST_RE.fullmatch(value)
    if m is None:
        raise BadRequest("invalid " + what)
    literal = m[1]
    if literal is None:
        return bool(m[2])
    if _IPVFUTURE_RE.fullmatch(literal) is None:
        if "%" in literal:  # RFC 6874 zone ids are not part of RFC 3986's IP-literal
            raise BadRequest("invalid " + what)
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise BadRequest("invalid " + what) from None
    return True


def reject_transfer_encoding(te: str) -> None:
    """Classify a Transfer-Encoding other than exactly `chunked`; always raises.

    - not a token list: 400;
    - the final coding is not `chunked` (`gzip`, `identity`, `xchunked`, `chunked, gzip`):
      the body length cannot be determined, 400 and close (RFC 9112 6.3 item 4, a MUST);
    - `chunked` more than once: 400 (RFC 9112 6.1, a sender must not);
    - `chunked` last after codings we do not implement (`gzip, chunked`): the framing is
      known but the content cannot be decoded, 501 (RFC 9112 6.1, a SHOULD).
    """
    codings = [c.strip(" \t").lower() for c in te.split(",")]
    for coding in codings:
        if _CONTENT_TOKEN_RE.fullmatch(coding) is None:
            raise BadRequest("invalid Transfer-Encoding")
    if codings[-1] != "chunked":
        raise BadRequest("chunked is not the final transfer coding")
    if codings.count("chunked") > 1:
        raise BadRequest("chunked applied more than once")
    raise NotImplementedFraming("unsupported transfer coding")

