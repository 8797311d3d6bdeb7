"""The WSGI (PEP 3333) adapter: any WSGI callable served with rtserve's deadlines.

`WSGIApp(app, cfg)` is what the conductor routes with: `resolve(request)` picks a Route by
the longest configured path prefix (`route_deadline`, `fallback`), so a WSGI app gets the
same deadline, fallback and admission enforcement as native routes. The Route's handler runs
on a worker: it builds the environ, calls the app and turns what it returned into an rtserve
Response:

- a list/tuple of bytes (or an iterable whose first chunk already fills its Content-Length)
  becomes a bytes body: the fast path, one send;
- a `wsgi.file_wrapper` over a regular file becomes a `FileBody`, sent with os.sendfile by
  the conductor;
- any other iterable is streamed by the worker (chunked when it has no Content-Length), and
  its `close()` is always called, also when the client went away mid-stream.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

from .app import Route
from .config import Config, ConfigError
from .proxy import ForwardedPolicy
from .request import Request
from .response import FileBody, Response

log = logging.getLogger("rtserve.error")

WSGICallable = Callable[[dict, Callable[..., Any]], Iterable[bytes]]

# Header name (lower case, as parsed) -> environ key; "" for names never mapped:
# Content-Length (CONTENT_LENGTH comes from the parsed length) and names with "_"
# (X_Forwarded_For would collide with X-Forwarded-For).
_header_keys: dict[str, str] = {"content-type": "CONTENT_TYPE", "content-length": ""}


_PER_REQUEST_KEYS = (
    "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "RAW_URI", "REQUEST_URI",
    "REMOTE_ADDR", "REMOTE_PORT", "wsgi.input", "wsgi.errors", "rtserve.request",
)


# The keys an environ template (see WSGIApp.environ) leaves blank: what differs between
# requests with the same head bytes.
# The keys `WSGIApp._request_keys` fills per request: blank in an environ template.
_TEMPLATE_BLANKS = ("REMOTE_ADDR", "REMOTE_PORT", "wsgi.input", "wsgi.errors",
                        "rtserve.request")
_TEMPLATES_MAX = 256


def _header_key(name: str) -> str:
    """`user-agent` -> `HTTP_USER_AGENT` (cached; the set of names seen is small)."""
    key = "" if "_" in name else "HTTP_" + name.upper().replace("-", "_")
    if len(_header_keys) < 4096:
        _header_keys[name] = key
    return key


# ---- wsgi.errors and wsgi.file_wrapper ------------------------------------------------


class ErrorStream:
    """`wsgi.errors`: text written by the app goes to the `rtserve.error` logger, a line
    per record (one stream per request, so lines from concurrent requests never mix)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = ""

    def write(self, s: str) -> int:
        data = self._buf + s
        lines = data.split("\n")
        self._buf = lines.pop()
        for line in lines:
            log.error("%s", line)
        return len(s)

    def writelines(self, seq: Iterable[str]) -> None:
        for s in seq:
            self.write(s)

    def flush(self) -> None:
        if self._buf:
            line, self._buf = self._buf, ""
            log.error("%s", line)


class FileWrapper:
    """`wsgi.file_wrapper`: a regular file is sent by the conductor with os.sendfile
    (from its current position); anything else is iterated in blocks of `blksize`."""

    __slots__ = ("filelike", "blksize")

    def __init__(self, filelike: Any, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> Iterator[bytes]:
        read = self.filelike.read
        size = self.blksize
        while True:
            data = read(size)
            if not data:
                return
            yield data

    def fileno(self) -> int:
        return self.filelike.fileno()

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()

    def file_body(self) -> FileBody | None:
        """A FileBody when the file can be sent with sendfile, else None."""
        try:
            fd = self.filelike.fileno()
            st = os.fstat(fd)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            offset = self.filelike.tell()
        except (AttributeError, OSError, ValueError):
            offset = 0
        return FileBody(self, offset, max(0, st.st_size - offset))


class _EmptyInput:
    """`wsgi.input` of a request without a body: shared by all such requests, which is
    safe because it has no state at all (no position, no buffer, no attributes to set);
    an io.BytesIO(b"") per request cost more than any other single environ entry."""

    __slots__ = ()

    def read(self, size: int | None = -1) -> bytes:
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return []

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def readinto(self, buffer: Any) -> int:
        return 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass


_EMPTY_INPUT = _EmptyInput()


# ---- start_response -----------------------------------------------------------------


_status_codes: dict[str, int] = {}  # "200 OK" -> 200: the status strings apps use are few


def _status_code(status: Any) -> int:
    """The code of a WSGI status string ("200 OK"); ValueError for anything else."""
    if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit() or (
        len(status) > 3 and status[3] != " "
    ):
        raise ValueError(f"invalid WSGI status {status!r}")
    code = int(status[:3])
    if code < 100:
        raise ValueError(f"invalid WSGI status {status!r}")
    if status.__class__ is str and len(_status_codes) < 1024:
        _status_codes[status] = code
    return code


def _response_of(body: Any, status: int, headers: list[tuple[str, str]]) -> Response:
    """A Response around the app's own (already copied) header list: no second copy."""
    response = _new_response(Response)
    response.status = status
    response.headers = headers
    response.body = body
    return response


# A Response without __init__'s conversions. Response.__new__, not object.__new__: the
# compiled build's Response is a C type that object.__new__ refuses to allocate.
_new_response = Response.__new__


class _Call:
    """Per-request state shared by start_response, write() and the handler."""

    __slots__ = ("status", "headers", "headers_sent", "written", "closed", "done")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False
        self.written: list[bytes] = []
        self.closed = False  # the app's iterable was closed (never close it twice)
        self.done = False  # the Response is built: write() can no longer be honoured

    def start_response(self, status: str, headers: list, exc_info: Any = None):
        """PEP 3333 start_response: a second call is an error unless it carries exc_info,
        and with exc_info after the headers went out the app's exception is re-raised."""
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no traceback cycle
        elif self.status:
            raise AssertionError("start_response called a second time without exc_info")
        code = _status_codes.get(status) if status.__class__ is str else None
        if code is None:
            code = _status_code(status)
        if headers.__class__ is not list and not isinstance(headers, list):
            raise TypeError("WSGI response headers must be a list of (name, value) tuples")
        self.status = code
        self.headers = headers[:]  # names/values are validated when encoded (CR/LF/NUL)
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write() callable: data is kept and sent before the returned iterable
        (buffered for transmission, as PEP 3333 allows); the headers count as sent."""
        if not self.status:
            raise AssertionError("write() before start_response")
        if self.done:
            raise RuntimeError("write() while the returned iterable is being sent")
        if data.__class__ is not bytes:
            if isinstance(data, str):
                raise TypeError("write() takes bytes, not str")
            data = bytes(data)
        if data:
            self.headers_sent = True
            self.written.append(data)


class _StreamBody:
    """The app's iterable, streamed by the worker; `close()` reaches the app's iterable
    (worker.py calls it in a finally, so also when the client went away)."""

    __slots__ = ("_head", "_it", "_result", "_errors", "_closed")

    def __init__(self, head: list[bytes], it: Iterator, result: Any, errors: ErrorStream):
        self._head = head
        self._it = it
        self._result = result
        self._errors = errors
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        self._head = []
        yield from self._it

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            _close(self._result)
        finally:
            self._errors.flush()


def _close(result: Any) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _join(chunks: Iterable[Any]) -> bytes:
    try:
        return b"".join(chunks)
    except TypeError:
        raise TypeError("a WSGI response body must be an iterable of bytes") from None


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.__class__ is str and name.lower() == "content-length":
            v = value.strip() if isinstance(value, str) else ""
            return int(v) if v.isdigit() and v.isascii() else None
    return None


# ---- the adapter ----------------------------------------------------------------------


def parse_route_deadlines(entries: Iterable[str]) -> dict[str, float]:
    """`["/score=20", ...]` -> {"/score": 20.0}; ConfigError names the bad entry."""
    out: dict[str, float] = {}
    for entry in entries:
        prefix, sep, ms = entry.partition("=")
        prefix = prefix.strip()
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if not sep or not prefix.startswith("/") or not value > 0:
            raise ConfigError(f"invalid value for route_deadline: {entry!r} (want /PREFIX=MS)")
        out[prefix] = value
    return out


def parse_fallbacks(entries: Iterable[str]) -> dict[str, Response]:
    """`['/score=200:{"decision":"review"}']` -> {"/score": Response}. A body that parses
    as JSON is sent as application/json, anything else as text/plain."""
    # An env var value that is not a JSON list is split on commas; a prefix always starts
    # with '/', so a piece that does not is the rest of the previous entry's body.
    joined: list[str] = []
    for entry in entries:
        if joined and not entry.lstrip().startswith("/"):
            joined[-1] += "," + entry
        else:
            joined.append(entry)
    out: dict[str, Response] = {}
    for entry in joined:
        prefix, sep, rest = entry.partition("=")
        prefix = prefix.strip()
        status_s, sep2, body = rest.partition(":")
        status_s = status_s.strip()
        if (
            not sep
            or not sep2
            or not prefix.startswith("/")
            or not (status_s.isdigit() and status_s.isascii() and 100 <= int(status_s) <= 599)
        ):
            raise ConfigError(
                f"invalid value for fallback: {entry!r} (want /PREFIX=STATUS:BODY)"
            )
        try:
            json.loads(body)
        except ValueError:
            ctype = "text/plain; charset=utf-8"
        else:
            ctype = "application/json"
        out[prefix] = Response(body.encode("utf-8"), int(status_s), None, ctype)
    return out


def _as_path_info(path: str) -> str:
    """A path as PEP 3333 wants it: percent-decoded bytes, as latin-1 text."""
    if "%" in path:
        return unquote_to_bytes(path).decode("latin-1")
    return path


class WSGIApp:
    """Serve a WSGI callable: routing by path prefix on the conductor, the app on workers."""

    def __init__(self, app: WSGICallable, cfg: Config | None = None) -> None:
        cfg = cfg if cfg is not None else Config()
        if not callable(app):
            raise TypeError(f"{app!r} is not a WSGI callable")
        self.app = app
        self.cfg = cfg
        root = cfg.root_path.rstrip("/")
        if root and not root.startswith("/"):
            raise ConfigError(f"invalid value for root_path: {cfg.root_path!r} (starts with /)")
        self.root_path = _as_path_info(root.encode("utf-8").decode("latin-1"))
        try:
            self.proxies = ForwardedPolicy(cfg.forwarded_allow_ips)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        processes = cfg.processes
        multiprocess = (os.cpu_count() or 1) > 1 if processes == "auto" else int(processes) > 1
        host, port = _bound_host_port(cfg.bind)
        self._base: dict[str, Any] = {
            "SCRIPT_NAME": self.root_path,
            "SERVER_NAME": host,
            "SERVER_PORT": port,
            "wsgi.version": (1, 0),
            "wsgi.multithread": True,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,  # the whole body was read before the app runs
            "wsgi.url_scheme": "http",
        }
        # The environ builder: `_environ`, or on a TLS server `_tls_environ`. An attribute
        # chosen once, not a method replaced on the instance, which the compiled build's
        # classes forbid (docs/compiled.md).
        self.environ: Callable[..., dict[str, Any]] = self._environ
        if cfg.certfile:  # every connection of this server is TLS: constants, set once
            self._base["wsgi.url_scheme"] = "https"
            self._base["HTTPS"] = "on"
            self.environ = self._tls_environ
        # The keys every request sets, present already: the copy is sized for the whole
        # environ, so filling it in never grows (rehashes) the dict.
        for key in _PER_REQUEST_KEYS:
            self._base[key] = ""
        self._peer: tuple[Any, str, str] = (object(), "", "0")  # the last client's strings
        self._hosts: dict[str, tuple[str, str]] = {}  # Host value -> (name, port or "")
        # id(parser head) -> (that head, its environ without the per-request keys)
        self._templates: dict[int, tuple[Any, dict[str, Any]]] = {}
        deadlines = parse_route_deadlines(cfg.route_deadline)
        fallbacks = parse_fallbacks(cfg.fallback)
        handler = self.handle
        self.default_route = Route("wsgi", handler, deadlines.get("/"), fallbacks.get("/"))
        prefixes = (set(deadlines) | set(fallbacks)) - {"/"}
        routes = []
        for prefix in prefixes:
            match = _as_path_info(prefix.encode("utf-8").decode("latin-1"))
            route = Route(
                "wsgi:" + prefix, handler, deadlines.get(prefix), fallbacks.get(prefix)
            )
            routes.append((match.rstrip("/") if match != "/" else match, route))
        routes.sort(key=lambda pr: len(pr[0]), reverse=True)  # longest prefix wins
        self._prefixes: tuple[tuple[str, Route], ...] = tuple(routes)

    # ---- conductor side -------------------------------------------------------------

    def resolve(self, request: Request) -> Route:
        """The Route of the longest configured prefix of the path (segment-wise), else the
        default route (the server's deadline_ms applies to it)."""
        prefixes = self._prefixes
        if not prefixes:
            return self.default_route
        path = request.raw_path  # request.path is decoded as UTF-8 text; PEP 3333 wants bytes
        if "%" in path:
            path = _as_path_info(path)
        for prefix, route in prefixes:
            if path.startswith(prefix):
                n = len(prefix)
                if len(path) == n or path[n] == "/":
                    return route
        return self.default_route

    def routes(self) -> list[Route]:
        """The default route and every prefix route (for the route-deadline metrics)."""
        return [self.default_route] + [r for _, r in self._prefixes]

    # ---- worker side ----------------------------------------------------------------

    def _environ(self, request: Request, errors: Any = None) -> dict[str, Any]:
        """The PEP 3333 environ for a request (`environ` on a plain server).

        A request whose head the parser took from its cache (`request.head`, the same
        object for every request with those head bytes) gets a copy of the environ made
        for that head the first time, with only the per-request keys filled in: every
        other key is a function of the head and this app's settings.
        """
        head = request.head
        if head is not None:
            entry = self._templates.get(id(head))
            if entry is not None and entry[0] is head:  # the entry holds head: id not reused
                env = entry[1].copy()
                self._request_keys(env, request, errors)
                return env
        env = self._base.copy()  # the per-server constants, url_scheme "http" included
        # Headers first: one cached lookup per name gives its key ("HTTP_USER_AGENT",
        # "CONTENT_TYPE", or "" for names never mapped); a repeated name is the rare case.
        keys = _header_keys
        for name, value in request.raw_headers:
            try:
                key = keys[name]  # a subscript, not .get(): no method call per header
            except KeyError:
                key = _header_key(name)
            if not key:
                continue
            if key in env:
                if key == "CONTENT_TYPE":
                    env[key] = value  # the last one, as before
                else:
                    env[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
            else:
                env[key] = value
        if request.content_length is not None:
            env["CONTENT_LENGTH"] = str(request.content_length)
        elif request.chunked:
            env["CONTENT_LENGTH"] = str(len(request.body))  # de-chunked by the server
        if request.chunked:
            env.pop("HTTP_TRANSFER_ENCODING", None)  # the app sees the de-chunked body
        env["REQUEST_METHOD"] = request.method  # any token, case kept (RFC 9110 9.1)
        path = request.raw_path  # decoded once here, as PEP 3333 says (never twice)
        if "%" in path:
            path = unquote_to_bytes(path).decode("latin-1")
        root = self.root_path
        if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            path = path[len(root):]
        env["PATH_INFO"] = path
        env["QUERY_STRING"] = request.query_string
        env["SERVER_PROTOCOL"] = request.version
        env["RAW_URI"] = env["REQUEST_URI"] = request.target
        remote_addr = self._request_keys(env, request, errors)
        forwarded = "HTTP_X_FORWARDED_FOR" in env or "HTTP_X_FORWARDED_PROTO" in env or (
            "HTTP_FORWARDED" in env
        )
        if forwarded:
            self._forwarded(env, remote_addr)
        host = env.get("HTTP_HOST")
        if host:
            split = self._hosts.get(host)
            if split is None:
                split = _split_host(host)
                if len(self._hosts) < 1024:
                    self._hosts[host] = split
            env["SERVER_NAME"] = split[0]
            env["SERVER_PORT"] = split[1] or (
                "443" if env["wsgi.url_scheme"] == "https" else "80"
            )
        if head is not None and not forwarded:  # proxy headers depend on the peer: no template
            templates = self._templates
            if len(templates) >= _TEMPLATES_MAX:
                templates.clear()
            template = env.copy()
            for key in _TEMPLATE_BLANKS:
                template[key] = ""  # never a request's objects: the keys stay, sized
            templates[id(head)] = (head, template)
        return env

    def _request_keys(self, env: dict[str, Any], request: Request, errors: Any) -> str:
        """Fill the keys that differ between requests with the same head (those a template
        leaves blank, `_TEMPLATE_BLANKS`): body, error stream, request, peer; returns
        REMOTE_ADDR."""
        body = request.body
        env["wsgi.input"] = io.BytesIO(body) if body else _EMPTY_INPUT
        env["wsgi.errors"] = errors if errors is not None else ErrorStream()
        env["rtserve.request"] = request
        peer = self._peer
        if request.client is not peer[0]:
            peer = self._new_peer(request.client)
        env["REMOTE_ADDR"] = peer[1]
        env["REMOTE_PORT"] = peer[2]
        return peer[1]

    def _new_peer(self, client: Any) -> tuple[Any, str, str]:
        """REMOTE_ADDR and REMOTE_PORT of a new connection's client: one entry, swapped
        atomically (workers share it), since consecutive requests mostly share a client."""
        addr = str(client[0]) if client else ""
        if addr == "unix":
            addr = ""
        port = str(client[1]) if client and len(client) > 1 else "0"
        peer = self._peer = (client, addr, port)
        return peer

    def _tls_environ(self, request: Request, errors: Any = None) -> dict[str, Any]:
        """`environ` on a TLS server: plus the connection's mod_ssl keys (SSL_PROTOCOL,
        SSL_CIPHER, SSL_CLIENT_S_DN ...; docs/tls.md), computed once per connection."""
        env = self._environ(request, errors)
        try:
            env.update(request.tls_info.environ)
        except AttributeError:  # a request made by hand, not read from a TLS connection
            pass
        return env

    def _forwarded(self, env: dict[str, Any], peer: str) -> None:
        """Trusted proxy headers: the client's address and port, and the scheme."""
        fhost, fport, fscheme = self.proxies.resolve(
            peer or "unix",
            env.get("HTTP_FORWARDED"),
            env.get("HTTP_X_FORWARDED_FOR"),
            env.get("HTTP_X_FORWARDED_PROTO"),
        )
        if fhost is not None:
            env["REMOTE_ADDR"] = fhost
            env["REMOTE_PORT"] = str(fport) if fport is not None else "0"
        if fscheme is not None:
            env["wsgi.url_scheme"] = fscheme

    def handle(self, request: Request) -> Response:
        """The Route handler (worker thread): call the app, build the Response."""
        errors = ErrorStream()
        env = self.environ(request, errors)
        call = _Call()
        try:
            result = self.app(env, call.start_response)
        except BaseException:
            errors.flush()
            raise
        if result.__class__ is list and call.status and not call.written:
            # The common case, a list of bytes: one join, nothing to close.
            try:
                body = b"".join(result)
            except TypeError:
                body = None
            if body and (not errors._buf):
                call.closed = call.headers_sent = call.done = True
                return _response_of(body, call.status, call.headers)
        try:
            response = self._response(request, call, result, errors)
        except BaseException:
            try:
                if not call.closed:
                    call.closed = True
                    _close(result)
            finally:
                errors.flush()
            raise
        call.done = True
        return response

    def _response(
        self, request: Request, call: _Call, result: Any, errors: ErrorStream
    ) -> Response:
        if result.__class__ is FileWrapper and call.status and not call.written:
            fbody = result.file_body()
            if fbody is not None:
                errors.flush()
                call.headers_sent = True
                return _response_of(fbody, call.status, call.headers)
        written = call.written
        if isinstance(result, list | tuple):
            body = _join(written + list(result) if written else result)
            return self._complete(request, call, result, body, errors)
        # Pull up to the first non-empty chunk: the app may call start_response lazily,
        # and may still change its mind with exc_info until then.
        it = iter(result)
        first = b""
        for chunk in it:
            if chunk:
                first = chunk
                break
        else:
            return self._complete(request, call, result, _join(written), errors)
        if not call.status:
            raise RuntimeError("the WSGI app yielded a body before calling start_response")
        if first.__class__ is not bytes:
            if isinstance(first, str):
                raise TypeError("a WSGI response body must be an iterable of bytes, not str")
            first = bytes(first)
        length = _content_length(call.headers)
        if length is not None and sum(map(len, written)) + len(first) >= length:
            # All the body its Content-Length announces: PEP 3333 lets the server stop
            # iterating here, and a bytes body is one send instead of a stream.
            body = _join(written + [first]) if written else first
            return self._complete(request, call, result, body[:length], errors)
        call.headers_sent = True
        stream = _StreamBody(written + [first], it, result, errors)
        return _response_of(stream, call.status, call.headers)

    def _complete(
        self, request: Request, call: _Call, result: Any, body: bytes, errors: ErrorStream
    ) -> Response:
        """A fully produced body: close the app's iterable now and answer with bytes."""
        call.closed = True
        try:
            _close(result)
        finally:
            errors.flush()
        if not call.status:
            raise RuntimeError("the WSGI app returned without calling start_response")
        call.headers_sent = True
        if request.method == "HEAD" and not body and _content_length(call.headers) is not None:
            # An empty iterable keeps the app's Content-Length on the HEAD answer.
            return _response_of((), call.status, call.headers)
        return _response_of(body, call.status, call.headers)


def _split_host(host: str) -> tuple[str, str]:
    """'example.com:8080' -> ('example.com', '8080'); '[::1]:80' -> ('::1', '80')."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


def _bound_host_port(bind: str) -> tuple[str, str]:
    """SERVER_NAME/PORT for requests without a Host header (HTTP/1.0)."""
    if bind.startswith("unix:"):
        return "localhost", "80"
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "0.0.0.0", port


__all__ = ["ErrorStream", "FileWrapper", "WSGIApp", "parse_fallbacks", "parse_route_deadlines"]
