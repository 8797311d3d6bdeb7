"""The ASGI executor: event-loop threads that run an app's coroutines, fed by the conductor.

Both threads, labelled. This takes the worker pool's place for an ASGI app, wired once by
server.py: admission hands a request over with `submit((runner, conn, req_id, request))`
(the same tuple the pool's `task_put` takes), and results come back on the pool's
completion queue (`pool.post`), so the writer treats them as worker completions.

Hand-off without a cross-thread call per request: `submit` appends to the loop's inbox (a
deque) and calls `call_soon_threadsafe` (a write to the loop's self-pipe) only when no
drain is pending, so every request admitted in one conductor turn, and every cancellation,
rides on one wake-up. The loop thread clears the flag before it drains, so nothing put
while the flag was set is missed.

The conductor's hooks: `cancel(conn, req_id, "deadline")` (admission, at respond-by) and
`gone(conn, req_id)` (writer.close, a connection closed while its request runs); both
become inbox items and run on the loop, where the request's HTTPCall lives.

The loop's gate (`ready`, in admission's CPU gate's place): the CPU work queued ahead of
a new request on the loop is about (handed-over requests whose task has not begun) x (the
loop's CPU per request, sampled with the loop thread's clock every 64 requests). While
that is above `--cpu-inflight-ms`, further requests wait in the conductor's CoDel queue,
where a late one is answered without running, instead of in the loop's ready queue, where
it would run late and be wasted. Tasks that await (I/O) have begun, so they never close
the gate; an empty backlog always opens it. Two single-writer counters (`submitted`:
conductor, `begun`: loop) give the backlog without a lock; when the gate closed with
requests queued, the loop nudges the conductor (an empty completion) once it has room.
The gate also stays shut while anyio's threads on the loop (sync `def` endpoints and
dependencies, bounded to `--asgi-threads`) are all taken, or would be if each task not yet
begun took one (see `bound_sync_threads`).

Each loop runs under a root task alive as long as the loop (`_root`): anyio keeps its
worker threads only while the root task it finds lives.

Each loop thread (uvloop when installed, else asyncio; `--asgi-loops` of them, requests
spread round-robin) runs its own lifespan, so loop-bound objects the app makes at startup
(clients, pools) are only used on the loop that made them. Loop threads block the
signals the conductor handles, like worker threads.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .asgi_call import HTTPCall
from .asgi_lifespan import Lifespan
from .asgi_scope import ScopeBuilder
from .config import Config
from .framing import serialize
from .pool import WorkerPool, batch_policy
from .request import Request
from .response import Response
from .worker import INTERNAL_ERROR

log = logging.getLogger("rtserve.error")

REASONS = ("deadline", "disconnect")
CPU_SAMPLE_EVERY = 64  # a power of two: the loop's CPU clock is read once per 64 requests
#: While the gate is shut because every sync thread is taken, how soon the conductor asks
#: again if no request ends first (a sync dependency frees its thread mid-request).
TOKEN_LOOK_NS = 5_000_000
_thread_time_ns = time.thread_time_ns
_monotonic_ns = time.monotonic_ns

# A WebSocket handshake is refused with 501: rtserve does not implement the protocol (see
# docs/asgi.md for why not 400 or 426). The app never sees a websocket scope.
WEBSOCKET_REFUSED = Response.text("WebSocket is not supported by this server\n", 501)


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop when asked for or (auto) installed, else asyncio's."""
    if kind in ("auto", "uvloop"):
        try:
            uvloop = importlib.import_module("uvloop")  # optional: not a dependency
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return new_loop
    return asyncio.new_event_loop


def bound_sync_threads(threads: int) -> Any:
    """Set anyio's default thread limiter on the running loop to `threads` and return it,
    or None when the app has not imported anyio (then it has no sync code to run).

    FastAPI and Starlette run sync `def` endpoints and dependencies in anyio's threads,
    40 by default. Forty CPU-bound handlers time-slice the GIL with the conductor: each
    takes 40 times its CPU in wall time, and fallbacks go out late (measured: 93% within
    a 50 ms deadline on workload C). Bounded to the worker count, and with the gate shut
    while every thread is taken (`LoopThread.ready`), the rest wait in the CoDel queue.
    An app that sets the limiter itself (in its lifespan, as FastAPI's docs show) keeps
    its own figure: the gate reads the limiter's tokens live.
    """
    if "anyio" not in sys.modules:
        return None
    try:
        to_thread = importlib.import_module("anyio.to_thread")
        limiter = to_thread.current_default_thread_limiter()
        limiter.total_tokens = threads
    except Exception:  # noqa: BLE001 - an anyio we do not know: leave its pool alone
        log.warning("could not bound anyio's thread pool; sync endpoints use its default",
                    exc_info=True)
        return None
    return limiter


class Runner:
    """The token admission hands over with each request (in the worker's place), and the
    one field the conductor writes: `draining` (responses then say Connection: close)."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        self.draining = False


class LoopThread:
    """One event loop in its own thread, with the inbox the conductor fills."""

    def __init__(self, index: int, app: Any, cfg: Config, pool: WorkerPool, runner: Runner,
                 new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.app = app
        self.post = pool.post  # completions, as workers post them
        self.shared = runner
        self.high_water = cfg.stream_high_water
        self.calls: dict[tuple[Any, int], HTTPCall] = {}  # (conn, req_id) -> running call
        self.cancelled = dict.fromkeys(REASONS, 0)  # written on this loop only
        self.state: dict[str, Any] = {}  # the lifespan state
        self.scopes = ScopeBuilder(cfg, self.state)
        self.loop = new_loop()
        self.lifespan = Lifespan(app, cfg.lifespan, self.state, self.loop)
        self._inbox: deque[tuple[Callable[..., Any], Any, Any, Any]] = deque()
        self._wake_pending = False
        self.cap_ns = int(cfg.cpu_inflight_ms * 1_000_000)  # the gate (0 = off)
        self.submitted = 0  # requests handed over (conductor writes)
        self.begun = 0  # of those, tasks that began or never will (loop writes)
        self.task_cpu_ns = 0  # the loop thread's CPU per request, sampled (loop writes)
        self._cpu_mark = 0  # the loop thread's CPU clock at the last sample (loop)
        self.nudge = False  # the gate closed with requests queued (conductor sets it)
        # anyio's thread limiter on this loop (FastAPI's sync code runs under it), bounded
        # to `sync_threads` by _root; None when the app does not use anyio.
        self.sync_threads = cfg.asgi_threads or cfg.threads
        self.sync_limiter: Any = None
        self.gate: Any = None  # admission (its gate_wake_ns), set by ASGIExecutor.wire
        self._running = threading.Event()
        self._root_done: asyncio.Future[None]  # made on the loop thread (_main)
        self.thread = threading.Thread(target=self._main, name=f"rtserve-asgi-{index}",
                                       daemon=True)

    # ---- main thread ----------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self._running.wait()

    def stop(self, timeout: float) -> None:
        """Stop the loop (remaining tasks are cancelled on its thread) and join it."""
        if not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self._end_root)
        self.thread.join(timeout + 2.0)

    # ---- conductor side ---------------------------------------------------------------

    def submit(self, item: tuple[Any, Any, int, Request]) -> None:
        """A request from admission: `(runner, conn, req_id, request)`."""
        self.submitted += 1
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._drain)

    def put(self, item: tuple[Callable[..., Any], Any, Any, Any]) -> None:
        """Queue `fn(a, b, c)` for this loop (cancellations, channel wake-ups)."""
        self._inbox.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._drain)

    def ready(self) -> bool:
        """May another request be handed over now? (the gate, see the module docstring)"""
        backlog = self.submitted - self.begun
        if backlog * self.task_cpu_ns < self.cap_ns or not self.cap_ns:
            limiter = self.sync_limiter  # (an empty backlog gives 0 < cap)
            if limiter is None:
                return True
            taken = limiter.borrowed_tokens
            if not taken or taken + backlog < limiter.total_tokens:
                return True
            # Every sync thread is taken, or would be if the tasks not yet begun each
            # took one: more would wait in anyio's queue, in arrival order and out of
            # CoDel's reach. (With none taken the app's tasks are not waiting on threads:
            # an async app's burst is never held back here.) A request that ends asks
            # again, and so does a look in TOKEN_LOOK_NS (a thread freed while its
            # request goes on). Not a task that begins (no nudge): it has yet to take
            # its thread, and a nudge then would hand over one more for each.
            gate = self.gate
            if gate is not None and not gate.gate_wake_ns:
                gate.gate_wake_ns = _monotonic_ns() + TOKEN_LOOK_NS
            return False
        self.nudge = True
        return False

    def cancel(self, conn: Any, rid: int, reason: str) -> None:
        self.put((self._cancel, conn, rid, reason))

    def gone(self, conn: Any, rid: int) -> None:
        self.put((self._gone, conn, rid, None))

    # ---- loop thread ------------------------------------------------------------------

    def _main(self) -> None:
        signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP}
        )
        # As the pool's workers (pool.batch_policy): a loop woken by a hand-over does not
        # preempt the conductor, which holds the GIL it would wait for.
        batch_policy()
        loop = self.loop
        asyncio.set_event_loop(loop)
        self._root_done = loop.create_future()
        loop.call_soon(self._running.set)
        try:
            loop.run_until_complete(self._root())
            self._finish_tasks(loop)
        finally:
            loop.close()

    async def _root(self) -> None:
        """The loop's root task, alive until `stop`: run by `run_until_complete`, as
        `asyncio.run` runs uvicorn's, so anyio finds it as the root of every request task.

        anyio's thread pool (FastAPI's sync `def` endpoints and dependencies) stops a
        worker thread when the root task it found ends. Under `run_forever` there was
        none, so each request's own task was taken for the root: every sync call started
        a new OS thread, and thread-local state (a model session, a DB connection) was
        made again per request (measured: 200 sequential calls, 200 thread ids; now 1).
        It also bounds anyio's threads on this loop to `sync_threads` (anyio's own
        default is 40): see `bound_sync_threads`.
        """
        self.sync_limiter = bound_sync_threads(self.sync_threads)
        await self._root_done

    def _end_root(self) -> None:
        if not self._root_done.done():
            self._root_done.set_result(None)

    @staticmethod
    def _finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
        """After stop: cancel what still runs and give it a moment to unwind."""
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
        try:
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), 1.0))
        except Exception:  # noqa: BLE001 - teardown goes on
            log.exception("shutting down async generators")

    def _drain(self) -> None:
        """Everything the conductor queued since the last wake-up."""
        self._wake_pending = False  # before draining: a put from now on wakes us again
        inbox = self._inbox
        pop = inbox.popleft
        runner = self.shared
        start = self._start
        while inbox:
            fn, a, b, c = pop()
            if fn is runner:
                start(a, b, c)
            else:
                try:
                    fn(a, b, c)
                except Exception:
                    log.exception("ASGI executor: %r failed", fn)

    def began(self) -> None:
        """A handed-over request's task began (or never will): one less in the backlog;
        nudge the conductor if its gate closed on us and we have room again."""
        begun = self.begun = self.begun + 1
        if not begun & (CPU_SAMPLE_EVERY - 1):
            cpu = _thread_time_ns()  # this (the loop) thread's CPU clock: one syscall per 64
            if begun > CPU_SAMPLE_EVERY:  # (the first interval holds the lifespan startup)
                per = (cpu - self._cpu_mark) // CPU_SAMPLE_EVERY
                old = self.task_cpu_ns
                self.task_cpu_ns = per if not old else (3 * old + per) >> 2
            self._cpu_mark = cpu
        if self.nudge and (self.submitted - begun) * self.task_cpu_ns < self.cap_ns:
            self.nudge = False
            # An empty completion (no connection): the conductor then dispatches from its
            # queue, as after any completion (completions.py).
            self.post(None, 0, None, False)

    def _start(self, conn: Any, rid: int, req: Request) -> None:
        """A request from admission: build its scope and start its task."""
        try:
            scope, websocket = self.scopes.build(req)
            if websocket:
                self.began()
                self.post(conn, rid, serialize(req, WEBSOCKET_REFUSED, self.shared.draining),
                          True)
                return
            call = HTTPCall(self, conn, rid, req)
            self.calls[(conn, rid)] = call
            call.task = self.loop.create_task(call.run(self.app, scope))
        except Exception:
            log.exception("starting the ASGI app for %s %s", req.method, req.path)
            self.began()
            self.calls.pop((conn, rid), None)
            self.post(conn, rid, serialize(req, INTERNAL_ERROR, self.shared.draining), True)

    def _cancel(self, conn: Any, rid: int, reason: str) -> None:
        call = self.calls.get((conn, rid))
        if call is not None:
            call.cancel(reason)

    def _gone(self, conn: Any, rid: int, _unused: Any) -> None:
        call = self.calls.get((conn, rid))
        if call is not None:
            call.gone()

    def running(self) -> int:
        return len(self.calls)


class ASGIExecutor:
    """The loop threads of one server, and the conductor's entry points to them."""

    def __init__(self, app: Any, cfg: Config, pool: WorkerPool) -> None:
        self.runner = Runner()
        new_loop = loop_factory(cfg.asgi_loop)
        self.loops = [LoopThread(i, app, cfg, pool, self.runner, new_loop)
                      for i in range(cfg.asgi_loops)]
        self.submit: Callable[[tuple], None]
        if len(self.loops) == 1:
            only = self.loops[0]
            self.submit = only.submit
            self.ready: Callable[[], bool] = only.ready
            self.cancel: Callable[[Any, int, str], None] = only.cancel
            self.gone: Callable[[Any, int], None] = only.gone
        else:
            self._next = itertools.cycle(self.loops)
            self.submit = self._submit_round_robin
            self.ready = self._any_ready
            self.cancel = self._cancel_everywhere
            self.gone = self._gone_everywhere

    # ---- main thread ----------------------------------------------------------------

    def start(self) -> None:
        """Start the loops and run each one's lifespan startup (StartupFailed on failure)."""
        for lt in self.loops:
            lt.start()
        for lt in self.loops:
            lt.lifespan.startup()

    def wire(self, gate: Any) -> None:
        """The conductor's admission, whose `gate_wake_ns` a loop's shut gate sets."""
        for lt in self.loops:
            lt.gate = gate

    def set_server_address(self, address: Any) -> None:
        """`scope["server"]`: (host, port), or (path, None) for a unix socket."""
        server = (address[0], address[1]) if isinstance(address, tuple) else (address, None)
        for lt in self.loops:
            lt.scopes.server = server

    def stop(self, timeout: float) -> None:
        """Let running tasks finish (up to `timeout` s, shared), lifespan shutdown, stop."""
        end = time.monotonic() + timeout
        while any(lt.running() for lt in self.loops) and time.monotonic() < end:
            time.sleep(0.01)
        for lt in self.loops:
            lt.lifespan.shutdown(max(0.5, end - time.monotonic()))
        for lt in self.loops:
            lt.stop(1.0)

    # ---- conductor side ---------------------------------------------------------------

    def _submit_round_robin(self, item: tuple) -> None:
        lt = next(self._next)
        if lt.submitted - lt.begun > 1:  # a backlog there: the least loaded loop instead
            lt = min(self.loops, key=lambda x: x.submitted - x.begun)
        lt.submit(item)

    def _any_ready(self) -> bool:
        ready = [lt.ready() for lt in self.loops]  # (each closed one asks for a nudge)
        return any(ready)

    def _cancel_everywhere(self, conn: Any, rid: int, reason: str) -> None:
        for lt in self.loops:  # rare (a deadline came): the owner finds it, the rest don't
            lt.cancel(conn, rid, reason)

    def _gone_everywhere(self, conn: Any, rid: int) -> None:
        for lt in self.loops:
            lt.gone(conn, rid)

    def sync_threads_busy(self) -> int:
        """anyio's threads running sync code now, summed over the loops (/metrics)."""
        return sum(lt.sync_limiter.borrowed_tokens for lt in self.loops
                   if lt.sync_limiter is not None)

    def sync_threads(self) -> float:
        """The bound on those threads, summed over the loops (0: the app has no anyio;
        inf: an app that lifted anyio's bound, which anyio allows)."""
        return sum(float(lt.sync_limiter.total_tokens) for lt in self.loops
                   if lt.sync_limiter is not None)

    def cancelled(self) -> dict[str, int]:
        """Tasks cancelled, by reason (summed over the loops; read by /metrics)."""
        return {r: sum(lt.cancelled[r] for lt in self.loops) for r in REASONS}
