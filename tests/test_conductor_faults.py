"""The conductor survives its own bugs (issue 10): an exception injected in each stage of
the conductor closes that one connection, is counted in `rtserve_internal_errors_total`,
is logged with its traceback, and the next client is served.

How a fault is injected depends on how the part is wired, and each test says which. The
same tests run on the compiled build (docs/compiled.md), whose classes refuse a method
replaced on an instance, and whose compiled callers call a compiled part's methods
directly, past any patch:

- The loop's timer pass looks reader.on_timer and admission.on_deadline up at every pass
  (through the server, untyped): patched on the class, which both builds see there.
- The parser is faulted in the one outside function it calls, `unquote_to_bytes` (a module
  global, looked up per call in both builds), for a percent-encoded path.
- The reader and the completions look writer.respond up through an untyped reference
  (per call, per burst): patched on the class, as the timers.
- A completion is faulted in the first thing it calls for a late result, just after the
  admission callback `_finished` the completions hold (an attribute, so settable in both
  builds) gave the worker back.
- The server's housekeeping (never compiled) is patched on the running server.
- Methods bound once when the parts are wired (`loop.run` binds reader.on_readable;
  Reader binds app.resolve and admission.admit in its __init__) are patched *before the
  server starts*: on the class for Reader and Admission, on the App instance for resolve.
  Patching the running part would change nothing, and restarting a part is not an API.

A fault fires for one marked request only (a header, a path or the client's port), so
the same server shows that the next client is served.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import rtserve
from rtserve import App, Request, Response
from rtserve.admission import Admission
from rtserve.reader import Reader
from rtserve.server import Server
from rtserve.writer import Writer
from tests.conftest import make_app
from tests.helpers import (
    REVIEW,
    Gate,
    connect,
    read_response,
    read_response_file,
    recv_until_closed,
    scrape_metrics,
    server_thread,
    wait_for,
)

ERRORS = "rtserve_internal_errors_total"
MARK = ("x-fault", "1")
MARKED_GET = b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Fault: 1\r\n\r\n"


class InjectedFault(RuntimeError):
    """The bug a test plants in the conductor."""


class Once:
    """Raise InjectedFault the first time `hit` is true; `fired` tells the test it did."""

    def __init__(self) -> None:
        self.fired = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, hit: bool, where: str) -> None:
        if not hit:
            return
        with self._lock:
            if self.fired.is_set():
                return
            self.fired.set()
        raise InjectedFault(f"injected in {where}")


def marked(req: Any) -> bool:
    return isinstance(req, Request) and MARK in req.raw_headers


@pytest.fixture
def once() -> Once:
    return Once()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.ERROR, logger="rtserve.error")
    return caplog


def fault_app(gate: Gate) -> App:
    app = make_app()

    @app.get("/held", deadline_ms=50, fallback=Response.json(REVIEW))
    def held(request: Request) -> Response:
        gate.hold("held")
        return Response.text("late\n")

    return app


@contextlib.contextmanager
def serving(app: App, **settings: Any) -> Iterator[Server]:
    settings.setdefault("threads", 2)
    with server_thread(app, header_timeout=0.3, **settings) as srv:
        yield srv


def errors(srv: Server) -> float:
    return scrape_metrics(srv.address).get(ERRORS, 0.0)


def still_serves(srv: Server) -> None:
    """The next client, on a fresh connection, gets correct answers (keep-alive too)."""
    s = connect(srv.address)
    f = s.makefile("rb")
    try:
        for _ in range(2):
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response_file(f)[::2] == (200, b"Hello, world!\n")
    finally:
        f.close()
        s.close()


def assert_survived(srv: Server, logs: pytest.LogCaptureFixture, before: float, where: str,
                    s: socket.socket | None = None, bookkeeping: bool = True) -> None:
    """The faulty connection got nothing and was closed; counted once; logged with its
    traceback; the workers' bookkeeping is whole; the next client is served."""
    if s is not None:
        assert recv_until_closed(s) == b"", "a response (or part of one) after the fault"
        s.close()
    assert errors(srv) == before + 1
    recs = [r for r in logs.records if r.exc_info and r.exc_info[0] is InjectedFault]
    assert len(recs) == 1, [r.getMessage() for r in logs.records]
    assert recs[0].getMessage().startswith(f"internal error {where}")
    if bookkeeping:
        wait_for(lambda: srv.admission.busy == 0, 5, "every worker to be free again")
        assert srv.admission.queue_depth == 0
    still_serves(srv)
    wait_for(lambda: srv.open_connections == 0, 5, "the faulty connection to be gone")


def send_marked(srv: Server, data: bytes = MARKED_GET) -> socket.socket:
    s = connect(srv.address)
    s.sendall(data)
    return s


# ---- stages that look their method up at every call: patched on the running server ---------


def test_a_fault_in_the_parser_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # The parser decodes a percent-encoded path with the module's unquote_to_bytes, looked
    # up per call: a fault there is raised from inside RequestParser.next_event.
    real = rtserve.parser.unquote_to_bytes

    def unquote(path: Any) -> bytes:
        once(path == "/hel%6Co", "the parser")
        return real(path)

    with serving(fault_app(gate)) as srv:
        before = errors(srv)
        monkeypatch.setattr(rtserve.parser, "unquote_to_bytes", unquote)
        s = send_marked(srv, MARKED_GET.replace(b"/hello", b"/hel%6Co"))
        assert_survived(srv, logs, before, "handling an event", s)


def test_a_fault_in_writer_respond_closes_that_connection(
        logs: pytest.LogCaptureFixture, once: Once, gate: Gate,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader calls self.writer.respond(...) per call and the completions look it up
    # per burst, both through an untyped reference: patched on the class. /missing is
    # answered from the parse loop (404), /hello from a worker's completion.
    with serving(fault_app(gate)) as srv:
        real = Writer.respond

        def respond(self: Writer, conn: Any, reply: Any, now: int) -> bool:
            once(marked(conn.request), "writer.respond")
            return real(self, conn, reply, now)

        monkeypatch.setattr(Writer, "respond", respond)
        before = errors(srv)
        s = send_marked(srv, MARKED_GET.replace(b"/hello", b"/missing"))
        assert_survived(srv, logs, before, "handling an event", s)
        once.fired.clear()
        logs.clear()
        s = send_marked(srv)
        assert_survived(srv, logs, before + 1, "handling a completion", s)


def _late_result_faults(srv: Server, once: Once, gate: Gate,
                        monkeypatch: pytest.MonkeyPatch) -> tuple[socket.socket, Any]:
    """A late result whose completion handling raises; returns the client and its reader.

    on_completions handles a reply for the request in flight inline; every other
    completion (late results, streams, a task that raised) first gives its worker back
    through the admission callback the completions hold (`_finished`, read per burst),
    then goes to `_complete`. A late result always takes that path: the request was
    answered at its deadline (the fallback), and the worker finishes after. The fault is
    planted in that callback, right after the worker was given back: before the rest of
    the completion was handled, and a second give-back would show in the bookkeeping.
    """
    real = srv.completions._finished
    ports: set[int] = set()

    def finished(conn: Any, rid: int, req: Any, now: int) -> None:
        real(conn, rid, req, now)
        once(conn.addr[1] in ports, "completions._finished")

    monkeypatch.setattr(srv.completions, "_finished", finished)
    s = connect(srv.address)
    ports.add(s.getsockname()[1])
    s.sendall(b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n")
    f = s.makefile("rb")
    status, headers, _ = read_response_file(f)
    if status != 200 or headers.get("x-rtserve-fallback") != "deadline":
        pytest.fail(f"expected the deadline fallback first, got {status} {headers}")
    gate.release.set()  # the worker finishes: its late result is the faulty completion
    if not once.fired.wait(10):
        pytest.fail("the completion never reached completions._finished")
    return s, f


def test_a_fault_in_one_completion_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    with serving(fault_app(gate), threads=2) as srv:
        before = errors(srv)
        s, f = _late_result_faults(srv, once, gate, monkeypatch)
        assert f.read() == b""  # the keep-alive connection is closed, nothing more sent
        f.close()
        # Not the worker bookkeeping here (see the next test): the other worker serves on.
        assert_survived(srv, logs, before, "handling a completion", s, bookkeeping=False)


def test_a_fault_in_a_final_completion_gives_its_worker_back(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # (Preconditions fail with pytest.fail, not AssertionError: only the bug is expected.)
    with serving(fault_app(gate), threads=1) as srv:
        s, f = _late_result_faults(srv, once, gate, monkeypatch)
        f.close()
        s.close()
        wait_for(lambda: srv.admission.busy == 0, 2, "the worker's slot to be given back")
        assert srv.admission.charged == 0
        c = connect(srv.address, timeout=3)
        try:
            c.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(c)[0] == 200
        finally:
            c.close()


def test_a_fault_in_a_connection_timer_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # The loop's timer pass reads server.reader.on_timer each time it runs: patched on the
    # class. The marked connection is the one whose head never completes.
    with serving(fault_app(gate)) as srv:
        real = Reader.on_timer
        ports: set[int] = set()

        def on_timer(self: Reader, conn: Any, kind: int, now: int) -> None:
            once(conn.addr[1] in ports, "reader.on_timer")
            real(self, conn, kind, now)

        monkeypatch.setattr(Reader, "on_timer", on_timer)
        before = errors(srv)
        s = connect(srv.address)
        ports.add(s.getsockname()[1])
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n")  # the header timer (0.3 s) runs out
        assert_survived(srv, logs, before, "on a timer", s)
        assert scrape_metrics(srv.address).get('rtserve_timeouts_total{kind="header"}', 0) == 0


def test_a_fault_at_a_deadline_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # The timer pass looks server.admission.on_deadline up each time: patched on the class.
    with serving(fault_app(gate)) as srv:
        real = Admission.on_deadline

        def on_deadline(self: Admission, at: int, conn: Any, rid: int, now: int) -> None:
            once(marked(conn.request), "admission.on_deadline")
            real(self, at, conn, rid, now)

        monkeypatch.setattr(Admission, "on_deadline", on_deadline)
        before = errors(srv)
        s = send_marked(srv, MARKED_GET.replace(b"/hello", b"/held"))
        gate.wait_entered()
        assert recv_until_closed(s) == b""  # neither the fallback nor anything else
        s.close()
        gate.release.set()  # the late result now finds its connection gone
        assert_survived(srv, logs, before, "answering at a deadline")


def test_a_fault_in_housekeeping_is_counted_and_the_tick_goes_on(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # The loop calls server.housekeeping(now) at each tick (at most 1 s apart): patched on
    # the running server. No connection is at fault, so none is closed.
    with serving(fault_app(gate)) as srv:
        real = srv.housekeeping
        ticks = threading.Semaphore(0)

        def housekeeping(now: int) -> None:
            once(True, "housekeeping")
            real(now)
            ticks.release()

        before = errors(srv)
        c = connect(srv.address)  # an idle keep-alive client that must not be hurt
        c.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        f = c.makefile("rb")
        assert read_response_file(f)[0] == 200
        monkeypatch.setattr(srv, "housekeeping", housekeeping)
        assert once.fired.wait(5), "housekeeping never ran"
        assert ticks.acquire(timeout=5), "the tick after the fault never came"
        assert errors(srv) == before + 1
        recs = [r for r in logs.records if r.exc_info and r.exc_info[0] is InjectedFault]
        assert len(recs) == 1 and recs[0].getMessage().startswith("internal error in housekeeping")
        c.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response_file(f)[::2] == (200, b"Hello, world!\n")
        f.close()
        c.close()
        still_serves(srv)


# ---- stages bound once at wiring: patched before the server starts ----------------------------


def test_a_fault_in_on_readable_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # loop.run binds reader.on_readable once, when it starts: the class is patched first.
    # The marked connection is known by its client port (nothing was read from it yet).
    real = Reader.on_readable
    ports: set[int] = set()

    def on_readable(self: Reader, conn: Any, now: int) -> None:
        once(conn.addr[1] in ports, "reader.on_readable")
        real(self, conn, now)

    monkeypatch.setattr(Reader, "on_readable", on_readable)
    # Without the deferred accept: with it the first read is the accept's (Reader.open,
    # whose faults the parser, resolve and admit tests meet), not a read event's.
    with serving(fault_app(gate), defer_accept=0) as srv:
        before = errors(srv)
        s = connect(srv.address)
        ports.add(s.getsockname()[1])
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        assert_survived(srv, logs, before, "handling an event", s)


def test_a_fault_in_app_resolve_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # Reader.__init__ binds app.resolve: the App instance is patched before the server starts.
    app = fault_app(gate)
    real = app.resolve

    def resolve(request: Request) -> Any:
        once(marked(request), "app.resolve")
        return real(request)

    monkeypatch.setattr(app, "resolve", resolve)
    with serving(app) as srv:
        before = errors(srv)
        s = send_marked(srv)
        assert_survived(srv, logs, before, "handling an event", s)


def test_a_fault_in_admission_admit_closes_that_connection(
        monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture, once: Once,
        gate: Gate) -> None:
    # Reader.__init__ binds admission.admit: the class is patched before the server starts.
    real = Admission.admit

    def admit(self: Admission, conn: Any, rid: int, req: Request, route: Any, now: int
              ) -> Any:
        once(marked(req), "admission.admit")
        return real(self, conn, rid, req, route, now)

    monkeypatch.setattr(Admission, "admit", admit)
    with serving(fault_app(gate)) as srv:
        before = errors(srv)
        s = send_marked(srv)
        assert_survived(srv, logs, before, "handling an event", s)


# ---- a WSGI callable given to Server is served as WSGI ------------------------------------


def _wsgi_hello(environ: dict, start_response: Callable) -> list[bytes]:
    body = f"wsgi {environ['REQUEST_METHOD']} {environ['PATH_INFO']}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


class _CallableWithResolve:
    """A WSGI app object that happens to have a `resolve` method: still WSGI."""

    def resolve(self, request: Any) -> Any:  # pragma: no cover - must never be called
        raise AssertionError("a callable app was taken for a dispatcher")

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        return _wsgi_hello(environ, start_response)


@pytest.mark.parametrize("wsgi", [_wsgi_hello, _CallableWithResolve()],
                         ids=["function", "callable-with-resolve"])
def test_server_serves_a_wsgi_callable(wsgi: Any) -> None:
    srv = rtserve.Server(wsgi, rtserve.Config(_env={}), bind="127.0.0.1:0",
                         graceful_timeout=5.0)
    t = threading.Thread(target=srv.serve, name="rtserve-conductor", daemon=True)
    t.start()
    try:
        assert srv.started.wait(10) and srv.address is not None
        s = connect(srv.address)
        try:
            s.sendall(b"GET /path HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert read_response(s)[::2] == (200, b"wsgi GET /path\n")
        finally:
            s.close()
    finally:
        srv.stop()
        t.join(15)
    assert not t.is_alive() and srv.exit_code == 0
