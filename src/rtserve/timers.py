"""The conductor's clocks: connection timers, request deadlines and the housekeeping tick.

Conductor thread only. Three kinds of time, kept apart because they differ in precision:

- Connection timers (header, body, idle, write stall, linger): one logical timer per
  connection (`timer_at`, `timer_kind`) and at most one live entry in a lazy heap
  (`heap_at`). Re-arming later costs two attribute stores; an entry that pops early
  re-pushes itself at the new time. Precision: whatever the loop gives.
- Request deadlines: a heap of `(respond_by, seq, conn, req_id)`, fired precisely (the
  loop waits in microseconds for them: see loop.py).
- The housekeeping tick: at most once a second (sooner when an alarm asks), for
  heartbeats, drain phases, resuming a paused listener and sampling statistics.

Entries of connections that closed, or of requests answered in time, are stale. Both
heaps are compacted when they grow past twice their live entries (plus a floor), so a
closed connection is not kept alive by its timer entry until that entry's time comes:
memory is bounded by what is open, not by the connection rate times the header timeout.
"""

from __future__ import annotations

import heapq
from typing import Any

from .connection import CLOSED, Connection

TICK_NS = 1_000_000_000
_COMPACT_FLOOR = 1024
_heappush = heapq.heappush
_heappop = heapq.heappop


class Timers:
    """The heaps and the tick; `next_due()` is what the loop sleeps until."""

    __slots__ = ("heap", "deadlines", "seq", "tick_at", "_heap_limit", "_dl_limit")

    def __init__(self, now: int) -> None:
        self.heap: list[tuple[int, int, Connection]] = []
        self.deadlines: list[tuple[int, int, Connection, int]] = []
        self.seq = 0
        self.tick_at = now + TICK_NS
        self._heap_limit = _COMPACT_FLOOR
        self._dl_limit = _COMPACT_FLOOR

    # ---- connection timers ------------------------------------------------------------

    def arm(self, conn: Connection, at: int, kind: int) -> None:
        """Set the connection's one timer; the heap gets an entry only if it must fire sooner."""
        conn.timer_at = at
        conn.timer_kind = kind
        if not conn.heap_at or at < conn.heap_at:
            heap = self.heap
            if len(heap) >= self._heap_limit:
                self._compact_heap()
            self.seq += 1
            _heappush(heap, (at, self.seq, conn))
            conn.heap_at = at

    def due_connections(self, now: int) -> list[tuple[Connection, int]]:
        """Pop the connections whose timer expired, with the timer kind that expired."""
        heap = self.heap
        due: list[tuple[Connection, int]] = []
        while heap and heap[0][0] <= now:
            at, _, conn = _heappop(heap)
            if conn.heap_at != at or conn.state is CLOSED:
                continue  # superseded by a sooner entry, or the connection is gone
            conn.heap_at = 0
            t = conn.timer_at
            if not t:
                continue  # disarmed
            if t > now:  # re-armed later: this entry moves to the new time
                self.seq += 1
                _heappush(heap, (t, self.seq, conn))
                conn.heap_at = t
                continue
            conn.timer_at = 0
            due.append((conn, conn.timer_kind))
        return due

    def _compact_heap(self) -> None:
        live = [e for e in self.heap if e[2].heap_at == e[0] and e[2].state is not CLOSED]
        heapq.heapify(live)
        self.heap = live
        self._heap_limit = max(_COMPACT_FLOOR, 2 * len(live))

    # ---- request deadlines --------------------------------------------------------------

    def add_deadline(self, respond_by: int, conn: Connection, req_id: int) -> None:
        dl = self.deadlines
        if len(dl) >= self._dl_limit:
            self._compact_deadlines()
            dl = self.deadlines
        self.seq += 1
        _heappush(dl, (respond_by, self.seq, conn, req_id))

    def next_deadline(self) -> tuple[int, Connection, int] | None:
        """The earliest deadline still waiting for its answer: (respond_by, conn, req_id)."""
        for at, _, conn, rid in sorted(self.deadlines):
            if conn.awaits(rid):
                return at, conn, rid
        return None

    def due_deadlines(self, now: int) -> list[tuple[int, Connection, int]]:
        """Pop the deadlines that came, for requests still waiting: (respond_by, conn, rid)."""
        dl = self.deadlines
        due: list[tuple[int, Connection, int]] = []
        while dl and dl[0][0] <= now:
            at, _, conn, rid = _heappop(dl)
            if conn.awaits(rid):
                due.append((at, conn, rid))
        return due

    def _compact_deadlines(self) -> None:
        live = [e for e in self.deadlines if e[2].awaits(e[3])]
        heapq.heapify(live)
        self.deadlines = live
        self._dl_limit = max(_COMPACT_FLOOR, 2 * len(live))

    # ---- the tick -------------------------------------------------------------------

    def alarm(self, at: int) -> None:
        """Make the next housekeeping tick come no later than `at`."""
        if at < self.tick_at:
            self.tick_at = at

    def next_due(self) -> int:
        """The nearest time anything here is due (ns)."""
        nxt = self.tick_at
        h = self.heap
        if h and h[0][0] < nxt:
            nxt = h[0][0]
        d = self.deadlines
        if d and d[0][0] < nxt:
            nxt = d[0][0]
        return nxt

    def sizes(self) -> dict[str, Any]:
        """Entry counts, for tests and diagnostics."""
        return {"connection_timers": len(self.heap), "deadlines": len(self.deadlines)}
