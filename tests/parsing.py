"""Helpers of the parser tests (test_parser.py for the head, test_body.py for the body):
feed a request whole or one byte at a time, the status it is refused with, a POST with
given field lines and body, the best of several wall-clock timings."""

from __future__ import annotations

import time
from collections.abc import Callable

from rtserve.errors import ParseError
from rtserve.parser import NEED_DATA, RequestParser
from rtserve.request import Request

TE = b"Transfer-Encoding: chunked\r\n"


def parse_all(data: bytes, **limits: int) -> list[Request]:
    """Feed `data` at once and collect every complete request until NEED_DATA."""
    parser = RequestParser(**limits)
    parser.feed(data)
    out = []
    while (event := parser.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def parse_bytewise(data: bytes, **limits: int) -> list[Request]:
    """Feed `data` one byte at a time, polling after each byte (the conductor's worst case)."""
    parser = RequestParser(**limits)
    out = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while (event := parser.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def error_status(data: bytes, *, bytewise: bool = False, **limits: int) -> int | None:
    """The status of the ParseError `data` raises, or None if it parses (or needs more)."""
    try:
        if bytewise:
            parse_bytewise(data, **limits)
        else:
            parse_all(data, **limits)
    except ParseError as exc:
        return exc.status
    return None


def req(head: bytes, body: bytes = b"") -> bytes:
    """A request with Host first, then `head` field lines, then `body`."""
    return b"POST / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n" + body


def best_time(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best of `repeat` wall times: the minimum filters out a busy machine's noise."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
