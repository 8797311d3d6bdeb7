"""The PEP 3333 environ, and the objects it carries (wsgi.input, wsgi.errors, file_wrapper).

Worker threads (`EnvironBuilder.environ`, per request); built once by `WSGIApp` at start.
The environ of a request whose head the parser took from its cache is a copy of a template
made for that head, with only the per-request keys filled in (docs/wsgi.md); any other is
built key by key. Trusted proxy headers (`--forwarded-allow-ips`) are applied here, never
templated (they depend on the peer). wsgi.py calls the app with what this builds.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

from .config import Config
from .proxy import ForwardedPolicy
from .request import Request
from .response import FileBody

log = logging.getLogger("rtserve.error")

# Header name (lower case, as parsed) -> environ key; "" for names never mapped:
# Content-Length (CONTENT_LENGTH comes from the parsed length) and names with "_"
# (X_Forwarded_For would collide with X-Forwarded-For).
_header_keys: dict[str, str] = {"content-type": "CONTENT_TYPE", "content-length": ""}


_PER_REQUEST_KEYS = (
    "REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL", "RAW_URI", "REQUEST_URI",
    "REMOTE_ADDR", "REMOTE_PORT", "wsgi.input", "wsgi.errors", "rtserve.request",
)


# The keys `EnvironBuilder._request_keys` fills per request: blank in an environ template
# (what differs between requests with the same head bytes).
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


def as_path_info(path: str) -> str:
    """A path as PEP 3333 wants it: percent-decoded bytes, as latin-1 text."""
    if "%" in path:
        return unquote_to_bytes(path).decode("latin-1")
    return path


class EnvironBuilder:
    """The environ of each request for one WSGI app and its settings (`environ`)."""

    def __init__(self, cfg: Config, root_path: str, proxies: ForwardedPolicy) -> None:
        self.root_path = root_path
        self.proxies = proxies
        processes = cfg.processes
        multiprocess = (os.cpu_count() or 1) > 1 if processes == "auto" else int(processes) > 1
        host, port = bound_host_port(cfg.bind)
        self._base: dict[str, Any] = {
            "SCRIPT_NAME": root_path,
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
        # The builder: `_environ`, or on a TLS server `_tls_environ`. An attribute chosen
        # once, not a method replaced on the instance, which the compiled build's classes
        # forbid (docs/compiled.md).
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
                split = split_host(host)
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


def split_host(host: str) -> tuple[str, str]:
    """'example.com:8080' -> ('example.com', '8080'); '[::1]:80' -> ('::1', '80')."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


def bound_host_port(bind: str) -> tuple[str, str]:
    """SERVER_NAME/PORT for requests without a Host header (HTTP/1.0)."""
    if bind.startswith("unix:"):
        return "localhost", "80"
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "0.0.0.0", port
