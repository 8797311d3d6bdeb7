"""The listening socket: bind, accept in batches, pause on fd exhaustion or the connection cap.

`make_listener` and `format_address` run on the main thread (the supervisor binds with
them too); `Listener` runs on the conductor thread. Accepted sockets are handed to the
connection reader one by one; what to do with them is not this module's business.
"""

from __future__ import annotations

import _socket
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rtserve.error")

ACCEPT_BATCH = 64  # accepts per readiness event: fairness to connections already open
ACCEPT_PAUSE_NS = 100_000_000  # how long EMFILE & co. pause accepting
_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# struct tcp_info up to tcpi_unacked, which on a listening socket is the accept queue's
# length (Linux: tcp_get_info reports sk_ack_backlog there, as `ss -lt` shows in Recv-Q).
_TCP_INFO = getattr(socket, "TCP_INFO", 0)
_TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", 0)  # Linux
_TCP_INFO_LEN = 28
_queued = struct.Struct("24xI").unpack


def make_listener(bind: str, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket for HOST:PORT (IPv6 in brackets) or unix:PATH."""
    if bind.startswith("unix:"):
        path = bind[5:]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = bind.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def format_address(address: Any) -> str:
    """`host:port`, `[v6]:port` or the unix socket path, as logs and tests read it."""
    if isinstance(address, tuple):
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return f"unix:{address}"


class Listener:
    """Accepts connections while registered in epoll; paused means unregistered.

    Two reasons to pause: fd exhaustion (EMFILE, ENFILE ...: resume after 100 ms, so it
    is not a busy loop) and the connection cap (resume when a connection closes).
    """

    __slots__ = ("sock", "fd", "address", "tcp", "_ep", "_open", "paused", "resume_at",
                 "_max", "_metrics", "_alarm", "_kind", "nodelay_each", "_count", "deferred")

    def __init__(self, sock: socket.socket, ep: Any, open_connection: Callable[..., Any],
                 max_connections: int, metrics: Any, alarm: Callable[[int], None],
                 defer_accept: int = 0) -> None:
        sock.setblocking(False)
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.address = sock.getsockname()
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._kind = (sock.family, sock.type, sock.proto)  # what accepted sockets are
        self._ep = ep
        self._open = open_connection  # (sock, addr) -> the number of connections open
        self.paused = False
        self.resume_at = 0  # ns; 0 = not paused for a time (the cap, or not paused)
        self._max = max_connections
        self._metrics = metrics
        self._alarm = alarm  # asks the housekeeping tick to come by a time (timers.alarm)
        # TCP_NODELAY per accepted socket costs a setsockopt each; Linux copies it from the
        # listening socket into every socket accepted from it, so it is set here once, and
        # the first accepted socket tells whether it came through (None: not known yet;
        # True: set it on each, as a kernel that does not copy it needs).
        self.nodelay_each: bool | None = None
        if self.tcp:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                self.nodelay_each = True
        # TCP_DEFER_ACCEPT: the kernel completes the handshake but queues the connection
        # for accept only once its first bytes came (or after about `defer_accept`
        # seconds without any). The request is then there to read at accept (reader.open),
        # and connections that never send (port scans, TCP health checks, an idle flood)
        # cost the server nothing. True when the kernel took it.
        self.deferred = False
        if self.tcp and defer_accept > 0 and _TCP_DEFER_ACCEPT:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT, defer_accept)
                self.deferred = True
            except OSError:
                pass
        # How many connections wait (TCP_INFO): accepting exactly those spares the failing
        # accept that ends a batch (an EAGAIN raised and caught: ~7k instructions, about
        # once per connection under connection churn). Unix sockets take the old way.
        self._count = self.tcp and _TCP_INFO != 0
        ep.register(self.fd, select.EPOLLIN)

    def on_ready(self, now: int) -> None:
        """Accept the connections waiting, up to ACCEPT_BATCH.

        Accepted sockets are `_socket.socket` objects, the C type under `socket.socket`:
        `socket.socket.accept` and `close` are Python-level wrappers (an `__init__`, I/O
        reference counting for makefile(), which the conductor never uses) that cost a few
        microseconds per connection; every method the conductor calls is the C one.

        A TCP listener first asks the kernel how many connections are queued and accepts
        that many: ending a batch with an accept that fails (EAGAIN) raises and catches an
        exception, which under connection churn cost more than the accept itself. Epoll is
        level-triggered, so one that arrives meanwhile is reported on the next turn. A
        count of 0 (another process took them, or a kernel that does not report it) falls
        back to accepting until EAGAIN.
        """
        lst = self.sock
        if lst is None:
            return
        batch = ACCEPT_BATCH
        if self._count:
            try:
                waiting = _queued(lst.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN))[0]
            except (OSError, struct.error):
                waiting = 0
            if 0 < waiting < batch:
                batch = waiting
        accept = lst._accept  # type: ignore[attr-defined]  # (fd, address): the C accept
        wrap = _socket.socket
        family, type_, proto = self._kind
        open_connection = self._open
        tcp = self.tcp
        for _ in range(batch):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    log.warning("accept: %s; pausing the listener for 100 ms", exc.strerror)
                    self.pause(now + ACCEPT_PAUSE_NS)
                    return
                continue  # ECONNABORTED and friends: that client is gone, try the next
            sock = wrap(family, type_, proto, fd)
            sock.setblocking(False)
            if tcp:
                if self.nodelay_each is not False:
                    self._nodelay(sock)
            else:
                addr = ("unix", 0)
            if open_connection(sock, addr, now) >= self._max:
                self.pause(0)
                return

    def _nodelay(self, sock: _socket.socket) -> None:
        """TCP_NODELAY on an accepted socket, unless the listener's came with it (checked
        on the first one: after that this runs only on a kernel that does not copy it)."""
        if self.nodelay_each is None:
            self.nodelay_each = not sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            if not self.nodelay_each:
                return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pause(self, until: int) -> None:
        """Stop accepting: until `until` (ns), or while at the cap when 0."""
        if not self.paused and self.sock is not None:
            self._ep.unregister(self.fd)
            self.paused = True
            self._metrics.accept_pauses += 1
        self.resume_at = until
        if until:
            self._alarm(until)

    def resume(self) -> None:
        if self.paused and self.sock is not None:
            self._ep.register(self.fd, select.EPOLLIN)
        self.paused = False
        self.resume_at = 0

    def on_close(self, open_count: int) -> None:
        """A connection closed: resume if only the cap held accepting back."""
        if self.paused and not self.resume_at and open_count < self._max:
            self.resume()

    def on_tick(self, now: int) -> None:
        """Housekeeping: end a timed pause."""
        if self.resume_at and now >= self.resume_at:
            self.resume()

    def close(self) -> None:
        """Stop listening for good (drain, teardown)."""
        sock = self.sock
        if sock is None:
            return
        if not self.paused:
            try:
                self._ep.unregister(self.fd)
            except (OSError, ValueError):
                pass
        sock.close()
        self.sock = None
        self.paused = True
        self.resume_at = 0
