"""Receive stamps: when a request's bytes arrived, on the monotonic clock. Conductor thread
(the reader's reads).

While CPU-bound handlers hold the GIL the conductor reads a request's bytes milliseconds
after they came (docs/deadlines.md, "When the clock starts"): time its client has already
waited. The kernel's receive stamp (SO_TIMESTAMPNS, the socket's only control message)
says when. It costs `recvmsg_into` instead of `recv_into` and the arithmetic below, so the
reader asks for it only while requests with a deadline come in (`ArrivalClock.stamps`, a
countdown the reader keeps: STAMP_SPAN requests after the last one with a deadline).
"""

from __future__ import annotations

import platform
import socket
import struct
import sys
import time
from typing import Any

# SO_TIMESTAMPNS is 35 in Linux's generic socket options, with a 16-byte timespec on 64-bit
# machines (x86, ARM, RISC-V, POWER, s390); Python 3.11 does not name it. Elsewhere
# requests keep the loop's clock.
_GENERIC_ABI = ("x86_64", "amd64", "aarch64", "arm64", "riscv64", "ppc64le", "ppc64", "s390x",
                "loongarch64")
SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 0) or (
    35 if sys.platform == "linux" and platform.machine().lower() in _GENERIC_ABI else 0)
SOL_SOCKET = socket.SOL_SOCKET
_AF_UNIX = getattr(socket, "AF_UNIX", -1)
TIMESPEC = struct.Struct("@qq")  # struct timespec on a 64-bit kernel ABI
_TIMESPEC_SIZE = TIMESPEC.size
_unpack_timespec = TIMESPEC.unpack
#: The control-message space a stamped read asks for (recvmsg_into's ancbufsize).
ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC_SIZE)
#: A routed request with a deadline keeps arrival stamps on for this many routed requests
#: without one: a server whose traffic carries no deadline pays nothing for them.
STAMP_SPAN = 256
#: A stamp further back than this is taken for a wall-clock step: the loop's clock is used.
_MAX_AGE_NS = 10_000_000_000
#: How often the wall-clock offset is read again.
_OFFSET_NS = 1_000_000_000
_monotonic_ns = time.monotonic_ns
_time_ns = time.time_ns


def wall_offset() -> int:
    """The wall clock less the monotonic clock, in ns. Another thread can take the GIL
    between the two readings and make the difference too large: the least of three is
    the one taken without a switch in between."""
    best = 0
    for i in range(3):
        mono = _monotonic_ns()
        off = _time_ns() - mono  # a switch in between reads the wall clock late: too large
        if not i or off < best:
            best = off
    return best


class ArrivalClock:
    """The reader's stamp state: whether stamps are asked for now, and the conversion."""

    def __init__(self) -> None:
        # > 0 while requests with a deadline come in: reads then ask the kernel when their
        # bytes arrived. 0 without SO_TIMESTAMPNS on this platform.
        self.stamps = 0
        self.ok = SO_TIMESTAMPNS > 0  # False once a socket refused them (unix, platform)
        self.offset = 0  # wall clock - monotonic clock, ns
        self.offset_at = -_OFFSET_NS - 1  # `now` when it was read: never yet

    def arrival(self, sock: Any, anc: list, now: int) -> int:
        """When the bytes of a read on `sock` arrived (its control messages `anc`), on the
        monotonic clock; `now` if unknown.

        The stamp is wall-clock time, taken back to the monotonic clock by their offset,
        read again once a second (a wall-clock step is then wrong for at most a second,
        and one beyond `_MAX_AGE_NS` not at all), and never later than the loop's `now`.
        It is the stamp of the last segment the read returned, so never earlier than the
        request's first byte. A read without one came on a socket accepted before stamps
        were on: they are turned on for it, from its next read.
        """
        if anc:
            data = anc[0][2]
            if len(data) != _TIMESPEC_SIZE:
                return now
            if now - self.offset_at > _OFFSET_NS:
                self.offset = wall_offset()
                self.offset_at = now
            sec, nsec = _unpack_timespec(data)
            at = sec * 1_000_000_000 + nsec - self.offset
            return at if now - _MAX_AGE_NS < at < now else now
        self.enable(sock)
        return now

    def enable(self, sock: Any) -> None:
        """Ask the kernel to stamp what this socket receives. A unix socket has no receive
        stamps, and a server's connections all come from one kind of listener: then, or
        where the option is refused, stamps are off for good."""
        try:
            if sock.family == _AF_UNIX:
                raise OSError("no receive stamps on a unix socket")
            sock.setsockopt(SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:
            self.ok = False
            self.stamps = 0
