"""Differential tests: our parser against h11 and httptools (llhttp) as reference oracles.

Valid requests (handwritten and hypothesis-generated) must parse to the same method, target,
headers and body in all three. Invalid requests must be rejected by all three, except where
an oracle is known to be more lenient than RFC 9112 (or than us, on purpose); every such
exception is listed below with the reason, so the list doubles as documentation.
"""

from __future__ import annotations

import h11
import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtserve.errors import ParseError
from rtserve.parser import NEED_DATA, RequestParser
from tests.test_parser import REJECTIONS

Parsed = tuple[str, str, list[tuple[str, str]], bytes]

# --- the three parsers, normalised to (method, target, [(lower name, value)], body) ----------


def parse_ours(data: bytes) -> Parsed:
    parser = RequestParser()
    parser.feed(data)
    r = parser.next_event()
    assert r is not NEED_DATA, "incomplete"
    return (r.method, r.target, r.raw_headers, r.body)  # type: ignore[union-attr]


def parse_h11(data: bytes) -> Parsed:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request), request
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"h11: unexpected {event!r}")
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers]
    return (request.method.decode(), request.target.decode("latin-1"), headers, body)


class _Collector:
    """httptools callbacks: head fields until headers-complete (trailers are not headers)."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.in_head = True
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            # llhttp strips leading OWS only; trailing OWS is not part of the value either
            # (RFC 9110 5.5), so strip it to compare values, not whitespace handling.
            text = value.decode("latin-1").rstrip(" \t")
            self.headers.append((name.decode("latin-1").lower(), text))

    def on_headers_complete(self) -> None:
        self.in_head = False

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def parse_httptools(data: bytes) -> Parsed:
    proto = _Collector()
    parser = httptools.HttpRequestParser(proto)
    parser.feed_data(data)
    assert proto.done, "httptools: incomplete"
    return (parser.get_method().decode(), proto.url.decode("latin-1"), proto.headers, proto.body)


def rejects_ours(data: bytes) -> bool:
    try:
        parse_ours(data)
    except ParseError:
        return True
    return False


def rejects_h11(data: bytes) -> bool:
    try:
        parse_h11(data)
    except h11.RemoteProtocolError:
        return True
    except AssertionError:  # needs more data or other event: it did not reject
        return False
    return False


def rejects_httptools(data: bytes) -> bool:
    try:
        parse_httptools(data)
    except httptools.HttpParserUpgrade:  # CONNECT / Upgrade: handed over, not rejected
        return False
    except httptools.HttpParserError:
        return True
    except AssertionError:
        return False
    return False


def _fold_te(parsed: Parsed) -> Parsed:
    """h11 lower-cases Transfer-Encoding values; the coding name is case-insensitive."""
    m, t, hs, b = parsed
    return (m, t, [(n, v.lower() if n == "transfer-encoding" else v) for n, v in hs], b)


def assert_all_agree(data: bytes) -> None:
    ours = _fold_te(parse_ours(data))
    assert _fold_te(parse_h11(data)) == ours
    assert _fold_te(parse_httptools(data)) == ours


# --- valid requests: handwritten ----------------------------------------------------------

VALID = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a/b/c?x=1&y=%20z HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\n",
    b"HEAD /index.html HTTP/1.1\r\nHost: h\r\nUser-Agent: curl/8.5.0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"DELETE /r/1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://h/p?q HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Ows:   padded \t \r\nX-Empty:\r\nX-Tab:\tv\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; b=2\r\nCookie: c=3\r\n\r\n",
    b'GET /~user/file.txt;v=1 HTTP/1.1\r\nHost: h\r\nX-Quote: "q" (c)\r\n\r\n',
    b"POST /score HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
    b'Content-Length: 13\r\n\r\n{"amount": 5}',
    b"PUT /f HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n\x00\r\n\xff",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: yes\r\n\r\n",
    b"PATCH /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0)\r\n"
    b"Accept: text/html,application/xhtml+xml;q=0.9\r\nAccept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nDNT: 1\r\nUpgrade-Insecure-Requests: 1\r\n\r\n",
]


@pytest.mark.parametrize("data", VALID, ids=range(len(VALID)))
def test_handwritten_valid_requests_agree(data: bytes) -> None:
    assert_all_agree(data)


# --- valid requests: generated ------------------------------------------------------------

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_PCHAR = _UNRESERVED + "!$&'()*+,;=:@"
_TCHAR = "!#$%&'*+-.^_`|~" + _UNRESERVED.replace("~", "")
_VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))

pct = st.tuples(st.sampled_from("0123456789ABCDEFabcdef"), st.sampled_from("0123456789ABCDEF")).map(
    lambda t: "%" + t[0] + t[1]
)
segment = st.lists(st.one_of(st.sampled_from(_PCHAR), pct), max_size=12).map("".join)
path = st.lists(segment, min_size=1, max_size=5).map(lambda s: "/" + "/".join(s))
query = st.lists(st.one_of(st.sampled_from(_PCHAR + "/?"), pct), max_size=20).map("".join)
target = st.tuples(path, st.none() | query).map(
    lambda t: t[0] + ("?" + t[1] if t[1] is not None else "")
)
# llhttp knows a fixed method list; CONNECT is an upgrade to it and a 501 to us.
method = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
# Names: tokens prefixed "x-" so that no generated field changes framing or connection state.
field_name = st.text(st.sampled_from(_TCHAR), min_size=1, max_size=20).map(lambda n: "X-" + n)
# Values: visible ASCII words joined by single spaces (edge whitespace is tested by hand above).
field_value = st.lists(st.text(st.sampled_from(_VCHAR), min_size=1, max_size=15), max_size=4).map(
    " ".join
)
fields = st.lists(st.tuples(field_name, field_value), max_size=12)
body = st.binary(max_size=300)
chunks = st.lists(st.binary(min_size=1, max_size=80), max_size=5)


def build(m: str, t: str, fs: list[tuple[str, str]], framing: str, payload: list[bytes]) -> bytes:
    """Serialise a request; framing is 'none', 'cl' or 'chunked'."""
    head = f"{m} {t} HTTP/1.1\r\nHost: example.com\r\n"
    head += "".join(f"{n}: {v}\r\n" for n, v in fs)
    data = b"".join(payload)
    if framing == "cl":
        return (head + f"Content-Length: {len(data)}\r\n\r\n").encode("latin-1") + data
    if framing == "chunked":
        out = (head + "Transfer-Encoding: chunked\r\n\r\n").encode("latin-1")
        for c in payload:
            out += b"%x\r\n" % len(c) + c + b"\r\n"
        return out + b"0\r\n\r\n"
    return (head + "\r\n").encode("latin-1")


request_bytes = st.one_of(
    st.builds(build, method, target, fields, st.just("none"), st.just([])),
    st.builds(build, method, target, fields, st.just("cl"), body.map(lambda b: [b])),
    st.builds(build, method, target, fields, st.just("chunked"), chunks),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_bytes)
def test_generated_valid_requests_agree(data: bytes) -> None:
    assert_all_agree(data)


@settings(max_examples=100, deadline=None)
@given(request_bytes, st.integers(min_value=1))
def test_generated_requests_split_anywhere_agree(data: bytes, cut: int) -> None:
    """Same result from two pieces as from one, at any cut point."""
    cut = cut % len(data)
    parser = RequestParser()
    parser.feed(data[:cut])
    first = parser.next_event()
    if first is NEED_DATA:
        parser.feed(data[cut:])
        first = parser.next_event()
    assert first is not NEED_DATA
    assert (first.method, first.target, first.raw_headers, first.body) == parse_h11(data)


# --- invalid requests: everyone rejects, except documented leniencies ----------------------

# h11 0.16 is lenient here (each verified against h11 0.16.0):
H11_LENIENT = {
    # h11 accepts bare LF as a line terminator (_receivebuffer.py blank_line_regex b"\n\r?\n").
    **dict.fromkeys(
        ["bare_lf_everywhere", "bare_lf_final", "bare_lf_in_header", "bare_lf_request_line"],
        "bare LF accepted as line end",
    ),
    "trailer_bare_lf": "bare LF accepted as line end",
    # h11 unfolds obs-fold continuation lines instead of rejecting them.
    **dict.fromkeys(
        ["obs_fold", "obs_fold_tab", "te_obs_fold", "trailer_obs_fold"], "obs-fold unfolded"
    ),
    # h11 field values are [^\x00\s]-ish: other CTLs (SOH, ESC, DEL) pass.
    **dict.fromkeys(["value_del", "value_esc", "value_soh"], "CTLs other than NUL accepted"),
    # h11 does not look inside chunk extensions, nor limit their length or the hex digits.
    **dict.fromkeys(
        [
            "chunk_ext_bad_name",
            "chunk_ext_bare_cr",
            "chunk_ext_bws_after_value",
            "chunk_ext_no_name",
            "chunk_ext_nul",
            "chunk_ext_too_long_line",
            "chunk_ext_total_too_long",
            "chunk_ext_unterminated_quote",
            "chunk_trailing_space",
            "chunk_trailing_tab",
            "chunk_17_hex_digits",
        ],
        "chunk-size line: extensions and trailing whitespace ignored",
    ),
    # h11: with both, Transfer-Encoding wins (RFC 9112 6.1 allows it; we reject, as gunicorn).
    **dict.fromkeys(["cl_plus_te", "te_plus_cl"], "CL+TE: TE wins"),
    # h11 merges identical Content-Length values and accepts the list form `5, 5`.
    **dict.fromkeys(["cl_duplicate_same", "cl_list"], "identical CL values merged"),
    "cl_19_digits": "accepts up to 20 digits (we cap at 18: no overflow anywhere downstream)",
    "te_http10": "Transfer-Encoding on HTTP/1.0 accepted",
    # Trailer fields are not checked against the forbidden list.
    **dict.fromkeys(
        ["trailer_content_length", "trailer_host", "trailer_transfer_encoding"],
        "framing fields in trailers accepted",
    ),
    # Request line and target: h11 takes any non-whitespace target and any d.d version.
    **dict.fromkeys(
        [
            "absolute_form_empty_authority",
            "absolute_form_other_scheme",
            "absolute_form_userinfo",
            "asterisk_with_get",
            "authority_form_with_get",
            "target_fragment",
            "target_relative",
        ],
        "request-target form not checked",
    ),
    **dict.fromkeys(
        ["h2_preface", "version_0_9_explicit", "version_2_0", "version_3_0"],
        "any HTTP/d.d version accepted",
    ),
    **dict.fromkeys(["connect", "connect_origin_form"], "CONNECT is the caller's business"),
    **dict.fromkeys(
        ["host_with_slash", "host_with_space", "host_with_userinfo", "host_ipv6_zone_id"],
        "Host value not validated",
    ),
    "host_empty": "an empty Host is valid syntax; RFC 9110 4.2.1's empty-host rule not applied",
    "expect_unknown": "unknown expectations are the caller's business",
}

# httptools 0.9 (llhttp 9) is lenient here (each verified against httptools 0.9.0):
HTTPTOOLS_LENIENT = {
    **dict.fromkeys(
        [
            "absolute_form_empty_authority",
            "absolute_form_other_scheme",
            "absolute_form_userinfo",
            "asterisk_with_get",
            "target_fragment",
        ],
        "URL parser accepts any scheme, userinfo, fragments, `*` for any method",
    ),
    "chunk_17_hex_digits": "accepts chunk sizes until the 64-bit value overflows",
    "cl_19_digits": "accepts Content-Length until the 64-bit value overflows",
    "cl_25_digits": "leading zeros are not counted (value is 0)",
    **dict.fromkeys(
        ["chunk_ext_no_name", "chunk_ext_too_long_line", "chunk_ext_total_too_long"],
        "chunk extension syntax and length not fully checked",
    ),
    **dict.fromkeys(["connect", "connect_origin_form"], "CONNECT raises HttpParserUpgrade"),
    **dict.fromkeys(
        ["double_space", "double_space_before_version"], "extra spaces in the request line"
    ),
    "version_missing_http09": "HTTP/0.9 request line accepted",
    **dict.fromkeys(["version_0_9_explicit", "version_2_0"], "HTTP/0.9 and 2.0 accepted"),
    **dict.fromkeys(
        [
            "host_duplicate",
            "host_duplicate_http10",
            "host_missing",
            "host_missing_other_headers",
            "host_with_slash",
            "host_with_space",
            "host_with_userinfo",
            "host_empty",
            "host_ipv6_zone_id",
        ],
        "Host is not checked at all (missing, duplicate or malformed)",
    ),
    "te_gzip_chunked": "non-final chunked: reads the body until close, never an error",
    "te_http10": "Transfer-Encoding on HTTP/1.0 accepted",
    "trailer_host": "Host in trailers accepted",
    "expect_unknown": "unknown expectations are the caller's business",
}


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_invalid_requests_are_rejected_by_every_strict_oracle(name: str) -> None:
    data, _status = REJECTIONS[name]
    assert rejects_ours(data)
    if name not in H11_LENIENT:
        assert rejects_h11(data), "h11 accepted it: add to H11_LENIENT with a reason?"
    if name not in HTTPTOOLS_LENIENT:
        assert rejects_httptools(data), "httptools accepted it: add a reason?"


@pytest.mark.parametrize("name", sorted(set(H11_LENIENT) | set(HTTPTOOLS_LENIENT)))
def test_documented_leniencies_are_real(name: str) -> None:
    """Each skip above must still be needed: if an oracle tightens up, the skip goes."""
    data, _status = REJECTIONS[name]
    if name in H11_LENIENT:
        assert not rejects_h11(data), f"h11 now rejects {name}: drop it from H11_LENIENT"
    if name in HTTPTOOLS_LENIENT:
        assert not rejects_httptools(data), f"httptools now rejects {name}: drop the skip"


# --- where we accept what an oracle refuses, on purpose ------------------------------------

# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ). Senders must not
# generate BWS, recipients must parse it; h11 and llhttp refuse it before the first `;`.
BWS_CHUNK = (
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5 ;a=b\r\nhello\r\n0\r\n\r\n"
)


def test_chunk_extension_bws_is_accepted_where_the_oracles_refuse_it() -> None:
    """Keeps the exception in test_parser_fuzz's h11 property honest: drop it when h11 agrees."""
    assert parse_ours(BWS_CHUNK)[3] == b"hello"
    assert rejects_h11(BWS_CHUNK)
    assert rejects_httptools(BWS_CHUNK)
