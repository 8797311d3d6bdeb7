"""The child side of `--processes N`: serve on the listener the supervisor holds, and beat.

Runs in each child process, on its conductor thread (the heartbeat is called from the
housekeeping tick). The supervisor (supervisor.py) starts the child with the environment
variables below; cli.main sees CHILD_ENV and calls `run_child`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

from .config import Config

log = logging.getLogger("rtserve.error")

CHILD_ENV = "RTSERVE_SUPERVISED"  # set in a child: cli.main runs run_child
LISTEN_FD_ENV = "RTSERVE_LISTEN_FD"  # the inherited listener's fd number
BEAT_FD_ENV = "RTSERVE_BEAT_FD"  # the write end of the heartbeat pipe


class Heartbeat:
    """The conductor's `heartbeat` hook: one byte per call on the pipe to the supervisor."""

    def __init__(self, server: Any, fd: int) -> None:
        self.server = server
        self.fd = fd

    def __call__(self) -> None:
        s = self.server
        # Set from the moment a drain is asked for (a delayed drain, a max_requests recycle).
        draining = s.life.drain_requested
        try:
            os.write(self.fd, b"D" if draining else b".")
        except BlockingIOError:
            pass  # the supervisor is slow to read: it will see the next one
        except OSError:
            log.warning("supervisor is gone: draining")
            s.heartbeat = None
            s.life.request_drain(time.monotonic_ns())


def run_child(app: Any, cfg: Config) -> int:
    """Serve `app` on the listener inherited from the supervisor, beating on its pipe."""
    from .server import Server, freeze_startup_objects

    fd = int(os.environ.pop(LISTEN_FD_ENV))
    beat_fd = int(os.environ.pop(BEAT_FD_ENV))
    os.environ.pop(CHILD_ENV, None)
    for f in (fd, beat_fd):
        os.set_inheritable(f, False)  # not into subprocesses the application may start
    os.set_blocking(beat_fd, False)
    server = Server(app, cfg, sock=socket.socket(fileno=fd))
    server.heartbeat = Heartbeat(server, beat_fd)
    freeze_startup_objects()
    try:
        return server.serve()
    finally:
        os.close(beat_fd)
