"""The parser's cache of heads: a hit must give exactly what a full parse gives.

A head seen before (same bytes) is taken from the cache instead of being parsed again
(head_cache.py, HEAD_CACHE_BYTES; looked up and entered by parser.py). These tests hold
the cache to that: equal requests, their own header lists and bodies, nothing chunked or
with an expectation cached, bounded, shared only as the reader shares it (one dict for
parsers with the same limits).
"""

from __future__ import annotations

import pytest

from rtserve.errors import ParseError
from rtserve.head_cache import HEAD_CACHE_BYTES, HEAD_CACHE_MAX, HeadCache
from rtserve.parser import NEED_DATA, RequestParser
from rtserve.request import Request

GET = b"GET /a/b?x=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"


def summary(r: Request) -> tuple:
    return (r.method, r.target, r.path, r.raw_path, r.query_string, r.version, r.raw_headers,
            r.content_length, r.chunked, r.keep_alive, r.expect_continue, r.body)


def take_all(parser: RequestParser, data: bytes) -> list[Request]:
    parser.feed(data)
    out = []
    while (event := parser.next_event()) is not NEED_DATA:
        assert isinstance(event, Request)
        out.append(event)
    return out


def fresh(data: bytes) -> Request:
    """The request a parser that never saw `data` makes of it (no cache involved)."""
    (req,) = take_all(RequestParser(head_cache=HeadCache()), data)
    return req


def test_a_repeated_head_is_the_same_request_with_its_own_header_list():
    parser = RequestParser()
    # Pipelined: a buffer that ends as a head does is looked up whole (two bodyless heads
    # never match), the last head alone then (seen once now); the next time it enters,
    # then it is taken from the cache.
    zeroth, first = take_all(parser, GET + GET)
    (second,) = take_all(parser, GET)
    third, fourth = take_all(parser, GET + GET)
    assert zeroth.head is None and first.head is None and second.head is not None
    assert third.head is None  # a buffer of two heads is not a key
    assert fourth.head is second.head
    for r in (zeroth, first, second, third, fourth):
        assert summary(r) == summary(fresh(GET))
    assert second.raw_headers is not fourth.raw_headers
    second.raw_headers.append(("x-added", "by a handler"))
    assert summary(fourth) == summary(fresh(GET))
    (fifth,) = take_all(parser, GET)
    assert fifth.head is second.head and summary(fifth) == summary(fresh(GET))


@pytest.mark.parametrize("head", [
    b"GET /%7Euser?q HTTP/1.1\r\nHost: h\r\n\r\n",  # decoded path differs from raw_path
    b"GET / HTTP/1.0\r\n\r\n",  # no Host, 1.0: closes
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"GET http://other/p?x HTTP/1.1\r\nHost: h\r\n\r\n",  # absolute-form
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nA: 2\r\nCookie: c\r\n\r\n",
])
def test_cached_heads_of_every_form_parse_as_before(head):
    parser = RequestParser()
    (zeroth,) = take_all(parser, head)
    (first,) = take_all(parser, head)
    (second,) = take_all(parser, head)
    assert second.head is first.head is not None
    assert summary(second) == summary(first) == summary(zeroth) == summary(fresh(head))


POST = (b"POST /score HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b"Content-Length: 7\r\n\r\n")


def test_a_head_with_a_content_length_is_cached_and_each_request_keeps_its_own_body():
    """The scoring case: the same head, a different body each time (same length)."""
    parser = RequestParser()
    bodies = [b'{"a":%d}' % i for i in range(4)]
    reqs = [take_all(parser, POST + b)[0] for b in bodies]
    assert reqs[0].head is None and reqs[1].head is not None
    assert reqs[2].head is reqs[1].head and reqs[3].head is reqs[1].head
    for req, body in zip(reqs, bodies, strict=True):
        assert req.body == body
        assert summary(req) == summary(fresh(POST + body))


def test_a_cached_head_whose_body_comes_in_pieces_waits_for_all_of_it():
    parser = RequestParser()
    take_all(parser, POST + b'{"a":0}')
    (first,) = take_all(parser, POST + b'{"a":1}')
    assert take_all(parser, POST + b'{"a') == []  # the head hit the cache; 3 of 7 bytes
    assert take_all(parser, b'":2') == []
    (second,) = take_all(parser, b"}")
    assert second.head is first.head and second.body == b'{"a":2}'


def test_pipelined_requests_with_bodies_hit_the_cache_one_by_one():
    parser = RequestParser()
    take_all(parser, POST + b'{"a":0}')
    take_all(parser, GET)
    data = POST + b'{"a":1}' + GET + POST + b'{"a":2}' + GET + POST + b'{"a":3}'
    reqs = take_all(parser, data)
    assert [r.method for r in reqs] == ["POST", "GET", "POST", "GET", "POST"]
    assert reqs[0].head is not None and reqs[2].head is reqs[0].head
    assert reqs[4].head is reqs[0].head
    assert [r.body for r in reqs] == [b'{"a":1}', b"", b'{"a":2}', b"", b'{"a":3}']
    assert reqs[1].head is not None and reqs[3].head is reqs[1].head
    for r in reqs:
        assert summary(r) == summary(fresh(POST + r.body if r.method == "POST" else GET))


@pytest.mark.parametrize("head, body", [
    (b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
     b"3\r\nabc\r\n0\r\n\r\n"),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n", b""),
    (b"POST /p HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
     b"abc"),
])
def test_chunked_heads_or_heads_with_an_expectation_are_never_cached(head, body):
    cache = HeadCache()
    parser = RequestParser(head_cache=cache)
    for _ in range(3):
        (req,) = take_all(parser, head + body)
        assert req.head is None
        assert summary(req) == summary(fresh(head + body))
    assert cache.heads == {} and cache.once == set()


def test_a_head_that_arrives_byte_by_byte_hits_the_cache_once_complete():
    parser = RequestParser()
    take_all(parser, GET)
    (first,) = take_all(parser, GET)
    out = []
    for i in range(len(GET)):
        out += take_all(parser, GET[i:i + 1])
    (second,) = out
    assert second.head is first.head
    assert summary(second) == summary(first)


def test_invalid_heads_are_rejected_even_next_to_a_cached_one():
    parser = RequestParser()
    take_all(parser, GET)
    bad = GET.replace(b"User-Agent: t", b"User-Agent : t")  # whitespace before the colon
    with pytest.raises(ParseError) as exc:
        take_all(parser, bad)
    assert exc.value.status == 400


def test_one_cache_serves_every_parser_given_it():
    cache = HeadCache()
    take_all(RequestParser(head_cache=cache), GET)  # seen once by one parser
    (a,) = take_all(RequestParser(head_cache=cache), GET)  # cached by another
    (b,) = take_all(RequestParser(head_cache=cache), GET)
    assert a.head is not None and b.head is a.head and len(cache.heads) == 1
    (c,) = take_all(RequestParser(), GET)  # a parser of its own: its own cache
    assert c.head is None


def test_a_cache_never_outlives_the_limits_a_head_passed():
    # A cached head must still be refused by a parser with stricter limits (the reader
    # shares a cache only among parsers of one server, which share their limits).
    take_all(RequestParser(), GET)
    with pytest.raises(ParseError) as exc:
        take_all(RequestParser(max_header_count=1), GET)
    assert exc.value.status == 431


def test_the_cache_is_bounded_and_skips_large_heads():
    cache = HeadCache()
    parser = RequestParser(head_cache=cache)
    for i in range(HEAD_CACHE_MAX + 10):
        for _ in range(2):
            (req,) = take_all(parser, b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i)
            assert req.path == f"/{i}"
        assert req.head is not None
        assert len(cache.heads) <= HEAD_CACHE_MAX and len(cache.once) <= HEAD_CACHE_MAX
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"v" * HEAD_CACHE_BYTES + b"\r\n\r\n"
    for _ in range(3):
        (req,) = take_all(parser, big)
        assert req.head is None
        assert summary(req) == summary(fresh(big))
    assert big not in cache.heads and big not in cache.once


@pytest.mark.parametrize("field, present", [
    (b"X-Request-Deadline-Ms: 30\r\n", True),
    (b"grpc-timeout: 10m\r\n", True),
    (b"x-envoy-expected-rq-timeout-ms: 5\r\n", True),
    (b"X-Request-Deadline: 30\r\n", False),  # a near miss is not a budget field
    (b"", False),
])
def test_the_budget_field_flag_holds_for_parsed_and_cached_heads(field, present):
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + field + b"\r\n"
    parser = RequestParser()
    reqs = [take_all(parser, head)[0] for _ in range(3)]
    assert reqs[2].head is not None
    assert [r.budget_header for r in reqs] == [present] * 3
    # A Request made by hand may carry any field: admission looks (the safe default).
    assert Request("GET", "/", "/", "", "HTTP/1.1", []).budget_header is True


def test_a_cached_head_with_a_content_length_that_arrives_alone_waits_for_its_body():
    """The head in one read and its body in the next (http.client sends them apart): the
    buffer is exactly the head, as for a bodyless one, and the body must still be read."""
    parser = RequestParser()
    take_all(parser, POST + b'{"a":0}')
    take_all(parser, POST + b'{"a":1}')
    assert take_all(parser, POST) == []
    (req,) = take_all(parser, b'{"a":2}')
    assert req.head is not None and req.body == b'{"a":2}'
    assert summary(req) == summary(fresh(POST + b'{"a":2}'))
