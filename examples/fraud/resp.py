"""A minimal Redis client (RESP2) whose every call is bounded by the caller's deadline.

Why not redis-py: its socket timeout is fixed when a connection pool is made, and a
scoring request needs each call bounded by *its own* remaining budget. Here every call
takes a deadline; before each connect, send and recv the socket timeout is set to what is
left of it, so a stalled server (`CLIENT PAUSE`, a slow disk, a lost packet) costs at most
the budget. A connection that timed out mid-reply is closed, never reused: its late reply
would be read as the answer to the next call.

Commands are pipelined: one write, then the replies in order. Error replies come back in
the reply list as RedisReplyError instances, not raised, so one bad command does not hide
the replies of the others.

URLs: `redis://[:password@]host[:port][/db]` and `unix:///path/to/redis.sock[?db=N]`.
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

Reply = bytes | int | list | None


class RedisError(Exception):
    """The connection failed or the server broke the protocol."""


class RedisTimeout(RedisError):
    """The deadline passed before the reply came; the connection was dropped."""


class RedisReplyError(Exception):
    """An error reply (`-ERR ...`) to one command of a pipeline."""


def encode(command: list) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if isinstance(arg, bytes):
            b = arg
        elif isinstance(arg, str):
            b = arg.encode()
        else:
            b = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Connection:
    """One socket to Redis and its receive buffer; used by one thread at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _timeout(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RedisTimeout("deadline passed")
        self.sock.settimeout(left)

    def pipeline(self, commands: list[list], deadline: float) -> list[Reply]:
        """Send `commands` in one write and read their replies, all before `deadline`."""
        data = b"".join(encode(c) for c in commands)
        try:
            self._timeout(deadline)
            self.sock.sendall(data)
            return [self._reply(deadline) for _ in commands]
        except TimeoutError:
            raise RedisTimeout("no reply before the deadline") from None
        except OSError as exc:
            raise RedisError(f"connection failed: {exc}") from None

    def _line(self, deadline: float) -> bytes:
        while True:
            end = self.buf.find(b"\r\n", self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos:end])
                self.pos = end + 2
                return line
            self._fill(deadline)

    def _fill(self, deadline: float) -> None:
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0
        self._timeout(deadline)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RedisError("connection closed by the server")
        self.buf += chunk

    def _reply(self, deadline: float) -> Reply:
        line = self._line(deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisReplyError(rest.decode(errors="replace"))  # type: ignore[return-value]
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._fill(deadline)
            value = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n + 2
            return value
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply(deadline) for _ in range(n)]
        raise RedisError(f"protocol error: {line[:40]!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Client:
    """A pool of connections to one Redis; `execute` is safe from any thread."""

    def __init__(self, url: str, max_idle: int = 32) -> None:
        u = urlsplit(url)
        if u.scheme == "unix":
            self.address: tuple | str = u.path
            db = parse_qs(u.query).get("db", ["0"])[0]
        elif u.scheme == "redis":
            self.address = (u.hostname or "127.0.0.1", u.port or 6379)
            db = u.path.strip("/") or "0"
        else:
            raise ValueError(f"not a redis:// or unix:// URL: {url!r}")
        if not db.isdigit():
            raise ValueError(f"bad database number in {url!r}")
        self.db = int(db)
        self.password = unquote(u.password) if u.password else None
        self.url = url
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def execute(self, commands: list[list], timeout: float) -> list[Reply]:
        """Run a pipeline of commands within `timeout` seconds; the replies in order."""
        deadline = time.monotonic() + timeout
        conn = self._take(deadline)
        try:
            replies = conn.pipeline(commands, deadline)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                conn = None  # type: ignore[assignment]
        if conn is not None:
            conn.close()
        return replies

    def _take(self, deadline: float) -> Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect(deadline)

    def _connect(self, deadline: float) -> Connection:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RedisTimeout("deadline passed before connecting")
        try:
            if isinstance(self.address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(left)
                try:
                    sock.connect(self.address)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self.address, timeout=left)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise RedisTimeout("connect timed out") from None
        except OSError as exc:
            raise RedisError(f"cannot connect to {self.url}: {exc}") from None
        conn = Connection(sock)
        setup: list[list[object]] = []
        if self.password:
            setup.append(["AUTH", self.password])
        if self.db:
            setup.append(["SELECT", self.db])
        if setup:
            try:
                replies = conn.pipeline(setup, deadline)
            except BaseException:
                conn.close()
                raise
            for r in replies:
                if isinstance(r, RedisReplyError):
                    conn.close()
                    raise RedisError(f"connection setup refused: {r}")
        return conn

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
