"""The WSGI (PEP 3333) adapter: any WSGI callable served with rtserve's deadlines.

`WSGIApp(app, cfg)` is what the conductor routes with: `resolve(request)` (its
PrefixRoutes', prefixes.py) picks a Route by the longest configured path prefix
(`route_deadline`, `fallback`), with estimates per method and path, so a WSGI app gets the
same deadline, fallback and admission enforcement as native routes (conductor thread). The
Route's handler runs on a worker: it takes the environ from wsgi_environ.py, calls the app
and turns what it returned into an rtserve Response:

- a list/tuple of bytes (or an iterable whose first chunk already fills its Content-Length)
  becomes a bytes body: the fast path, one send;
- a `wsgi.file_wrapper` over a regular file becomes a `FileBody`, sent with os.sendfile by
  the conductor;
- any other iterable is streamed by the worker (chunked when it has no Content-Length), and
  its `close()` is always called, also when the client went away mid-stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .app import Route
from .config import Config, ConfigError
from .prefixes import PrefixRoutes, parse_fallbacks, parse_route_deadlines
from .proxy import ForwardedPolicy
from .request import Request
from .response import Response
from .wsgi_environ import EnvironBuilder, ErrorStream, FileWrapper, as_path_info

log = logging.getLogger("rtserve.error")

WSGICallable = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


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
        self.root_path = as_path_info(root.encode("utf-8").decode("latin-1"))
        try:
            self.proxies = ForwardedPolicy(cfg.forwarded_allow_ips)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._environs = EnvironBuilder(cfg, self.root_path, self.proxies)
        # The environ of a request (worker threads): the builder's, chosen once for TLS.
        self.environ: Callable[..., dict[str, Any]] = self._environs.environ
        # Routing (conductor): by prefix, with each path's own estimates (prefixes.py);
        # `resolve` is the router's own method, no wrapper call per request.
        self.prefix_routes = PrefixRoutes(cfg, "wsgi", self.handle, wsgi=True)
        self.resolve: Callable[[Request], Route] = self.prefix_routes.resolve
        self.default_route = self.prefix_routes.default
        self.paths = self.prefix_routes.paths

    def routes(self) -> list[Route]:
        """The default route and every prefix route (for the route-deadline metrics)."""
        return self.prefix_routes.all()

    # ---- worker side ----------------------------------------------------------------

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


__all__ = ["ErrorStream", "FileWrapper", "WSGIApp", "parse_fallbacks", "parse_route_deadlines"]
