"""The native App's routing over real sockets: decoded paths, encoded slashes, methods.

Routes match `request.path`, the percent-decoded path; `request.raw_path` keeps what was
sent. An encoded slash is data inside a segment, never a separator (docs/parser.md,
"Paths"). Methods are case-sensitive tokens (RFC 9110 9.1): 501 for a method no route
implements, 405 with Allow for one another route implements, 404 for an unknown path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from rtserve import App, Response
from rtserve.request import Request
from tests.helpers import connect, read_response_file, running_server


def make_app() -> App:
    app = App()

    def describe(request: Request) -> Response:
        return Response.json(
            {"path": request.path, "raw_path": request.raw_path, "target": request.target}
        )

    app.route("/echo", ("GET", "POST"))(describe)
    app.get("/a/b")(describe)
    app.get("/caf\u00e9")(describe)
    app.get("/100%")(describe)
    app.route("/pot", ("BREW",))(describe)
    return app


@pytest.fixture(scope="module")
def addr() -> Iterator[tuple[str, int]]:
    with running_server(make_app()) as address:
        yield address


def exchange(addr: tuple[str, int], *requests: bytes) -> list[tuple[int, dict, bytes]]:
    """Send requests on one keep-alive connection, one at a time; their responses."""
    out = []
    with connect(addr) as sock:
        f = sock.makefile("rb")
        for raw in requests:
            sock.sendall(raw)
            out.append(read_response_file(f))
    return out


def get(target: bytes, method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.mark.parametrize(
    "target,path",
    [
        (b"/%65cho", "/echo"),
        (b"/%65%63%68%6F", "/echo"),
        (b"/a/%62", "/a/b"),
        (b"/%61/b?x=%2F", "/a/b"),
        (b"/caf%C3%A9", "/caf\u00e9"),
        (b"/caf%c3%a9", "/caf\u00e9"),
        (b"/100%25", "/100%"),
    ],
)
def test_routes_match_the_decoded_path(addr: tuple[str, int], target: bytes, path: str) -> None:
    ((status, _, body),) = exchange(addr, get(target))
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == path
    assert seen["raw_path"] == target.decode().partition("?")[0]
    assert seen["target"] == target.decode()


def test_plain_path_is_its_own_raw_path(addr: tuple[str, int]) -> None:
    ((status, _, body),) = exchange(addr, get(b"/a/b"))
    assert status == 200 and json.loads(body)["raw_path"] == "/a/b"


@pytest.mark.parametrize("target", [b"/a%2Fb", b"/a%2fb", b"/a%2F%62", b"/%61%2F%62"])
def test_an_encoded_slash_is_not_a_segment_separator(addr: tuple[str, int], target: bytes) -> None:
    """`/a%2Fb` is one segment `a/b`: it does not reach route `/a/b` (404, not 405)."""
    ((status, _, _),) = exchange(addr, get(target))
    assert status == 404


def test_a_percent_escape_is_decoded_once(addr: tuple[str, int]) -> None:
    """`%252F` is the text `%2F`, not a slash: no route `/a%2Fb` exists, and none is hit."""
    (r1, r2) = exchange(addr, get(b"/a%252Fb"), get(b"/100%2525"))
    assert r1[0] == 404
    assert r2[0] == 404  # decodes to `/100%25`, which is not `/100%`


def test_unknown_method_is_501_on_any_path_and_keeps_the_connection(
    addr: tuple[str, int],
) -> None:
    responses = exchange(
        addr,
        get(b"/echo", b"FROB"),
        get(b"/nowhere", b"FROB"),
        get(b"/echo", b"get"),  # case-sensitive: not GET
        get(b"/pot", b"brew"),  # nor is brew BREW
        get(b"/echo"),  # and the same connection still serves
    )
    assert [status for status, _, _ in responses] == [501, 501, 501, 501, 200]
    assert "allow" not in responses[0][1]


def test_a_method_another_route_implements_is_405_with_allow(addr: tuple[str, int]) -> None:
    (r405, r404, brew) = exchange(
        addr,
        get(b"/a/b", b"POST"),
        get(b"/nowhere", b"POST"),
        get(b"/pot", b"BREW"),
    )
    assert (r405[0], r405[1].get("allow")) == (405, "GET, HEAD")
    assert r404[0] == 404
    assert brew[0] == 200  # a custom token method is routed like any other


def test_head_is_implemented_where_get_is(addr: tuple[str, int]) -> None:
    with connect(addr) as sock:
        sock.sendall(get(b"/%65cho", b"HEAD"))
        status, headers, body = read_response_file(sock.makefile("rb"), head_only=True)
    assert status == 200 and int(headers["content-length"]) > 0


def test_405_on_a_decoded_path_lists_its_methods(addr: tuple[str, int]) -> None:
    ((status, headers, _),) = exchange(addr, get(b"/p%6Ft", b"GET"))
    assert (status, headers.get("allow")) == (405, "BREW")
