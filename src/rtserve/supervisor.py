"""Several processes: a supervisor that starts, watches, reloads and replaces N children.

Each child is a full rtserve (conductor + worker pool) started by fork+exec of
`python -m rtserve APP --processes 1 ...` with `RTSERVE_SUPERVISED` set, not by a bare fork
or multiprocessing:

- the supervisor never imports the application (a model loaded once per child, not once
  more in a process that serves nothing), so its first children are the import check: a
  child that exits before it ever listened during start-up stops the whole server with
  exit code 3 and the child's own message, instead of a restart loop;
- a fresh interpreter has no threads or locks inherited from a forked parent, and SIGHUP
  (rolling restart) loads the code that is on disk now.

Listeners. The supervisor binds them (slot_listeners.py) and children inherit them (`pass_fds`):

- reuseport mode (default on Linux): one SO_REUSEPORT listener per *slot* (N slots). The
  kernel spreads new connections over the slots' accept queues by a hash, so the processes
  share the load without a thundering herd on one queue. Because the supervisor keeps every
  slot listener open, the listener a child accepts from outlives the child: when a child
  drains (reload, `--max-requests`) or dies, connections already queued for its slot wait
  for the replacement, which inherits the same socket. A child that closes its own
  SO_REUSEPORT listener would instead have the kernel reset every connection in its queue.
- shared mode (`--share-listener`, unix sockets, or no SO_REUSEPORT): one listener, every
  child accepts from it; balance is whatever epoll wake-ups give.

Heartbeat (gunicorn's pattern): each child writes a byte to a pipe from its conductor loop
at most once a second (`Server.heartbeat`); `.` = alive, `D` = draining (the supervisor
then starts the replacement at once). No byte for `--heartbeat-timeout` seconds (plus
BOOT_GRACE before the first one, which also means "listening") -> SIGKILL and replace.
A write that fails with EPIPE tells the child its supervisor is gone: it drains.

Signals: SIGTERM/SIGINT drain every child (each reports /readyz 503 for
`--drain-seconds`, then stops accepting and finishes in-flight requests) and exit 0 once
all have exited; a second SIGINT or SIGQUIT: children quit at once. SIGHUP: re-read the
config file (`--config`), then a rolling restart with the settings that gives, one slot at
a time: start the new child on the slot's listener, wait until it beats (it is
accepting), then SIGTERM the old one. The port never lacks a listener. A config file that
no longer parses leaves everything as it was (logged). The reload is reload.py's, run by
this loop: `start_reload` at the signal, `advance_reload` every turn.

Recycling (`--max-requests`): a child's conductor counts the requests it routes (health
endpoints excluded) and then drains as a SIGTERM would, `--drain-seconds` included
(lifecycle.py), while its "draining" heartbeat has the supervisor start the replacement.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from .child import BEAT_FD_ENV, CHILD_ENV, LISTEN_FD_ENV
from .child_command import child_args, child_env
from .config import SETTINGS, Config
from .reload import Reload, advance_reload, start_reload
from .slot_listeners import SlotListeners

log = logging.getLogger("rtserve.error")

BOOT_GRACE = 30.0  # extra seconds a new child has for import + bind before its first beat
STABLE_SECONDS = 10.0  # a child that served this long resets its slot's crash count
BACKOFF_FIRST = 0.5  # the second crash in a row waits this long, doubling each time
BACKOFF_MAX = 30.0
KILL_GRACE = 5.0  # after an immediate stop (SIGQUIT) children get this long before SIGKILL


# ====================================================================================
# Supervisor side
# ====================================================================================


@dataclass(eq=False)
class Child:
    """One child process as the supervisor sees it."""

    proc: subprocess.Popen
    slot: int
    beat_fd: int  # read end of its heartbeat pipe
    started: float
    last_beat: float
    ready_at: float = 0.0  # first beat: it is accepting
    retiring: bool = False  # asked to stop, or draining itself: never replaced on exit
    killed: str = ""  # why the supervisor SIGKILLed it

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(eq=False)
class Slot:
    """A place for one child: its listener (reuseport mode) and its restart state."""

    index: int
    sock: socket.socket | None
    child: Child | None = None  # the current child; retiring ones are not referenced
    failures: int = 0  # crashes in a row, for the back-off
    restart_at: float = 0.0  # monotonic time of a scheduled restart (0 = none)


class Supervisor:
    """Starts `procs` children of `app_spec` and keeps them running until told to stop."""

    def __init__(
        self, app_spec: str, cfg: Config, procs: int, overrides: dict[str, Any] | None = None
    ) -> None:
        self.app_spec = app_spec
        self.cfg = cfg
        self.overrides = dict(overrides or {})  # the command-line flags, re-applied on SIGHUP
        self.procs = procs
        self.argv = child_args(app_spec, cfg)
        setting_envs = {s.env for s in SETTINGS}
        self.env = {k: v for k, v in os.environ.items() if k not in setting_envs}
        self.env.update(child_env(cfg))
        self.env[CHILD_ENV] = str(os.getpid())
        self.slots: list[Slot] = []
        self.children: list[Child] = []
        self.listeners = SlotListeners(cfg, procs)
        self.booting = True  # until every first child has beaten once
        self.stopping = False
        self.immediate = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.reload: Reload | None = None
        self.sel = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()

    # ---- listeners ------------------------------------------------------------------

    def open_listeners(self) -> None:
        """Bind the slots' listeners (slot_listeners.py): one slot per process."""
        socks = self.listeners.open()
        self.slots = [Slot(i, sock) for i, sock in enumerate(socks)]

    # ---- children -------------------------------------------------------------------

    def spawn(self, slot: Slot) -> Child:
        """Start a child on the slot's listener (fork+exec); it is not `slot.child` yet."""
        assert slot.sock is not None
        r, w = os.pipe()
        os.set_blocking(r, False)
        lfd = slot.sock.fileno()
        env = dict(self.env)
        env[LISTEN_FD_ENV] = str(lfd)
        env[BEAT_FD_ENV] = str(w)
        try:
            # Its own process group: a terminal's Ctrl-C (or `timeout`) signals the
            # supervisor only, which tells each child in order, instead of every child
            # draining at once before the supervisor knows why.
            proc = subprocess.Popen(
                self.argv, env=env, pass_fds=(lfd, w), stdin=subprocess.DEVNULL,
                process_group=0,
            )
        finally:
            os.close(w)
        now = time.monotonic()
        child = Child(proc, slot.index, r, now, now)
        self.children.append(child)
        self.sel.register(r, selectors.EVENT_READ, child)
        log.info("started process %d (slot %d)", child.pid, slot.index)
        return child

    def _on_beat(self, child: Child) -> None:
        try:
            data = os.read(child.beat_fd, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the child closed its end: it is exiting
            self._forget_pipe(child)
            return
        now = time.monotonic()
        child.last_beat = now
        if not child.ready_at:
            child.ready_at = now
            log.info("process %d ready (slot %d)", child.pid, child.slot)
            if self.booting and all(
                s.child is not None and s.child.ready_at for s in self.slots
            ):
                self.booting = False
                log.info("all %d processes ready", self.procs)
        if b"D" in data and not child.retiring and not self.stopping:
            # Draining by itself (max_requests, or a SIGTERM sent to it directly):
            # its replacement starts now, on the same listener, while it finishes.
            child.retiring = True
            slot = self.slots[child.slot]
            if slot.child is child:
                log.info("process %d is draining: starting its replacement", child.pid)
                slot.child = None
                self._respawn(slot, 0.0)

    def _forget_pipe(self, child: Child) -> None:
        if child.beat_fd >= 0:
            try:
                self.sel.unregister(child.beat_fd)
            except (KeyError, ValueError):
                pass
            os.close(child.beat_fd)
            child.beat_fd = -1

    def _reap(self) -> None:
        for child in list(self.children):
            rc = child.proc.poll()
            if rc is not None:
                self._on_exit(child, rc)

    def _on_exit(self, child: Child, rc: int) -> None:
        self.children.remove(child)
        self._forget_pipe(child)
        how = f"exit code {rc}" if rc >= 0 else f"signal {signal.Signals(-rc).name}"
        slot = self.slots[child.slot]
        rl = self.reload
        if rl is not None and rl.pending is child:
            log.error(
                "reload aborted: new process %d ended (%s) before it was ready; "
                "the running processes keep serving", child.pid, how,
            )
            self.reload = None
            return
        if slot.child is not child:  # retiring (reload, recycle, stop): expected
            log.info("process %d exited (%s)", child.pid, how)
            return
        slot.child = None
        if self.stopping:
            log.info("process %d exited (%s)", child.pid, how)
            return
        if self.booting and not child.ready_at:
            # Printed, not logged: it must be seen whatever the logging configuration.
            print(
                f"rtserve: error: process {child.pid} failed to start ({how}) before "
                f"listening; the application cannot be served: stopping, no restart",
                file=sys.stderr, flush=True,
            )
            self.exit_code = 3
            self.stop(graceful=False)
            return
        if rc == 0 and child.ready_at:  # it drained by itself (recycle): replace it now
            log.info("process %d exited (%s): replacing it", child.pid, how)
            self._respawn(slot, 0.0)
            return
        if child.ready_at and time.monotonic() - child.ready_at >= STABLE_SECONDS:
            slot.failures = 0
        slot.failures += 1
        delay = 0.0 if slot.failures == 1 else min(
            BACKOFF_FIRST * 2 ** (slot.failures - 2), BACKOFF_MAX
        )
        reason = f" ({child.killed})" if child.killed else ""
        log.warning(
            "process %d died (%s%s): restarting slot %d in %.1f s",
            child.pid, how, reason, slot.index, delay,
        )
        self._respawn(slot, delay)

    def _respawn(self, slot: Slot, delay: float) -> None:
        if delay > 0 and self.listeners.per_slot and slot.sock is not None:
            # Nobody accepts on this slot for a while: leave the reuseport group so the
            # kernel stops queueing connections there (those queued now are reset).
            slot.sock.close()
            slot.sock = None
        slot.restart_at = time.monotonic() + delay
        if delay <= 0:
            self._restart_due()

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for slot in self.slots:
            if not slot.restart_at or now < slot.restart_at:
                continue
            if slot.sock is None:
                try:
                    slot.sock = self.listeners.rejoin(self.cfg.backlog)
                except OSError as exc:
                    log.error("slot %d: cannot listen on %s (%s): retrying", slot.index,
                              self.listeners.bind, exc)
                    slot.restart_at = now + 1.0
                    continue
            slot.restart_at = 0.0
            slot.child = self.spawn(slot)

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.heartbeat_timeout
        for child in self.children:
            limit = timeout if child.ready_at else timeout + BOOT_GRACE
            if not child.killed and now - child.last_beat > limit:
                child.killed = "no heartbeat for %.1f s" % (now - child.last_beat)
                log.error("process %d: %s: killing it", child.pid, child.killed)
                self.kill(child, signal.SIGKILL)

    def apply(self, cfg: Config) -> None:
        """New settings (SIGHUP, reload.py): heartbeat_timeout, drain_seconds and
        graceful_timeout apply here now, every setting to the children started next."""
        self.cfg = cfg
        self.argv = child_args(self.app_spec, cfg)

    def kill(self, child: Child, sig: int) -> None:
        """Signal a child (the reload's SIGTERM to the one it replaced, too); one already
        gone is no error."""
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    # ---- stop -------------------------------------------------------------------------

    def stop(self, graceful: bool) -> None:
        """SIGTERM (graceful) or SIGQUIT every child; exit once all have exited."""
        now = time.monotonic()
        if not graceful:
            self.immediate = True
            self.stop_deadline = now + KILL_GRACE
        elif not self.stopping:
            c = self.cfg
            self.stop_deadline = now + c.drain_seconds + c.graceful_timeout + KILL_GRACE
        if self.stopping and graceful:
            return
        self.stopping = True
        self.reload = None
        for child in self.children:
            child.retiring = True
            if graceful:
                self.kill(child, signal.SIGTERM)
            else:  # one still booting serves nothing yet (and SIGQUIT would dump core)
                self.kill(child, signal.SIGQUIT if child.ready_at else signal.SIGKILL)
        self.listeners.close([slot.sock for slot in self.slots])
        for slot in self.slots:
            slot.restart_at = 0.0
            slot.sock = None

    # ---- signals and the loop ---------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP,
                    signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)

    def _handle_signals(self) -> None:
        sigs, self._signals = self._signals, []
        for signum in sigs:
            if signum == signal.SIGCHLD:
                continue  # _reap runs every turn
            name = signal.Signals(signum).name
            if signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
                log.warning("%s: stopping every process at once", name)
                self.exit_code = self.exit_code or 1
                self.stop(graceful=False)
            elif signum in (signal.SIGINT, signal.SIGTERM):
                log.info("%s: draining %d processes", name, len(self.children))
                self.stop(graceful=True)
            elif signum == signal.SIGHUP:
                start_reload(self)

    def _timeout(self) -> float:
        timeout = 0.5
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at:
                timeout = min(timeout, max(0.0, slot.restart_at - now))
        return timeout

    def run(self) -> int:
        try:
            self.open_listeners()
        except OSError as exc:
            print(f"rtserve: error: cannot listen on {self.cfg.bind}: {exc}", file=sys.stderr)
            return 1
        self._install_signals()
        try:
            for slot in self.slots:
                slot.child = self.spawn(slot)
            while True:
                events = self.sel.select(self._timeout())
                if self._signals:  # first: a beat saying "draining" may be our own SIGTERM
                    self._handle_signals()
                for key, _ in events:
                    if key.data is None:
                        try:
                            while self._wake_r.recv(64):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    elif key.data.beat_fd >= 0:
                        self._on_beat(key.data)
                self._reap()
                if self.stopping:
                    if not self.children:
                        break
                    if time.monotonic() >= self.stop_deadline:
                        for child in self.children:
                            log.error("process %d did not stop in time: SIGKILL", child.pid)
                            self.kill(child, signal.SIGKILL)
                            child.proc.wait()
                        self.exit_code = self.exit_code or 1
                        self._reap()
                        break
                    continue
                self._check_heartbeats()
                self._restart_due()
                advance_reload(self)
        finally:
            for child in self.children:  # only on an unexpected error
                self.kill(child, signal.SIGKILL)
            signal.set_wakeup_fd(-1)
            self.sel.close()
            self._wake_r.close()
            self._wake_w.close()
        log.info("supervisor stopped (exit %d)", self.exit_code)
        return self.exit_code


def run_supervisor(
    app_spec: str, cfg: Config, procs: int, overrides: dict[str, Any] | None = None
) -> int:
    """`rtserve APP --processes N` (N > 1): the supervisor's main; returns the exit code.

    `overrides` are the command-line settings: on SIGHUP they still win over the file."""
    return Supervisor(app_spec, cfg, procs, overrides).run()
