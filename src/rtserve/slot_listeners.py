"""The supervisor's listening sockets: one SO_REUSEPORT listener per child slot, or one
listener every child shares. Supervisor process (supervisor.py holds one `SlotListeners`;
the children inherit the sockets, see child.py).

Which mode, and why the supervisor keeps every slot's listener open while its children
come and go, is supervisor.py's docstring ("Listeners"). Here: binding them (the first
one learns the real port of `:0`, which the others reuse), a slot's new listener when it
rejoins the reuseport group after a back-off, and closing them all at the stop.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Iterable

from .config import Config
from .listener import format_address, make_listener

log = logging.getLogger("rtserve.error")


def reuseport_available() -> bool:
    return hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux")


class SlotListeners:
    """The listeners of `procs` slots, bound once by `open` and closed once by `close`."""

    def __init__(self, cfg: Config, procs: int) -> None:
        self.cfg = cfg
        self.procs = procs
        self.shared: socket.socket | None = None  # shared mode: the one listener
        self.bind = cfg.bind  # with the real port once bound (port 0 = ephemeral)
        self.mode = ""

    @property
    def per_slot(self) -> bool:
        """Each slot has a listener of its own (reuseport mode): a slot whose child is
        down for a while may close it, so the kernel stops queueing connections there."""
        return self.shared is None

    def open(self) -> list[socket.socket]:
        """Bind; returns each slot's listener, index by index (the same shared one for
        every slot in shared mode). Raises OSError when the address cannot be bound."""
        cfg = self.cfg
        use_reuseport = (
            not cfg.share_listener and not cfg.bind.startswith("unix:") and reuseport_available()
        )
        first: socket.socket | None = None
        if use_reuseport:
            try:
                first = make_listener(cfg.bind, cfg.backlog, reuse_port=True)
            except OSError as exc:
                if exc.errno != errno.ENOPROTOOPT:
                    raise
                first = None  # the kernel has no SO_REUSEPORT: share one listener
        if first is None:
            self.mode = "one shared listener"
            shared = self.shared = make_listener(cfg.bind, cfg.backlog, reuse_port=cfg.reuse_port)
            addr = shared.getsockname()
            socks = [shared] * self.procs
        else:
            self.mode = "an SO_REUSEPORT listener per process"
            addr = first.getsockname()
            host = cfg.bind.rpartition(":")[0]
            self.bind = f"{host}:{addr[1]}"
            socks = [first] + [self.rejoin(cfg.backlog) for _ in range(1, self.procs)]
        log.info(
            "supervisor listening on %s (%d processes, %s, pid %d)",
            format_address(addr), self.procs, self.mode, os.getpid(),
        )
        return socks

    def rejoin(self, backlog: int) -> socket.socket:
        """A new SO_REUSEPORT listener on the bound address, for a slot (reuseport mode).
        `backlog` is the current configuration's (a reload may have changed it)."""
        return make_listener(self.bind, backlog, reuse_port=True)

    def close(self, socks: Iterable[socket.socket | None]) -> None:
        """Close the slots' listeners `socks` and the shared one. Children keep their own
        copies: each listener closes for good when its last child does."""
        for sock in socks:
            if sock is not None and sock is not self.shared:
                sock.close()
        if self.shared is not None:
            self.shared.close()
            self.shared = None
