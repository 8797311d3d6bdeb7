"""Unit tests of the strict request parser: every rule, limit, state and error status.

The body rules (chunked framing, trailers, their limits) are in test_body.py.

Each rejection is also re-run feeding one byte at a time, which must give the same status:
the incremental (slow) path and the whole-head (fast) path must agree.
"""

from __future__ import annotations

import pytest

from rtserve.errors import ParseError
from rtserve.parser import NEED_DATA, RequestParser
from rtserve.request import Request
from tests.parsing import TE, best_time, error_status, parse_all, parse_bytewise, req
from tests.test_body import CHUNKED
from tests.test_body import REJECTIONS as BODY_REJECTIONS

GET = b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"


def summary(r: Request) -> tuple:
    return (
        r.method,
        r.target,
        r.path,
        r.query_string,
        r.version,
        r.raw_headers,
        r.content_length,
        r.chunked,
        r.keep_alive,
        r.expect_continue,
        r.body,
    )


# --- valid requests ------------------------------------------------------------------------


def test_simple_get_fields() -> None:
    (r,) = parse_all(GET)
    assert summary(r) == (
        "GET",
        "/a/b?x=1&y=2",
        "/a/b",
        "x=1&y=2",
        "HTTP/1.1",
        [("host", "example.com"), ("user-agent", "t")],
        None,
        False,
        True,
        False,
        b"",
    )


def test_header_names_lowered_values_ows_stripped_case_kept() -> None:
    data = (
        b"GET / HTTP/1.1\r\nHOST: h\r\nX-Thing:\t  Mixed Case \t \r\nX-Empty:\r\n"
        b"X-Inner: a  b\r\nX-Obs: caf\xe9\r\n\r\n"
    )
    (r,) = parse_all(data)
    assert r.raw_headers == [
        ("host", "h"),
        ("x-thing", "Mixed Case"),
        ("x-empty", ""),
        ("x-inner", "a  b"),
        ("x-obs", "caf\xe9"),
    ]


def test_only_sp_and_htab_are_stripped_not_other_whitespace() -> None:
    # \xa0 / \x85 are obs-text, kept verbatim: normalising them hid smuggling (gunicorn #3364)
    (r,) = parse_all(b"GET / HTTP/1.1\r\nHost: h\r\nX: \xa0v\x85\r\n\r\n")
    assert r.raw_headers[1] == ("x", "\xa0v\x85")


def test_duplicate_ordinary_headers_are_kept_in_order() -> None:
    (r,) = parse_all(b"GET / HTTP/1.1\r\nHost: h\r\nAccept: a\r\nAccept: b\r\n\r\n")
    assert r.raw_headers == [("host", "h"), ("accept", "a"), ("accept", "b")]
    assert r.headers["accept"] == "a, b"


def test_query_without_path_params_and_empty_query() -> None:
    (r,) = parse_all(b"GET /p? HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.path, r.query_string) == ("/p", "")
    (r,) = parse_all(b"GET /p?a?b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.path, r.query_string) == ("/p", "a?b")


def test_http10_without_host_and_keep_alive_rules() -> None:
    (r,) = parse_all(b"GET / HTTP/1.0\r\n\r\n")
    assert (r.version, r.keep_alive) == ("HTTP/1.0", False)
    (r,) = parse_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert r.keep_alive is True
    (r,) = parse_all(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
    assert r.keep_alive is False


@pytest.mark.parametrize(
    ("connection", "keep_alive"),
    [
        (None, True),
        (b"keep-alive", True),
        (b"close", False),
        (b"Close", False),
        (b"Upgrade, close", False),
        (b"upgrade ,  CLOSE ", False),
        (b"closed", True),  # a different token, not `close`
        (b"keep-alive, Upgrade", True),
    ],
)
def test_http11_connection_close_token(connection: bytes | None, keep_alive: bool) -> None:
    extra = b"Connection: " + connection + b"\r\n" if connection is not None else b""
    (r,) = parse_all(b"GET / HTTP/1.1\r\nHost: h\r\n" + extra + b"\r\n")
    assert r.keep_alive is keep_alive


def test_repeated_connection_fields_are_merged() -> None:
    data = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nConnection: close\r\n\r\n"
    (r,) = parse_all(data)
    assert r.keep_alive is False


def test_content_length_zero_and_leading_zeros() -> None:
    (r,) = parse_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert (r.content_length, r.body) == (0, b"")
    (r,) = parse_all(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 003\r\n\r\nabc")
    assert (r.content_length, r.body) == (3, b"abc")


def test_content_length_18_digits_is_accepted_then_413() -> None:
    # 18 digits is valid syntax (no int overflow concerns) but far above the body limit
    data = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 18 + b"\r\n\r\n"
    assert error_status(data) == 413


@pytest.mark.parametrize("te", [b"chunked", b"Chunked", b"CHUNKED", b"  chunked  "])
def test_chunked_is_case_insensitive_and_ows_stripped(te: bytes) -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " + te + b"\r\n\r\n0\r\n\r\n"
    (r,) = parse_all(data)
    assert (r.chunked, r.body) == (True, b"")


def test_absolute_form_takes_path_and_ignores_host_mismatch() -> None:
    data = b"GET http://other.example:8080/p/q?z=9 HTTP/1.1\r\nHost: h\r\n\r\n"
    (r,) = parse_all(data)
    assert r.target == "http://other.example:8080/p/q?z=9"
    assert (r.path, r.query_string) == ("/p/q", "z=9")
    (r,) = parse_all(b"GET HTTPS://h HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.path, r.query_string) == ("/", "")
    (r,) = parse_all(b"GET http://h?q HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.path, r.query_string) == ("/", "q")


def test_asterisk_form_for_options() -> None:
    (r,) = parse_all(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.method, r.target, r.path, r.query_string) == ("OPTIONS", "*", "*", "")


@pytest.mark.parametrize("method", [b"get", b"M-SEARCH", b"PROPFIND", b"X!#$%&'*+.^_`|~1"])
def test_any_token_method_is_accepted(method: bytes) -> None:
    (r,) = parse_all(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.method == method.decode()


@pytest.mark.parametrize("host", [b"h", b"h:80", b"h:", b"[::1]:8080", b"xn--bcher-kva.example"])
def test_valid_host_values(host: bytes) -> None:
    (r,) = parse_all(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert r.raw_headers == [("host", host.decode())]


def test_valid_host_is_cached_and_an_empty_one_never_is() -> None:
    """The Host cache skips the check for values seen before; "" depends on the target."""
    (r,) = parse_all(b"GET http://h/ HTTP/1.1\r\nHost: \r\n\r\n")  # absolute-form: fine
    assert r.raw_headers == [("host", "")]
    assert error_status(b"GET / HTTP/1.1\r\nHost: \r\n\r\n") == 400  # not cached above
    assert error_status(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n") == 400


def test_path_is_decoded_target_and_raw_path_are_not() -> None:
    (r,) = parse_all(b"GET /a%20b/%7E%2F?q=%2F|{} HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.target == "/a%20b/%7E%2F?q=%2F|{}"
    assert (r.path, r.raw_path, r.query_string) == ("/a b/~/", "/a%20b/%7E%2F", "q=%2F|{}")


def test_path_without_percent_is_the_raw_path_object() -> None:
    """No `%`: nothing decoded, and `path is raw_path` (what the App's check relies on)."""
    (r,) = parse_all(b"GET /plain/path?x=%41 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.path == "/plain/path" and r.path is r.raw_path


def test_path_decodes_utf8_and_replaces_invalid_sequences() -> None:
    (r,) = parse_all(b"GET /caf%C3%A9/%FF%2 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.path, r.raw_path) == ("/caf\u00e9/\ufffd%2", "/caf%C3%A9/%FF%2")


def test_absolute_form_path_is_decoded_too() -> None:
    (r,) = parse_all(b"GET http://h/%65cho HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (r.path, r.raw_path) == ("/echo", "/%65cho")


@pytest.mark.parametrize("version", [b"1.2", b"1.9"])
def test_higher_minor_version_is_read_as_1_1(version: bytes) -> None:
    """RFC 9110 6.2: processed as 1.1, including its defaults (keep-alive, Host)."""
    (r,) = parse_all(b"GET / HTTP/" + version + b"\r\nHost: h\r\n\r\n")
    assert (r.version, r.keep_alive) == ("HTTP/1.1", True)
    assert error_status(b"GET / HTTP/" + version + b"\r\n\r\n") == 400  # Host required


# --- leading empty lines ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_up_to_two_leading_crlfs_are_ignored(n: int) -> None:
    assert len(parse_all(b"\r\n" * n + GET)) == 1
    assert len(parse_bytewise(b"\r\n" * n + GET)) == 1


def test_crlfs_between_pipelined_requests_are_ignored() -> None:
    assert len(parse_all(GET + b"\r\n" + GET + b"\r\n\r\n" + GET)) == 3


@pytest.mark.parametrize("bytewise", [False, True])
def test_more_than_two_leading_crlfs_are_rejected(bytewise: bool) -> None:
    assert error_status(b"\r\n" * 3 + GET, bytewise=bytewise) == 400


def test_bare_cr_before_request_line_is_rejected() -> None:
    assert error_status(b"\rGET / HTTP/1.1\r\nHost: h\r\n\r\n") == 400
    assert error_status(b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n") == 400


# --- pipelining and incremental feeding ---------------------------------------------------


def test_pipelined_requests_are_returned_one_per_call() -> None:
    post = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    parser = RequestParser()
    parser.feed(GET + post + CHUNKED + GET)
    total = len(GET + post + CHUNKED + GET)
    first = parser.next_event()
    assert isinstance(first, Request) and first.method == "GET"
    assert parser.buffered == total - len(GET)  # nothing past the first request consumed
    second = parser.next_event()
    assert isinstance(second, Request) and second.body == b"abc"
    assert parser.buffered == len(CHUNKED + GET)
    third = parser.next_event()
    assert isinstance(third, Request) and third.body == b"hello 0123456789"
    assert parser.buffered == len(GET)
    fourth = parser.next_event()
    assert isinstance(fourth, Request) and fourth.target == "/a/b?x=1&y=2"
    assert parser.next_event() is NEED_DATA
    assert parser.buffered == 0


STREAMS = {
    "get": GET,
    "post": b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world",
    "chunked": CHUNKED,
    "pipelined": GET + CHUNKED + b"\r\n" + GET,
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "leading_crlf": b"\r\n\r\n" + GET,
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_split_point_gives_the_same_requests(name: str) -> None:
    data = STREAMS[name]
    expected = [summary(r) for r in parse_all(data)]
    assert expected
    for cut in range(1, len(data)):
        parser = RequestParser()
        got = []
        for piece in (data[:cut], data[cut:]):
            parser.feed(piece)
            while (event := parser.next_event()) is not NEED_DATA:
                got.append(summary(event))
        assert got == expected, cut


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_one_byte_at_a_time_gives_the_same_requests(name: str) -> None:
    data = STREAMS[name]
    assert [summary(r) for r in parse_bytewise(data)] == [summary(r) for r in parse_all(data)]


# --- pending, expect-continue, has_partial, buffered ---------------------------------------


def test_pending_is_set_between_head_and_body() -> None:
    parser = RequestParser()
    assert parser.pending is None and not parser.has_partial()
    head = b"POST /u HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 4\r\n\r\n"
    parser.feed(head)
    assert parser.next_event() is NEED_DATA
    pending = parser.pending
    assert isinstance(pending, Request)
    assert (pending.expect_continue, pending.content_length, pending.path) == (True, 4, "/u")
    assert parser.has_partial()
    parser.feed(b"ab")
    assert parser.next_event() is NEED_DATA
    assert parser.pending is pending and parser.buffered == 2
    parser.feed(b"cd")
    done = parser.next_event()
    assert done is pending and done.body == b"abcd"
    assert parser.pending is None and not parser.has_partial() and parser.buffered == 0


def test_no_pending_for_bodyless_request_and_head_in_progress() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHo")
    assert parser.next_event() is NEED_DATA
    assert parser.pending is None and parser.has_partial() and parser.buffered == 18


def test_expect_continue_only_on_http11() -> None:
    data = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx"
    (r,) = parse_all(data)
    assert r.expect_continue is False
    data = b"POST / HTTP/1.0\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\nx"
    (r,) = parse_all(data)  # Expect on HTTP/1.0 is ignored, never 417
    assert r.body == b"x"


@pytest.mark.parametrize("expect", [b"foo", b"100-continue, foo", b"", b"100-continuex", b"200-ok"])
def test_other_expectations_are_417(expect: bytes) -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: " + expect + b"\r\nContent-Length: 1\r\n\r\nx"
    assert error_status(data) == 417


def test_expect_continue_with_oversize_body_is_413_not_pending() -> None:
    parser = RequestParser(max_body_size=10)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert info.value.status == 413 and parser.pending is None


def test_parser_is_dead_after_an_error() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\nx" + GET)
    with pytest.raises(ParseError) as first:
        parser.next_event()
    assert first.value.status == 400
    assert parser.buffered == 0 and not parser.has_partial()
    parser.feed(GET)
    assert parser.buffered == 0
    with pytest.raises(ParseError) as again:
        parser.next_event()
    assert again.value is first.value


# --- rejections: (raw request, status) -----------------------------------------------------


HEAD_REJECTIONS: dict[str, tuple[bytes, int]] = {
    # framing / smuggling
    "cl_plus_te": (req(b"Content-Length: 3\r\n" + TE, b"0\r\n\r\n"), 400),
    "te_plus_cl": (req(TE + b"Content-Length: 3\r\n", b"0\r\n\r\n"), 400),
    "cl_duplicate_same": (req(b"Content-Length: 1\r\nContent-Length: 1\r\n", b"x"), 400),
    "cl_duplicate_different": (req(b"Content-Length: 1\r\nContent-Length: 5\r\n", b"x"), 400),
    "cl_list": (req(b"Content-Length: 5, 5\r\n", b"hello"), 400),
    "cl_plus_sign": (req(b"Content-Length: +5\r\n", b"hello"), 400),
    "cl_negative": (req(b"Content-Length: -1\r\n"), 400),
    "cl_hex": (req(b"Content-Length: 0x5\r\n", b"hello"), 400),
    "cl_underscore": (req(b"Content-Length: 5_0\r\n"), 400),
    "cl_inner_space": (req(b"Content-Length: 5 5\r\n"), 400),
    "cl_superscript_two": (req(b"Content-Length: \xb2\r\n"), 400),
    "cl_arabic_indic_digit_utf8": (req(b"Content-Length: \xd9\xa5\r\n"), 400),
    "cl_fullwidth_digit_utf8": (req(b"Content-Length: \xef\xbc\x95\r\n"), 400),
    "cl_19_digits": (req(b"Content-Length: " + b"1" * 19 + b"\r\n"), 400),
    "cl_25_digits": (req(b"Content-Length: " + b"0" * 25 + b"\r\n"), 400),
    "cl_empty": (req(b"Content-Length: \r\n"), 400),
    "cl_float": (req(b"Content-Length: 1.0\r\n", b"x"), 400),
    "cl_vertical_tab": (req(b"Content-Length: 1\x0b\r\n", b"x"), 400),
    "te_duplicate": (req(TE + TE, b"0\r\n\r\n"), 400),
    "te_chunked_twice_list": (req(b"Transfer-Encoding: chunked, chunked\r\n"), 400),
    "te_chunked_not_last": (req(b"Transfer-Encoding: chunked, gzip\r\n"), 400),
    "te_chunked_identity": (req(b"Transfer-Encoding: chunked, identity\r\n"), 400),
    "te_gzip_chunked": (req(b"Transfer-Encoding: gzip, chunked\r\n"), 501),
    # RFC 9112 6.3 item 4: chunked not the final coding of a request, 400 and close.
    "te_identity": (req(b"Transfer-Encoding: identity\r\n"), 400),
    "te_xchunked": (req(b"Transfer-Encoding: xchunked\r\n"), 400),
    "te_unknown": (req(b"Transfer-Encoding: compress\r\n"), 400),
    "te_empty": (req(b"Transfer-Encoding: \r\n"), 400),
    "te_vertical_tab": (req(b"Transfer-Encoding: chunked\x0b\r\n"), 400),
    "te_nel_prefix": (req(b"Transfer-Encoding: \x85chunked\r\n"), 400),
    "te_nbsp_suffix": (req(b"Transfer-Encoding: chunked\xa0\r\n"), 400),
    "te_space_before_colon": (req(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400),
    "te_obs_fold": (req(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"), 400),
    "te_http10": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te_quoted": (req(b'Transfer-Encoding: "chunked"\r\n'), 400),
    # line endings and field syntax
    "bare_lf_request_line": (b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400),
    "bare_lf_everywhere": (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    "bare_lf_in_header": (b"GET / HTTP/1.1\r\nHost: h\nContent-Length: 0\r\n\r\n", 400),
    "bare_lf_final": (b"GET / HTTP/1.1\r\nHost: h\r\n\n", 400),
    "bare_cr_in_value": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400),
    "cr_then_te": (b"GET / HTTP/1.1\r\nHost: h\r\nX: \rTransfer-Encoding: chunked\r\n\r\n", 400),
    "bare_cr_request_line": (b"GET / HTTP/1.1\rHost: h\r\n\r\n", 400),
    "obs_fold": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400),
    "obs_fold_tab": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n", 400),
    "space_before_first_header": (b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400),
    "space_before_colon": (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "tab_before_colon": (b"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400),
    "no_colon": (b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400),
    "empty_name": (b"GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n", 400),
    "name_with_nbsp": (b"GET / HTTP/1.1\r\nHost: h\r\nX\xa0: v\r\n\r\n", 400),
    "name_with_nel": (b"GET / HTTP/1.1\r\nHost: h\r\nX\x85: v\r\n\r\n", 400),
    "name_with_slash": (b"GET / HTTP/1.1\r\nHost: h\r\nX/Y: v\r\n\r\n", 400),
    "name_with_brackets": (b"GET / HTTP/1.1\r\nHost: h\r\n[X]: v\r\n\r\n", 400),
    "value_nul": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    "value_soh": (b"GET / HTTP/1.1\r\nHost: h\r\nX: \x01\r\n\r\n", 400),
    "value_del": (b"GET / HTTP/1.1\r\nHost: h\r\nX: \x7f\r\n\r\n", 400),
    "value_esc": (b"GET / HTTP/1.1\r\nHost: h\r\nX: \x1b[31m\r\n\r\n", 400),
    "value_vt": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x0bb\r\n\r\n", 400),
    "value_ff": (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x0cb\r\n\r\n", 400),
    # request line
    "method_lowercase_version": (b"GET / http/1.1\r\nHost: h\r\n\r\n", 400),
    "version_1_10": (b"GET / HTTP/1.10\r\nHost: h\r\n\r\n", 400),
    "version_11": (b"GET / HTTP/11\r\nHost: h\r\n\r\n", 400),
    "version_missing_http09": (b"GET /\r\n\r\n", 400),
    "version_garbage": (b"GET / FOO/1.1\r\nHost: h\r\n\r\n", 400),
    "version_trailing_space": (b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400),
    "version_2_0": (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    "version_3_0": (b"GET / HTTP/3.0\r\nHost: h\r\n\r\n", 505),
    "version_0_9_explicit": (b"GET / HTTP/0.9\r\n\r\n", 505),
    "h2_preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "double_space": (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "double_space_before_version": (b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "leading_space": (b" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "tab_separator": (b"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "empty_target": (b"GET  HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "target_non_ascii": (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "target_nul": (b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "target_del": (b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "target_fragment": (b"GET /p#frag HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "target_relative": (b"GET p HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "asterisk_with_get": (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "authority_form_with_get": (b"GET h:80 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "absolute_form_other_scheme": (b"GET ftp://h/p HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "absolute_form_empty_authority": (b"GET http:///p HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "absolute_form_userinfo": (b"GET http://u@h/p HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "connect": (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 501),
    "connect_origin_form": (b"CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n", 501),
    "method_non_token": (b"GE(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "method_non_ascii": (b"G\xc9T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "method_empty": (b" / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    "request_line_only_crlf_garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    # Host
    "host_missing": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "host_missing_other_headers": (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    "host_duplicate": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    "host_duplicate_http10": (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "host_with_space": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "host_with_userinfo": (b"GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", 400),
    "host_with_slash": (b"GET / HTTP/1.1\r\nHost: h/p\r\n\r\n", 400),
    "host_empty": (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    "host_ipv6_zone_id": (b"GET / HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n\r\n", 400),
    # Expect
    "expect_unknown": (req(b"Expect: foo\r\nContent-Length: 1\r\n", b"x"), 417),
}
# The whole corpus of refused requests, the body's (test_body.py) included: what
# test_parser_differential.py runs through h11 and httptools and fuzz/fuzz_parser.py seeds
# its search with.
REJECTIONS = {**HEAD_REJECTIONS, **BODY_REJECTIONS}


@pytest.mark.parametrize("name", sorted(HEAD_REJECTIONS))
def test_rejection_status(name: str) -> None:
    data, status = HEAD_REJECTIONS[name]
    assert error_status(data) == status


@pytest.mark.parametrize("name", sorted(HEAD_REJECTIONS))
def test_rejection_status_is_the_same_byte_by_byte(name: str) -> None:
    data, status = HEAD_REJECTIONS[name]
    assert error_status(data, bytewise=True) == status


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: h\n",  # bare LF, terminator never comes
        b"GET /\r\n",  # HTTP/0.9 request line: the client waits for a response
        b"GET / HTTP/2.0\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n folded",
        b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: v\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello on the plain port
        b"GET /\x00",
    ],
)
def test_bad_incomplete_heads_are_rejected_without_waiting(data: bytes) -> None:
    """A head that can never become valid fails at once, not at the header timeout."""
    parser = RequestParser()
    parser.feed(data)
    with pytest.raises(ParseError):
        parser.next_event()


# --- limits at limit-1, limit and limit+1 --------------------------------------------------


def line_of(length: int) -> bytes:
    """A request line of exactly `length` bytes (CRLF excluded)."""
    fixed = len(b"GET / HTTP/1.1")
    return b"GET /" + b"a" * (length - fixed) + b" HTTP/1.1"


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("delta", "status"), [(-1, None), (0, None), (1, 414)])
def test_request_line_limit(delta: int, status: int | None, bytewise: bool) -> None:
    limit = 100
    data = line_of(limit + delta) + b"\r\nHost: h\r\n\r\n"
    assert len(data.split(b"\r\n")[0]) == limit + delta
    assert error_status(data, bytewise=bytewise, max_request_line=limit) == status


def test_request_line_over_limit_without_crlf_is_414_at_once() -> None:
    parser = RequestParser(max_request_line=100)
    parser.feed(b"GET /" + b"a" * 100)
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert info.value.status == 414


def test_request_line_at_limit_without_crlf_waits() -> None:
    parser = RequestParser(max_request_line=100)
    parser.feed(line_of(100) + b"\r")
    assert parser.next_event() is NEED_DATA
    parser.feed(b"\nHost: h\r\n\r\n")
    assert isinstance(parser.next_event(), Request)


def head_of(size: int) -> bytes:
    """A complete GET head of exactly `size` bytes (final CRLFCRLF included)."""
    base = b"GET / HTTP/1.1\r\nHost: h\r\nX: \r\n\r\n"
    return base[:-4] + b"v" * (size - len(base)) + b"\r\n\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("delta", "status"), [(-1, None), (0, None), (1, 431)])
def test_header_block_limit(delta: int, status: int | None, bytewise: bool) -> None:
    limit = 512
    data = head_of(limit + delta)
    assert len(data) == limit + delta
    assert error_status(data, bytewise=bytewise, max_header_block=limit) == status


def test_header_block_over_limit_without_terminator_is_431_at_once() -> None:
    parser = RequestParser(max_header_block=512)
    parser.feed(head_of(600)[:520])
    with pytest.raises(ParseError) as info:
        parser.next_event()
    assert info.value.status == 431


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize(("delta", "status"), [(-1, None), (0, None), (1, 431)])
def test_header_count_limit(delta: int, status: int | None, bytewise: bool) -> None:
    limit = 10
    fields = b"Host: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(limit + delta - 1))
    data = b"GET / HTTP/1.1\r\n" + fields + b"\r\n"
    assert error_status(data, bytewise=bytewise, max_header_count=limit) == status


@pytest.mark.parametrize(("delta", "status"), [(-1, None), (0, None), (1, 413)])
def test_content_length_limit_is_checked_from_the_head(delta: int, status: int | None) -> None:
    limit = 1000
    head = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (limit + delta)
    parser = RequestParser(max_body_size=limit)
    parser.feed(head)  # no body byte sent: the verdict comes from the head alone
    if status is None:
        assert parser.next_event() is NEED_DATA and parser.pending is not None
        parser.feed(b"x" * (limit + delta))
        r = parser.next_event()
        assert isinstance(r, Request) and len(r.body) == limit + delta
    else:
        with pytest.raises(ParseError) as info:
            parser.next_event()
        assert info.value.status == status


# --- linear time (ReDoS and rescanning) ----------------------------------------------------


def test_pathological_values_parse_in_linear_time() -> None:
    """60 KiB of `\\t a` in one value, long TE lists, long chunk extensions: fast."""
    value = b"\t a" * 20000
    heads = [
        b"GET / HTTP/1.1\r\nHost: h\r\nX: " + value + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: " + value + b"\x00\r\n\r\n",
        req(b"Transfer-Encoding: " + b"," * 60000 + b"chunked\r\n"),
        req(TE, b"1" + b";a=b" * 1000 + b"\r\nx\r\n0\r\n\r\n"),
        b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\nHost: h\r\n" + b"A" * 60000 + b"\r\n\r\n",
    ]
    for data in heads:
        elapsed = best_time(lambda data=data: error_status(data))
        assert elapsed < 0.05, (data[:40], elapsed)


def test_byte_by_byte_head_is_linear_not_quadratic() -> None:
    """Growing a head 8x must not cost ~64x: the parser keeps its search offsets."""

    def run(n: int) -> None:
        data = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * n + b"\r\n\r\n"
        assert len(parse_bytewise(data, max_header_block=1 << 20)) == 1

    small = best_time(lambda: run(16000))  # big enough that timer noise is small
    large = best_time(lambda: run(128000))
    assert large / small < 25, (small, large)  # 8x the input: linear ~8-10x, quadratic ~64x


def test_limits_given_by_position_are_the_same_limits() -> None:
    """The server's per-connection factory may pass them positionally (cheaper)."""
    from rtserve.head_cache import HeadCache

    cache = HeadCache()
    p = RequestParser(100, 512, 3, 10, cache)
    assert (p.max_request_line, p.max_header_block, p.max_header_count,
            p.max_body_size) == (100, 512, 3, 10)
    p.feed(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(ParseError) as err:
        p.next_event()
    assert err.value.status == 413  # max_body_size=10, from the fourth position
