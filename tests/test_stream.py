"""StreamChannel on its own: a producer thread (the worker) and the test as the conductor.

No sleeps: "the producer is blocked at the high-water mark" is read from the producer
thread's own stack (it is inside Condition.wait, called from StreamChannel.put), so the
tests wait for that fact instead of guessing how long blocking takes.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from rtserve.stream import StreamChannel
from tests.helpers import wait_for


class Wakes:
    """The conductor's wake-up: counted, and an event per call."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


class Producer(threading.Thread):
    """Runs `fn(channel)` on its own thread and keeps what it returned."""

    def __init__(self, channel: StreamChannel, fn: Callable[[StreamChannel], Any]) -> None:
        super().__init__(daemon=True)
        self.channel = channel
        self.fn = fn
        self.result: Any = None
        self.returned = threading.Event()

    def run(self) -> None:
        self.result = self.fn(self.channel)
        self.returned.set()


def blocked_in_put(t: threading.Thread) -> bool:
    """Is thread `t` waiting on the channel's condition inside StreamChannel.put?"""
    frame = sys._current_frames().get(t.ident or -1)
    names = []
    while frame is not None:
        names.append((frame.f_code.co_name, frame.f_code.co_filename))
        frame = frame.f_back
    return (
        bool(names) and names[0][0] == "wait" and names[0][1].endswith("threading.py")
        and any(n == "put" and f.endswith("stream.py") for n, f in names)
    )


def test_put_then_take_everything_buffered() -> None:
    wakes = Wakes()
    ch = StreamChannel(1 << 20, wakes)
    assert ch.put(b"ab") and ch.put(b"cd")
    assert ch.take() == b"abcd"
    assert wakes.count == 0  # the conductor never asked and found nothing: no wake-up


def test_a_take_that_finds_nothing_asks_for_one_wake() -> None:
    wakes = Wakes()
    ch = StreamChannel(1 << 20, wakes)
    assert ch.take() == b""
    ch.put(b"x")
    assert wakes.count == 1
    ch.put(b"y")  # nobody is waiting any more: no second wake
    assert wakes.count == 1
    assert ch.take() == b"xy"


def test_finish_marks_done_and_wakes_a_waiting_conductor() -> None:
    wakes = Wakes()
    ch = StreamChannel(1 << 20, wakes)
    ch.put(b"last")
    assert ch.take() == b"last"
    assert ch.take() == b""  # now waiting
    ch.finish()
    assert wakes.count == 1 and ch.done and not ch.failed
    assert ch.take() == b""
    ch.finish()  # idempotent for the wake: nobody waits after done
    assert wakes.count == 1


def test_finish_not_ok_marks_failed_and_keeps_what_was_put() -> None:
    ch = StreamChannel(1 << 20, Wakes())
    ch.put(b"partial")
    ch.finish(ok=False)
    assert ch.done and ch.failed
    assert ch.take() == b"partial"  # sent, then the close tells the client it broke


def test_the_producer_blocks_above_the_high_water_mark_until_a_take() -> None:
    wakes = Wakes()
    ch = StreamChannel(4, wakes)
    assert ch.take() == b""  # the conductor asked: the first put wakes it
    p = Producer(ch, lambda c: c.put(b"12345"))  # 5 > 4
    p.start()
    wakes.event.wait(10)
    wait_for(lambda: blocked_in_put(p), what="the producer to block at the high-water mark")
    assert not p.returned.is_set()
    assert ch.take() == b"12345"
    assert p.returned.wait(10) and p.result is True
    p.join(10)


def test_at_the_high_water_mark_the_producer_does_not_block() -> None:
    ch = StreamChannel(4, Wakes())
    assert ch.put(b"1234")  # not above: returns at once on this thread
    assert ch.take() == b"1234"


def test_abort_wakes_a_blocked_producer_and_refuses_more() -> None:
    ch = StreamChannel(4, Wakes())
    results: list[bool] = []

    def produce(c: StreamChannel) -> None:
        results.append(c.put(b"123456"))
        results.append(c.put(b"more"))

    p = Producer(ch, produce)
    p.start()
    wait_for(lambda: blocked_in_put(p), what="the producer to block at the high-water mark")
    ch.abort()
    assert p.returned.wait(10)
    p.join(10)
    assert results == [False, False] and ch.aborted
    assert ch.take() == b""  # what was buffered is dropped


def test_put_after_abort_returns_false_and_buffers_nothing() -> None:
    wakes = Wakes()
    ch = StreamChannel(1 << 20, wakes)
    assert ch.take() == b""
    ch.abort()
    assert ch.put(b"x") is False
    assert wakes.count == 0 and ch.take() == b""


def test_many_chunks_through_a_small_window_arrive_in_order() -> None:
    wakes = Wakes()
    ch = StreamChannel(16, wakes)
    chunks = [b"%03d;" % i for i in range(500)]

    def produce(c: StreamChannel) -> None:
        for chunk in chunks:
            assert c.put(chunk)
        c.finish()

    p = Producer(ch, produce)
    p.start()
    got = bytearray()
    while True:
        data = ch.take()
        if data:
            got += data
            continue
        if ch.done:  # set after the last put: one more take has everything
            got += ch.take()
            break
        # Nothing buffered and not done: wait for the wake the empty take asked for.
        assert wakes.event.wait(10), "the producer never woke the conductor"
        wakes.event.clear()
    p.join(10)
    assert bytes(got) == b"".join(chunks)
