"""The fixed worker pool and the completion path back to the conductor.

Both threads, labelled: the conductor puts `(fn, conn, req_id, arg)` on the task queue
(`task_put`, the queue's own put: no Python call on the hand-off; `submit` is the same
for other callers) and takes completions with `take_completions`; worker threads run
`fn(conn, req_id, arg)`, post `(conn, req_id, result, final)` on the completion queue, and
wake the conductor through an eventfd (written only when no wake-up is already pending,
so a burst of completions costs one syscall). Worker threads run under SCHED_BATCH where
Linux has it (see `batch_policy`). The pool knows nothing of sockets or HTTP.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rtserve.error")

_STOP = object()

Completion = tuple[Any, int, Any, bool]

#: Linux's SCHED_BATCH (None elsewhere): see batch_policy.
_SCHED_BATCH: int | None = getattr(os, "SCHED_BATCH", None)


def batch_policy() -> bool:
    """Put the calling thread under SCHED_BATCH; True if it took effect.

    Every task put wakes a worker (one per loop turn for a batch of cheap requests, one
    per request otherwise), and a woken thread of the normal policy preempts the thread
    that woke it: the conductor, which holds the GIL. So the worker ran only to
    find the GIL taken and sleep again, and the conductor was switched out and back in:
    measured under workload B (one request per connection, the server on one core), the
    conductor was preempted 1.1-1.4 times per request. A SCHED_BATCH thread does not
    preempt on wake-up; it runs when the conductor blocks or its time slice ends, as
    CPU-bound work should. Nothing else changes: the same fair share and nice level, and
    the conductor (normal policy) still preempts a worker when its own wake-up comes (a
    deadline timer, a completion). Unprivileged (a lower class, never a raise), and
    inherited by threads a handler starts.
    """
    if _SCHED_BATCH is None:
        return False
    try:
        os.sched_setscheduler(0, _SCHED_BATCH, os.sched_param(0))  # 0: the calling thread
    except OSError:  # a sandbox that forbids it: keep the normal policy
        return False
    return True


class WorkerPool:
    """N threads, one task queue, one completion queue + eventfd to wake the conductor."""

    def __init__(self, threads: int, name: str = "rtserve-worker") -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.size = threads
        self.name = name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.task_put = self._tasks.put  # takes (fn, conn, req_id, arg): submit without a call
        self._completions: queue.SimpleQueue = queue.SimpleQueue()
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_pending = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.deaths = 0  # worker threads that died and were replaced
        self._stopping = False

    # ---- conductor side -------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(target=self._run, name=self.name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def submit(self, fn: Callable[[Any], Any], conn: Any, req_id: int, arg: Any) -> None:
        """Queue `fn(conn, req_id, arg)`; its result comes back as a final completion."""
        self._tasks.put((fn, conn, req_id, arg))

    def take_completions(self) -> list[Completion]:
        """Every completion posted so far (call after the eventfd fired, or any time)."""
        try:
            os.eventfd_read(self.wakeup_fd)
        except BlockingIOError:
            pass
        self._wake_pending = False
        q = self._completions
        get = q.get_nowait
        # qsize() instead of catching queue.Empty: an exception per call costs more than the
        # call. Items posted meanwhile are taken by the next call (their post wakes it).
        return [get() for _ in range(q.qsize())]

    def shutdown(self, timeout: float | None = None) -> list[tuple]:
        """Stop the workers; return the tasks that never started, as (fn, conn, req_id, arg).

        Workers finish the task they are running (a Python thread can't be killed); the
        join waits at most `timeout` seconds in total.
        """
        self._stopping = True
        pending = []
        try:
            while True:
                item = self._tasks.get_nowait()
                if item.__class__ is list:
                    pending.extend(item)
                elif item is not _STOP:
                    pending.append(item)
        except queue.Empty:
            pass
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(_STOP)
        import time

        end = None if timeout is None else time.monotonic() + timeout
        for t in threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return pending

    def close(self) -> None:
        try:
            os.close(self.wakeup_fd)
        except OSError:
            pass

    def alive(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    # ---- worker side ----------------------------------------------------------------

    def post(self, conn: Any, req_id: int, result: Any, final: bool) -> None:
        """Hand a result to the conductor and wake it (worker threads; also streams)."""
        self._completions.put((conn, req_id, result, final))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.eventfd_write(self.wakeup_fd, 1)
            except (BlockingIOError, OSError):
                pass

    def _run(self) -> None:
        """Worker loop: block signals the conductor handles, take the batch policy, then run
        tasks until told to stop."""
        signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP}
        )
        batch_policy()
        get = self._tasks.get
        post = self.post
        put = self._completions.put
        try:
            while True:
                item = get()
                if item is _STOP:
                    return
                # A list is a batch of cheap tasks from one loop turn (Handoff.batch, handoff.py):
                # run in turn, each posting its own result.
                tasks = item if item.__class__ is list else (item,)
                left = len(tasks)
                for fn, conn, req_id, arg in tasks:
                    left -= 1
                    try:
                        result = fn(conn, req_id, arg)
                    except BaseException as exc:  # noqa: BLE001 - the task code is the boundary
                        if isinstance(exc, SystemExit | KeyboardInterrupt):
                            post(conn, req_id, exc, True)
                            # Dying within a batch: the tasks after this one go back on
                            # the queue for the other workers (and the replacement).
                            for rest in tasks[len(tasks) - left:]:
                                self._tasks.put(rest)
                            raise
                        log.exception("task raised outside the handler guard")
                        result = exc
                    if left:
                        # Within a batch the conductor is woken once, by its last result:
                        # woken by the first, it would preempt this thread only to wait
                        # for the GIL (the rest of the batch is at most --handoff-ahead-ms).
                        put((conn, req_id, result, True))
                    else:
                        post(conn, req_id, result, True)
        except BaseException:
            # A worker that dies is replaced so the pool keeps its size.
            self.deaths += 1
            with self._lock:
                self._threads = [t for t in self._threads if t is not threading.current_thread()]
            if not self._stopping:
                log.error("worker thread died; starting a replacement")
                self._spawn()
