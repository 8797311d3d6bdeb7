"""The original demo: /hello answers at once, /slow sleeps, /echo echoes, 404 for the rest.

Run it with `make serve`, or `rtserve examples.hello:app --bind 127.0.0.1:8080`.
"""

import time

from rtserve import App, Request, Response

app = App()

HELLO_PAGE = """<!doctype html>
<html><head><title>rtserve</title></head>
<body><h1>Hello from rtserve</h1><p>A real-time HTTP/1.1 server for Python.</p></body>
</html>
"""


@app.get("/hello")
def hello(request: Request) -> Response:
    return Response.html(HELLO_PAGE)


@app.get("/slow")
def slow(request: Request) -> Response:
    """Sleep `?seconds=` (default 2) on a worker; /hello keeps being answered meanwhile."""
    try:
        seconds = float(request.query_param("seconds", "2"))
    except ValueError:
        return Response.text("seconds must be a number\n", 400)
    time.sleep(max(0.0, min(seconds, 60.0)))
    return Response.text(f"slept {seconds:g} s\n")


@app.post("/echo")
def echo(request: Request) -> Response:
    content_type = request.headers.get("content-type", "application/octet-stream")
    return Response(request.body, 200, None, content_type)
