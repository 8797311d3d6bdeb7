"""SIGHUP under a supervisor (reload.py): the settings a reload gives, and the rolling
restart's steps, one slot at a time.

The steps run against a real Supervisor whose `spawn` and `kill` are replaced by
recorders (no processes: tests/test_processes.py runs reloads end to end); the test
decides when a new child "beats" by setting its `ready_at`, as `_on_beat` would.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from rtserve.config import Config, ConfigError
from rtserve.reload import advance_reload, reload_config, start_reload
from rtserve.supervisor import Child, Slot, Supervisor


def write(tmp_path, text: str):
    path = tmp_path / "rtserve.toml"
    path.write_text(text)
    return str(path)


def test_sighup_settings_come_from_the_file_as_it_is_now(tmp_path):
    """reload_config: the file is re-read, flags still win, listener settings wait."""
    path = write(tmp_path, 'threads = 3\nmax_body_size = 10\nbind = "127.0.0.1:9000"\n')
    flags = {"config": path, "max_body_size": "20"}
    cfg = Config(_env={}, **flags)
    assert (cfg.threads, cfg.max_body_size, cfg.bind) == (3, 20, "127.0.0.1:9000")
    write(tmp_path, 'threads = 5\nmax_body_size = 99\nbind = "127.0.0.1:9001"\n')
    new, notes = reload_config(cfg, flags)
    assert (new.threads, new.max_body_size, new.bind) == (5, 20, "127.0.0.1:9000")
    assert notes == [
        "bind changed to '127.0.0.1:9001': needs a restart, keeping '127.0.0.1:9000'",
        "threads: 3 -> 5",
    ]
    write(tmp_path, "threads = 0\n")
    with pytest.raises(ConfigError, match="threads"):
        reload_config(cfg, flags)


@dataclass
class FakeProc:
    pid: int


class Recorder:
    """A Supervisor with three slots whose children are records, not processes."""

    def __init__(self, tmp_path) -> None:
        self.path = write(tmp_path, "threads = 3\n")
        flags = {"_env": {}, "config": self.path}
        self.sup = Supervisor("tests.apps:app", Config(**flags), 3, flags)
        self.socks = [socket.socket() for _ in range(3)]
        self.sup.slots = [Slot(i, s) for i, s in enumerate(self.socks)]
        self.spawned: list[tuple[int, list[str]]] = []  # (slot, argv it was started with)
        self.killed: list[tuple[int, int]] = []  # (pid, signal)
        self.sup.spawn = self.spawn  # type: ignore[method-assign]
        self.sup.kill = self.kill  # type: ignore[method-assign]
        for slot in self.sup.slots:
            slot.child = self.spawn(slot)
            slot.child.ready_at = 1.0
        self.spawned.clear()

    def spawn(self, slot: Slot) -> Child:
        pid = 100 + len(self.sup.children)
        child = Child(FakeProc(pid), slot.index, -1, 0.0, 0.0)  # type: ignore[arg-type]
        self.sup.children.append(child)
        self.spawned.append((slot.index, list(self.sup.argv)))
        return child

    def kill(self, child: Child, sig: int) -> None:
        self.killed.append((child.pid, sig))

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.sup.sel.close()
        self.sup._wake_r.close()
        self.sup._wake_w.close()


@pytest.fixture
def rec(tmp_path) -> Iterator[Recorder]:
    r = Recorder(tmp_path)
    yield r
    r.close()


def beat(child: Child | None) -> None:
    assert child is not None
    child.ready_at = 2.0


def test_each_old_child_gets_sigterm_only_once_its_replacement_beats(rec: Recorder) -> None:
    sup = rec.sup
    old = [s.child for s in sup.slots]
    with open(rec.path, "w") as f:
        f.write("threads = 5\n")
    start_reload(sup)
    assert sup.cfg.threads == 5 and "--threads=5" in sup.argv
    for i in range(3):
        advance_reload(sup)
        assert [slot for slot, _ in rec.spawned] == list(range(i + 1))  # one at a time
        assert "--threads=5" in rec.spawned[-1][1]  # started with the new settings
        pending = sup.reload.pending if sup.reload else None
        assert pending is not None and sup.slots[i].child is old[i]
        advance_reload(sup)  # not ready yet: nothing moves, the old child keeps serving
        assert len(rec.spawned) == i + 1 and len(rec.killed) == i
        beat(pending)
        if i < 2:
            advance_reload(sup)  # it takes the slot; the old one is told to drain
            assert sup.slots[i].child is pending
    advance_reload(sup)
    assert sup.reload is None  # complete
    assert rec.killed == [(c.pid, signal.SIGTERM) for c in old if c is not None]
    assert all(c is not None and c.retiring for c in old)


def test_a_sighup_during_a_reload_starts_it_over(rec: Recorder) -> None:
    sup = rec.sup
    start_reload(sup)
    advance_reload(sup)
    beat(sup.reload.pending if sup.reload else None)
    advance_reload(sup)  # slot 0 replaced, slot 1's child booting
    start_reload(sup)  # new code again: every slot once more, slot 0 included
    assert sup.reload is not None and sup.reload.queue == [0, 1, 2]
    beat(sup.reload.pending)
    advance_reload(sup)
    assert [slot for slot, _ in rec.spawned] == [0, 1, 0]


def test_a_slot_restarting_after_crashes_is_passed_over(rec: Recorder) -> None:
    sup = rec.sup
    sup.slots[1].sock = None  # in back-off: its listener closed, its restart loads new code
    start_reload(sup)
    for _ in range(2):
        advance_reload(sup)
        beat(sup.reload.pending if sup.reload else None)
    advance_reload(sup)
    assert sup.reload is None
    assert [slot for slot, _ in rec.spawned] == [0, 2]


def test_a_config_file_that_no_longer_parses_changes_nothing(rec: Recorder) -> None:
    sup = rec.sup
    argv = list(sup.argv)
    with open(rec.path, "w") as f:
        f.write("threads = 0\n")
    start_reload(sup)
    assert sup.reload is None and sup.argv == argv and sup.cfg.threads == 3
    advance_reload(sup)
    assert not rec.spawned and not rec.killed


def test_no_reload_while_stopping(rec: Recorder) -> None:
    rec.sup.stopping = True
    start_reload(rec.sup)
    assert rec.sup.reload is None
