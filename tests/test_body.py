"""Unit tests of body.py: Content-Length bodies counted out, chunked framing decoded.

Two levels. `BodyReader` on its own, on a bytearray standing for a parser's receive
buffer: what it consumes, what it leaves for the next request, and that one reader serves
one body after another with each body's own limits. Then the body rules through
`RequestParser` (a body only ever reaches the reader behind a head): every chunked
rejection with its status, whole and byte by byte, the body and trailer limits at
limit-1, limit and limit+1, and linear time.
"""

from __future__ import annotations

import pytest

from rtserve.body import BodyReader, take_length
from rtserve.errors import ParseError
from rtserve.parser import NEED_DATA, RequestParser
from rtserve.request import Request
from tests.parsing import TE, best_time, error_status, parse_all, parse_bytewise, req

NEXT = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"  # a pipelined request after the body
# A chunked body with extensions (one quoted) and trailers; test_parser.py pipelines it
# and splits it at every point with other requests.
CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n"
    b"1;name=value;flag\r\n \r\n"
    b'0000A;q="quoted \\" str";x=y\r\n0123456789\r\n'
    b"0\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
)


def reader(buf: bytearray, max_body_size: int = 1 << 20, max_fields: int = 100) -> BodyReader:
    return BodyReader(buf, max_body_size, max_fields)


# --- BodyReader: Content-Length -------------------------------------------------------------


def test_length_body_in_the_buffer_is_taken_at_once() -> None:
    buf = bytearray(b"hello")
    assert take_length(buf, 5) == b"hello"
    assert buf == b""


def test_length_body_leaves_the_next_request_in_the_buffer() -> None:
    buf = bytearray(b"hello" + NEXT)
    assert take_length(buf, 5) == b"hello"
    assert buf == NEXT


def test_length_body_in_pieces_is_read_on_and_nothing_is_consumed_before() -> None:
    buf = bytearray(b"he")
    assert take_length(buf, 5) is None
    r = reader(buf)
    r.length(5)
    assert buf == b"he"  # the bytes stay in the parser's buffer until the body is whole
    buf += b"ll"
    assert r.read() is None
    buf += b"o" + NEXT
    assert r.read() == b"hello"
    assert buf == NEXT


# --- BodyReader: chunked ----------------------------------------------------------------------


def test_chunked_body_is_decoded_and_its_trailers_consumed() -> None:
    buf = bytearray(b"5\r\nhello\r\n3;ext=1\r\n123\r\n0\r\nX-T: t\r\n\r\n" + NEXT)
    assert reader(buf).chunked(1000) == b"hello123"
    assert buf == NEXT


def test_chunked_body_at_every_split_point_gives_the_same_body() -> None:
    data = b"5\r\nhello\r\n1;a=b\r\n \r\nA\r\n0123456789\r\n0\r\nX: 1\r\nY: 2\r\n\r\n" + NEXT
    for cut in range(len(data) + 1):
        buf = bytearray(data[:cut])
        r = reader(buf)
        first = r.chunked(1000)
        buf += data[cut:]
        body = first if first is not None else r.read()
        assert body == b"hello 0123456789", cut
        assert buf == NEXT, cut


def test_one_reader_reads_body_after_body_each_with_its_own_limits() -> None:
    """The per-body counters start again: the body size, the extension bytes, the
    trailer fields (the limits are per request, not per connection)."""
    buf = bytearray()
    r = reader(buf, max_body_size=100, max_fields=2)
    ext = b";e=" + b"x" * 3000  # 3003 bytes of extension per line, 16384 per request
    one_body = b"".join(b"a" + ext + b"\r\n" + b"y" * 10 + b"\r\n" for _ in range(5))
    for _ in range(3):  # each time 50 body bytes, 15015 extension bytes, 2 trailer fields
        buf += one_body + b"0\r\nT: 1\r\nU: 2\r\n\r\n"
        assert r.chunked(1000) == b"y" * 50
        assert buf == b""
    buf += b"ab"
    r.length(3)  # a Content-Length body after chunked ones
    buf += b"c"
    assert r.read() == b"abc"
    buf += b"2\r\nhi\r\n0\r\n\r\n"
    assert r.chunked(1000) == b"hi"  # and chunked again after one


@pytest.mark.parametrize(
    ("data", "limits", "status"),
    [
        (b"65\r\n", {"max_body_size": 100}, 413),  # announced past the limit: no data yet
        (b"0\r\nContent-Length: 5\r\n\r\n", {}, 400),  # a forbidden trailer field
        (b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", {"max_fields": 2}, 431),
        (b"1\r\nab", {}, 400),  # data longer than its size line said
        (b"1\n", {}, 400),  # a bare LF ends the size line
    ],
)
def test_chunked_errors_carry_their_status(data: bytes, limits: dict, status: int) -> None:
    with pytest.raises(ParseError) as info:
        reader(bytearray(data), **limits).chunked(1000)
    assert info.value.status == status


@pytest.mark.parametrize(("size", "status"), [(19, None), (20, None), (21, 431)])
def test_the_trailer_section_has_the_budget_it_is_given(size: int, status: int | None) -> None:
    """`trailer_budget` bytes for the section, its final CRLF included, as the head left
    them of the header-block limit (whole, then arriving one byte at a time)."""
    trailers = b"T: " + b"t" * (size - 7) + b"\r\n\r\n"
    assert len(trailers) == size
    for pieces in ([trailers], [trailers[i : i + 1] for i in range(size)]):
        buf = bytearray(b"0\r\n")
        r = reader(buf)
        try:
            body = r.chunked(20)
            for piece in pieces:
                buf += piece
                body = r.read()
        except ParseError as exc:
            assert exc.status == status
        else:
            assert status is None and body == b""


# --- through the parser: valid bodies -----------------------------------------------------------


def test_content_length_body() -> None:
    (r,) = parse_all(b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
    assert (r.content_length, r.body, r.chunked) == (5, b"hello", False)


def test_chunked_body_with_extensions_and_trailers() -> None:
    (r,) = parse_all(CHUNKED)
    assert (r.chunked, r.content_length, r.body) == (True, None, b"hello 0123456789")
    # trailers are validated and discarded, not merged into the headers
    assert r.raw_headers == [("host", "h"), ("transfer-encoding", "chunked")]


def test_chunk_size_uppercase_and_lowercase_hex() -> None:
    body = b"a\r\n" + b"x" * 10 + b"\r\nA\r\n" + b"y" * 10 + b"\r\n0\r\n\r\n"
    (r,) = parse_all(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert r.body == b"x" * 10 + b"y" * 10


@pytest.mark.parametrize(
    "line",
    [b"5 ;a=b", b"5\t;a=b", b"5; a=b", b"5;a =b", b"5;a= b", b"5 ; a = b", b'5 ; q = "x y"'],
)
def test_chunk_extension_bws_is_accepted(line: bytes) -> None:
    """RFC 9112 7.1.1: BWS around `;` and `=`; the extension is ignored."""
    data = req(TE, line + b"\r\nhello\r\n0\r\n\r\n")
    (r,) = parse_all(data)
    assert r.body == b"hello"
    (r,) = parse_bytewise(data)
    assert r.body == b"hello"


def test_pending_for_chunked_and_cleared_when_complete() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    assert parser.next_event() is NEED_DATA
    assert parser.pending is not None and parser.pending.chunked
    parser.feed(b"c\r\n0\r\n\r\n")
    r = parser.next_event()
    assert isinstance(r, Request) and r.body == b"abc" and parser.pending is None


def test_bodies_on_one_connection_each_get_their_own_bytes() -> None:
    """Keep-alive POSTs, the head cached from the second on, body and next head in one
    read or split: each request has its own body, and a GET between them none."""
    post = b"POST /s HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n"
    stream = b"".join(post + b"b%03d" % i for i in range(4)) + NEXT + post + b"last"
    stream += req(TE, b"2\r\nch\r\n0\r\n\r\n") + post + b"done"
    want = [b"b000", b"b001", b"b002", b"b003", b"", b"last", b"ch", b"done"]
    assert [r.body for r in parse_all(stream)] == want
    assert [r.body for r in parse_bytewise(stream)] == want


# --- through the parser: rejections ------------------------------------------------------------

# Also part of test_parser.REJECTIONS, the corpus the differential tests and the fuzzer use.
REJECTIONS: dict[str, tuple[bytes, int]] = {
    # chunk-size lines
    "chunk_0x": (req(TE, b"0x1\r\na\r\n0\r\n\r\n"), 400),
    "chunk_plus": (req(TE, b"+1\r\na\r\n0\r\n\r\n"), 400),
    "chunk_minus": (req(TE, b"-1\r\na\r\n0\r\n\r\n"), 400),
    "chunk_underscore": (req(TE, b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"), 400),
    "chunk_leading_space": (req(TE, b" 1\r\na\r\n0\r\n\r\n"), 400),
    "chunk_trailing_space": (req(TE, b"1 \r\na\r\n0\r\n\r\n"), 400),
    "chunk_trailing_tab": (req(TE, b"1\t\r\na\r\n0\r\n\r\n"), 400),
    "chunk_17_hex_digits": (req(TE, b"0" * 16 + b"1\r\na\r\n0\r\n\r\n"), 400),
    "chunk_empty_size": (req(TE, b"\r\n\r\n"), 400),
    "chunk_not_hex": (req(TE, b"g\r\na\r\n0\r\n\r\n"), 400),
    "chunk_bare_lf_size": (req(TE, b"1\na\r\n0\r\n\r\n"), 400),
    "chunk_bare_cr_size": (req(TE, b"1\ra\r\n0\r\n\r\n"), 400),
    "chunk_ext_bare_lf": (req(TE, b"1;a=b\nc\r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_bare_cr": (req(TE, b"1;a=b\rc\r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_unterminated_quote": (req(TE, b'1;a="b\r\nx\r\n0\r\n\r\n'), 400),
    "chunk_ext_no_name": (req(TE, b"1;=b\r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_bad_name": (req(TE, b"1;a b\r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_nul": (req(TE, b"1;a=\x00\r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_bws_after_value": (req(TE, b"1;a=b \r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_too_long_line": (req(TE, b"1;a=" + b"b" * 5000 + b"\r\nx\r\n0\r\n\r\n"), 400),
    "chunk_ext_total_too_long": (
        req(TE, b"".join(b"1;a=" + b"b" * 4000 + b"\r\nx\r\n" for _ in range(5)) + b"0\r\n\r\n"),
        400,
    ),
    "chunk_data_no_crlf": (req(TE, b"1\r\naX\r\n0\r\n\r\n"), 400),
    "chunk_data_longer": (req(TE, b"1\r\nabc\r\n0\r\n\r\n"), 400),
    "chunk_data_bare_lf": (req(TE, b"1\r\na\n0\r\n\r\n"), 400),
    "chunk_data_bare_cr": (req(TE, b"1\r\na\r0\r\n\r\n"), 400),
    "chunk_last_no_final_crlf_garbage": (req(TE, b"0\r\nX\r\n\r\n"), 400),
    # trailer section
    "trailer_content_length": (req(TE, b"0\r\nContent-Length: 5\r\n\r\n"), 400),
    "trailer_transfer_encoding": (req(TE, b"0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400),
    "trailer_host": (req(TE, b"0\r\nHost: evil\r\n\r\n"), 400),
    "trailer_obs_fold": (req(TE, b"0\r\nX: a\r\n b\r\n\r\n"), 400),
    "trailer_space_before_colon": (req(TE, b"0\r\nX : a\r\n\r\n"), 400),
    "trailer_bare_lf": (req(TE, b"0\r\nX: a\nY: b\r\n\r\n"), 400),
    "trailer_nul": (req(TE, b"0\r\nX: a\x00\r\n\r\n"), 400),
}


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejection_status(name: str) -> None:
    data, status = REJECTIONS[name]
    assert error_status(data) == status


@pytest.mark.parametrize("name", sorted(REJECTIONS))
def test_rejection_status_is_the_same_byte_by_byte(name: str) -> None:
    data, status = REJECTIONS[name]
    assert error_status(data, bytewise=True) == status


# --- through the parser: limits at limit-1, limit and limit+1 -----------------------------------


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("delta", "status"), [(-1, None), (0, None), (1, 413)])
def test_chunked_body_limit(delta: int, status: int | None, bytewise: bool) -> None:
    limit = 100
    size = limit + delta
    body = b"32\r\n" + b"a" * 50 + b"\r\n" + b"%x\r\n" % (size - 50) + b"b" * (size - 50)
    data = req(TE, body + b"\r\n0\r\n\r\n")
    assert error_status(data, bytewise=bytewise, max_body_size=limit) == status


def test_chunked_413_is_raised_when_the_size_line_crosses_the_limit() -> None:
    parser = RequestParser(max_body_size=100)
    parser.feed(req(TE, b"64\r\n" + b"a" * 100 + b"\r\n1\r\n"))
    with pytest.raises(ParseError) as info:
        parser.next_event()  # the 101st byte is announced, not yet sent
    assert info.value.status == 413


@pytest.mark.parametrize(("delta", "status"), [(-1, None), (0, None), (1, 431)])
def test_trailers_share_the_header_block_limit(delta: int, status: int | None) -> None:
    limit = 512
    head = req(TE)
    base = b"0\r\nT: \r\n\r\n"
    trailer_size = limit - len(head) + delta
    body = base[:-4] + b"t" * (trailer_size - len(base) + 3) + b"\r\n\r\n"
    assert len(head) + len(body) - 3 == limit + delta  # "0\r\n" is not trailer
    assert error_status(head + body, max_header_block=limit) == status
    assert error_status(head + body, bytewise=True, max_header_block=limit) == status


def test_trailer_fields_do_not_count_against_the_next_head() -> None:
    """Regression (found by fuzz/fuzz_parser.py): the trailer scan's field counter leaked
    into the next pipelined head, which then got a 431 with fewer fields than the limit."""
    first = req(TE, b"0\r\nX: t\r\nY: u\r\n\r\n")
    fields = b"Host: h\r\n" + b"".join(b"F%d: v\r\n" % i for i in range(9))
    second = b"GET / HTTP/1.1\r\n" + fields + b"\r\n"
    assert len(parse_all(first + second, max_header_count=10)) == 2
    assert len(parse_bytewise(first + second, max_header_count=10)) == 2


def test_trailer_count_limit() -> None:
    trailers = b"".join(b"T%d: v\r\n" % i for i in range(11))
    data = req(TE, b"0\r\n" + trailers + b"\r\n")
    assert error_status(data, max_header_count=10) == 431
    assert error_status(data, max_header_count=11) is None


# --- linear time --------------------------------------------------------------------------------


def test_byte_by_byte_chunked_body_is_linear() -> None:
    def run(n: int) -> None:
        data = req(TE, b"%x\r\n" % n + b"x" * n + b"\r\n0\r\n\r\n")
        assert len(parse_bytewise(data)) == 1

    small = best_time(lambda: run(16000))  # big enough that timer noise is small
    large = best_time(lambda: run(128000))
    assert large / small < 25, (small, large)  # 8x the input: linear ~8-10x, quadratic ~64x
