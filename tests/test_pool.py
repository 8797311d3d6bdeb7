"""The worker pool alone: results, exceptions, signals, replacement, shutdown."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from rtserve.pool import WorkerPool
from tests.helpers import wait_completions


def test_results_come_back_with_their_token():
    pool = WorkerPool(3)
    pool.start()
    try:
        for i in range(20):
            pool.submit(lambda conn, rid, x: x * 2, f"conn{i}", i, i)
        done = wait_completions(pool, 20)
        assert sorted((c, r, v, final) for c, r, v, final in done) == sorted(
            (f"conn{i}", i, i * 2, True) for i in range(20)
        )
    finally:
        pool.shutdown(5)
        pool.close()


def test_exception_becomes_a_result_and_the_worker_survives():
    pool = WorkerPool(1)
    pool.start()
    try:
        def boom(conn, rid, arg):
            raise ValueError("handler bug")

        pool.submit(boom, "c", 1, None)
        pool.submit(lambda c, r, a: "after", "c", 2, None)
        done = wait_completions(pool, 2)
        assert isinstance(done[0][2], ValueError)
        assert done[1][2] == "after"
        assert pool.alive() == 1
    finally:
        pool.shutdown(5)
        pool.close()


def test_workers_block_the_signals_the_conductor_handles():
    pool = WorkerPool(1)
    pool.start()
    try:
        pool.submit(lambda c, r, a: signal.pthread_sigmask(signal.SIG_BLOCK, []), "c", 1, None)
        (_, _, mask, _), = wait_completions(pool, 1)
        assert signal.SIGINT in mask and signal.SIGQUIT in mask and signal.SIGTERM in mask
    finally:
        pool.shutdown(5)
        pool.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling classes")
def test_workers_run_under_the_batch_policy_and_the_caller_keeps_its_own():
    before = os.sched_getscheduler(0)
    pool = WorkerPool(2)
    pool.start()
    try:
        for i in range(2):
            pool.submit(lambda c, r, a: os.sched_getscheduler(0), "c", i, None)
        done = wait_completions(pool, 2)
        assert [policy for _, _, policy, _ in done] == [os.SCHED_BATCH] * 2
        assert os.sched_getscheduler(0) == before  # the conductor is not demoted
    finally:
        pool.shutdown(5)
        pool.close()


def test_a_dead_worker_is_replaced():
    pool = WorkerPool(2)
    pool.start()
    try:
        def die(conn, rid, arg):
            raise SystemExit("thread exit")

        pool.submit(die, "c", 1, None)
        first = wait_completions(pool, 1)
        assert isinstance(first[0][2], SystemExit)
        for i in range(4):
            pool.submit(lambda c, r, a: a, "c", 10 + i, i)
        assert len(wait_completions(pool, 4)) == 4
        # The dying thread posts its result before it counts itself and spawns a successor.
        settled = threading.Event()
        for _ in range(100):
            if pool.deaths == 1 and pool.alive() == 2:
                break
            settled.wait(0.05)
        assert pool.deaths == 1
        assert pool.alive() == 2
    finally:
        pool.shutdown(5)
        pool.close()


def test_shutdown_returns_pending_tasks_and_lets_running_ones_finish():
    pool = WorkerPool(2)
    pool.start()
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold(conn, rid, arg):
        started.release()
        release.wait(10)
        return "finished"

    pool.submit(hold, "a", 1, None)
    pool.submit(hold, "b", 2, None)
    assert started.acquire(timeout=5) and started.acquire(timeout=5)
    for i in range(5):
        pool.submit(hold, "queued", 100 + i, None)
    threading.Timer(0.2, release.set).start()
    pending = pool.shutdown(timeout=10)
    assert sorted(t[2] for t in pending) == [100, 101, 102, 103, 104]
    done = pool.take_completions()
    assert sorted(c for c, _, v, _ in done if v == "finished") == ["a", "b"]
    assert pool.alive() == 0
    pool.close()


def test_one_wakeup_for_a_burst_of_completions():
    pool = WorkerPool(1)
    pool.start()
    gate = threading.Event()
    try:
        pool.submit(lambda c, r, a: gate.wait(5), "c", 0, None)
        for i in range(50):
            pool.submit(lambda c, r, a: a, "c", i + 1, i)
        gate.set()
        done = wait_completions(pool, 51)
        assert len(done) == 51
    finally:
        pool.shutdown(5)
        pool.close()


def test_a_burst_of_blocking_tasks_runs_on_every_worker_at_once():
    """Blocking handlers handed over in one burst are not queued behind each other while
    workers wait: each worker that takes a task lets the next one take another."""
    pool = WorkerPool(4)
    pool.start()
    gate = threading.Event()
    started = threading.Semaphore(0)

    def hold(conn, rid, arg):
        started.release()
        return gate.wait(10)

    try:
        for i in range(4):
            pool.submit(hold, "c", i, None)
        for _ in range(4):
            assert started.acquire(timeout=10)  # all four run together, none waits
        gate.set()
        assert [v for _, _, v, _ in wait_completions(pool, 4)] == [True] * 4
    finally:
        gate.set()
        pool.shutdown(5)
        pool.close()


def test_every_task_runs_under_racing_hand_offs():
    """Bursts of every size, with thread switches forced between almost every bytecode
    (workers going idle while tasks arrive): a lost wake-up would leave a burst
    incomplete and time out here."""
    pool = WorkerPool(3)
    pool.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        rid = 0
        for burst in range(300):
            for _ in range(burst % 7 + 1):
                rid += 1
                pool.submit(lambda c, r, a: time.sleep(0) if a % 2 else a, "c", rid, rid)
            wait_completions(pool, burst % 7 + 1)
    finally:
        sys.setswitchinterval(interval)
        pool.shutdown(5)
        pool.close()
