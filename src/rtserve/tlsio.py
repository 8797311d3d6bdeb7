"""TLS on the conductor: the non-blocking handshake, and encrypted reads and writes.

Conductor thread only. A server with `--certfile` uses `TLSReader` and `TLSWriter` in place
of reader.Reader and writer.Writer (server.py chooses once, per listener), so the plain-HTTP
path has no TLS test in it: these subclasses override the few methods whose system calls
differ and hand everything else (parsing, admission, framing, keep-alive) to their bases.

- Accept: the socket is wrapped (`do_handshake_on_connect=False`) and its Connection starts
  in HANDSHAKE, with the handshake timer (`--tls-handshake-timeout`) armed.
- Handshake: each readiness event runs `do_handshake()` once; SSLWantReadError and
  SSLWantWriteError set the epoll mask (EPOLLIN or EPOLLOUT). Done: the Connection moves to
  READING_HEAD with what the handshake established (`tls.connection_facts`), and the header
  timer starts. An error closes that connection alone and is counted by kind
  (`rtserve_tls_errors_total{reason}`); plain HTTP gets a plain 400 (OpenSSL recognises
  GET/POST/HEAD/PUT), anything else a lingering close.
- Reads: one `recv` per event, more while OpenSSL holds decrypted bytes (`pending()`) or a
  full 16 KiB record came (a body arriving), since epoll cannot see OpenSSL's buffer.
- Writes: `send` (SSLSocket has no sendmsg, and os.sendfile would bypass the encryption).
  OpenSSL writes all or nothing; after SSLWantWriteError the same bytes are offered again
  (never fewer: OpenSSL remembers how far it got). A large body or a file goes out in
  CHUNK-sized pieces read or sliced when the previous one is out, so memory stays bounded.
- Either direction may want the other readiness (a read that must write, a write that must
  read: `tls_want`); the next event of that kind resumes the waiting call.
- Close: a close_notify alert goes before the FIN, so a close-delimited body can't be
  mistaken for a complete one after a truncation.
"""

from __future__ import annotations

import _socket
import os
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any

from .admission import Admission
from .answers import Answers
from .connection import (
    CLOSING,
    HANDSHAKE,
    READING_HEAD,
    T_HANDSHAKE,
    T_HEADER,
    T_LINGER,
    T_WRITE,
    Connection,
)
from .lifecycle import Lifecycle
from .limits import Limits
from .metrics import Metrics
from .parser import UNFED_PARSER
from .protocols import Dispatcher
from .reader import READ_MASK, Reader
from .request import Request
from .stream import StreamChannel
from .timers import Timers
from .tls import TLSContexts, connection_facts, error_kind
from .writer import LINGER_NS, Writer, unsent_bytes

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
SSLWantReadError = ssl.SSLWantReadError
SSLWantWriteError = ssl.SSLWantWriteError
SSLError = ssl.SSLError
CHUNK = 128 << 10  # bytes of a file or a large body encrypted per send
RECORD = 16 << 10  # the largest TLS record's plaintext: a full one hints that more follow

# Connection.tls_want: which SSL call waits, and for what.
READ_WANTS_WRITE = 1  # recv returned SSLWantWriteError: retry the read when writable
WRITE_WANTS_READ = 2  # send returned SSLWantReadError: retry the write when readable
CLOSE_NOTIFY = 3  # the close_notify alert found the send buffer full: retry when writable
BROKEN = 4  # a fatal TLS or socket error: no SSL call on this connection any more

PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 49\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"This port speaks HTTPS: plain HTTP is not served\n"
)
_plain_send = socket.socket.send  # the socket's own send: under the SSL layer


class TLSReader(Reader):
    """Reader for TLS connections: wraps on accept, runs the handshake, decrypts reads."""

    def __init__(self, limits: Limits, conns: dict[int, Connection], ep: Any,
                 set_mask: Callable[[Connection, int], None], timers: Timers,
                 metrics: Metrics, app: Dispatcher, answers: Answers, admission: Admission,
                 life: Lifecycle, *, tls: TLSContexts) -> None:
        # Reader's parameters spelled out, not forwarded as *args: mypyc (the compiled
        # build) miscompiles *args passed on to a compiled base class's __init__.
        super().__init__(limits, conns, ep, set_mask, timers, metrics, app, answers,
                         admission, life)
        self._tls = tls
        self._handshake_ns = self._limits.handshake_ns

    # ---- accept and handshake -------------------------------------------------------------

    def open(self, sock: _socket.socket, addr: Any, now: int) -> int:
        conns = self._conns
        # The listener accepts bare C sockets (listener.py); ssl wraps only socket.socket.
        sock = socket.socket(sock.family, sock.type, sock.proto, sock.detach())
        sock.setblocking(False)  # a new socket object starts "blocking": ssl would wait in it
        try:
            ssock = self._tls.context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        except (OSError, ValueError):  # reset before we could look at it
            sock.close()
            self._metrics.count_tls_error("eof")
            return len(conns)
        conn = Connection(ssock, addr, UNFED_PARSER, handshake=True)
        return self._adopt(conn, now + self._handshake_ns, T_HANDSHAKE)

    def handshake(self, conn: Connection, now: int) -> None:
        """One step of the handshake, on a readiness event."""
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]  # an SSLSocket
        except SSLWantReadError:
            self._set_mask(conn, READ_MASK)
            return
        except SSLWantWriteError:
            self._set_mask(conn, EPOLLOUT)  # not RDHUP: a half-closed client would spin
            return
        except OSError as exc:  # SSLError included
            self.refuse(conn, exc, now)
            return
        conn.handshake_done(connection_facts(conn.sock))  # type: ignore[arg-type]
        self._metrics.tls_handshakes += 1
        self._set_mask(conn, READ_MASK)
        self._arm(conn, now + self._header_ns, T_HEADER)

    def refuse(self, conn: Connection, exc: OSError, now: int) -> None:
        """The handshake failed: count it; answer plain HTTP with a plain 400; close."""
        kind = error_kind(exc)
        self._metrics.count_tls_error(kind)
        if kind == "eof":
            self.writer.close(conn)
            return
        if kind == "http_request":
            try:
                _plain_send(conn.sock, PLAIN_HTTP_ANSWER)
            except OSError:
                pass
        # Shut our side and read until the client's FIN (or the linger timer), so what was
        # sent (the 400, or OpenSSL's alert) is not destroyed by a reset from unread bytes.
        self.writer.linger_raw(conn, now)

    # ---- bytes in -------------------------------------------------------------------------

    def on_readable(self, conn: Connection, now: int) -> None:
        st = conn.state
        if st is HANDSHAKE:
            self.handshake(conn, now)
            return
        if conn.tls_want == WRITE_WANTS_READ:
            conn.tls_want = 0
            self.writer.on_writable(conn, now)
            return
        if st is CLOSING:
            self.writer.linger_read(conn)
            return
        sock = conn.sock
        try:
            # Into the reader's one buffer, as Reader.on_readable (no 64 KiB block per read).
            n = sock.recv_into(self._rbuf)
            if n >= RECORD or sock.pending():  # type: ignore[attr-defined]
                n = self._read_more(sock, self._rview, n)
        except SSLWantReadError:
            return  # a record is not complete yet
        except SSLWantWriteError:
            conn.tls_want = READ_WANTS_WRITE  # e.g. answering a TLS 1.3 key update
            self._set_mask(conn, conn.mask | EPOLLOUT)
            return
        except SSLError as exc:
            self._metrics.count_tls_error(error_kind(exc))
            conn.tls_want = BROKEN
            self.writer.abort(conn)
            return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            conn.tls_want = BROKEN
            self.writer.abort(conn)
            return
        self.received(conn, n, now)

    @staticmethod
    def _read_more(sock: Any, view: memoryview, total: int) -> int:
        """Records OpenSSL already holds, and full records in a row, after the `total` bytes
        already in `view` (up to its size); returns the bytes now in it."""
        size = len(view)
        last = total
        while total < size:
            if not sock.pending() and last < RECORD:
                break
            try:
                last = sock.recv_into(view[total:], size - total)
            except (SSLWantReadError, SSLWantWriteError):
                break  # keep what was read; the next event meets the same want again
            if not last:
                break  # EOF after these bytes: the next event reads it
            total += last
        return total

    def _request(self, conn: Connection, req: Request, now: int) -> None:
        req.tls_info = conn.tls
        super()._request(conn, req, now)

    # ---- timers ---------------------------------------------------------------------------

    def on_timer(self, conn: Connection, kind: int, now: int) -> None:
        if kind == T_HANDSHAKE:
            if conn.state is HANDSHAKE:
                self._metrics.count_timeout("handshake")
                self.writer.close(conn)
            return
        super().on_timer(conn, kind, now)


class _Remainder:
    """The rest of a large bytes body, sent in CHUNK slices after its head (no copy)."""

    __slots__ = ("view", "offset", "count")

    def __init__(self, view: memoryview, offset: int) -> None:
        self.view = view
        self.offset = offset
        self.count = len(view) - offset

    def close(self) -> None:
        pass


class TLSWriter(Writer):
    """Writer for TLS connections: SSL sends, chunked bodies and files, close_notify."""

    # ---- sends ----------------------------------------------------------------------------

    def _send(self, conn: Connection, data: Any, now: int) -> bool:
        out = conn.out
        if out is not None:
            # A 100 Continue still going out: the retry grows, never shrinks (OpenSSL).
            conn.out = memoryview(b"".join((out, data)))
            return False
        try:
            n = conn.sock.send(data)
        except SSLWantWriteError:
            n = 0
        except SSLWantReadError:
            n = 0
            conn.tls_want = WRITE_WANTS_READ
        except OSError:
            self.abort(conn)
            return False
        if n == len(data):
            return True
        conn.out = memoryview(data)[n:]
        self._wait_writable(conn, now)
        return False

    def _wait_writable(self, conn: Connection, now: int) -> None:
        """As the writer's, but a write that wants a read waits for EPOLLIN instead."""
        if conn.tls_want == WRITE_WANTS_READ:
            self._set_mask(conn, (conn.mask & ~EPOLLOUT) | READ_MASK)
        else:
            self._set_mask(conn, conn.mask | EPOLLOUT)
        self._arm_write(conn, now)

    def _send_pair(self, conn: Connection, pair: tuple[bytes, bytes], now: int) -> bool:
        """The head and the first slice of a large body in one record run, then the rest
        of the body in CHUNK slices (SSLSocket has no sendmsg; no joined copy of it all)."""
        head, body = pair
        view = memoryview(body)
        first = max(CHUNK - len(head), 0)
        conn.body = rest = _Remainder(view, first)
        if not self._send(conn, b"".join((head, view[:first])), now):
            return False
        return self._drain(conn, rest, now)

    def on_writable(self, conn: Connection, now: int) -> None:
        st = conn.state
        if st is HANDSHAKE:
            self.reader.handshake(conn, now)
            return
        want = conn.tls_want
        if want:
            if want == READ_WANTS_WRITE:
                conn.tls_want = 0
                if conn.out is None:
                    self._set_mask(conn, conn.mask & ~EPOLLOUT)
                self.reader.on_readable(conn, now)
                return
            if want == CLOSE_NOTIFY:
                self._close_after_response(conn, now)
                return
            conn.tls_want = 0  # WRITE_WANTS_READ, resumed by a read event: write now
        out = conn.out
        if out is not None:
            try:
                n = conn.sock.send(out)
            except SSLWantWriteError:
                n = 0
            except SSLWantReadError:
                n = 0
                conn.tls_want = WRITE_WANTS_READ
            except OSError:
                self.abort(conn)
                return
            if n < len(out):
                conn.out = out[n:]
                # EPOLLOUT came, so OpenSSL wrote some records: that is progress.
                self._wait_writable(conn, now)
                return
            conn.out = None
        self._flushed(conn, now)

    def _pump(self, conn: Connection, now: int) -> bool:
        body = conn.body
        if body is None or body.__class__ is StreamChannel:
            return super()._pump(conn, now)  # streams go through _send: already TLS
        if not self._drain(conn, body, now):
            return False
        self.finish(conn, now)
        return True

    def _drain(self, conn: Connection, body: Any, now: int) -> bool:
        """Send a file (FileBody) or a _Remainder CHUNK by CHUNK until the socket is full
        (False) or all is out (True: body closed, not yet finished)."""
        memory = body.__class__ is _Remainder
        while body.count > 0:
            n = min(body.count, CHUNK)
            if memory:
                chunk: Any = body.view[body.offset:body.offset + n]
            else:
                try:
                    chunk = os.pread(body.file.fileno(), n, body.offset)
                except OSError:
                    self.abort(conn)
                    return False
                if not chunk:
                    conn.keep_alive = False  # the file is shorter than announced
                    break
            body.offset += len(chunk)
            body.count -= len(chunk)
            if not self._send(conn, chunk, now):
                return False
        body.close()
        conn.body = None
        return True

    # ---- closing ----------------------------------------------------------------------------

    def _close_asked(self, conn: Connection, now: int) -> None:
        """TLS ends with close_notify even when the client asked to close: without it the
        client cannot tell our end of the response from a truncation."""
        self._close_after_response(conn, now)

    def _close_after_response(self, conn: Connection, now: int) -> None:
        """close_notify, then the lingering close of Writer (FIN, input discarded)."""
        if conn.eof:
            self.close(conn)
            return
        if conn.state is not CLOSING:
            conn.linger()
        try:
            conn.sock.unwrap()  # type: ignore[attr-defined]  # sends close_notify
        except SSLWantReadError:
            pass  # sent; the client's own close_notify is not waited for
        except SSLWantWriteError:
            conn.tls_want = CLOSE_NOTIFY  # no room yet: on_writable tries again
            self._set_mask(conn, EPOLLOUT)
            self._arm_write(conn, now)
            return
        except OSError:
            self.close(conn)
            return
        conn.tls_want = 0
        self._linger(conn, now)

    def close(self, conn: Connection) -> None:
        """Writer.close, with a close_notify first when an idle session ends (keep-alive
        timeout, drain, the client's own EOF), so clients see a clean TLS close. Best
        effort: one non-blocking try, never a wait."""
        if conn.state is READING_HEAD and conn.tls_want == 0 and conn.tls is not None:
            try:
                conn.sock.unwrap()  # type: ignore[attr-defined]
            except OSError:  # SSLWantRead (sent), SSLWantWrite (no room), a reset ...
                pass
        super().close(conn)

    def linger_raw(self, conn: Connection, now: int) -> None:
        """A refused handshake: no close_notify (there is no session), linger at once."""
        conn.linger()
        self._linger(conn, now)

    def _linger(self, conn: Connection, now: int) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)  # also drops the SSL layer: reads are raw now
        except OSError:
            self.close(conn)
            return
        self._set_mask(conn, READ_MASK)
        self._arm(conn, now + LINGER_NS, T_LINGER)
        self.linger_read(conn)

    def on_timer(self, conn: Connection, kind: int, now: int) -> None:
        if kind == T_WRITE and conn.tls_want == CLOSE_NOTIFY and conn.state is CLOSING:
            unsent = unsent_bytes(conn.fd)
            if 0 <= unsent < conn.unsent:
                conn.unsent = unsent
                self._arm(conn, now + self._write_ns, T_WRITE)
                return
            self._metrics.count_timeout("write")
            self.close(conn)
            return
        super().on_timer(conn, kind, now)


__all__ = ["CHUNK", "TLSReader", "TLSWriter"]
