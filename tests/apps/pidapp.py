"""Test app for several processes: every answer says which process served it (X-Pid).

`/` answers at once; `/slow?seconds=S` sleeps S seconds on a worker first (a request that
is in flight when a drain starts); `&mark=PATH` appends a line to PATH when it starts.
"""

import os
import time

from rtserve import App, Request, Response

app = App()


@app.get("/")
def index(request: Request) -> Response:
    return Response.text("ok\n", headers={"X-Pid": str(os.getpid())})


@app.get("/slow")
def slow(request: Request) -> Response:
    seconds = min(float(request.query_param("seconds", "1")), 30.0)
    mark = request.query_param("mark", "")
    if mark:  # tell the test this request is running (it syncs on the file, not a sleep)
        with open(mark, "a") as f:
            f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return Response.text(f"slept {seconds:g}\n", headers={"X-Pid": str(os.getpid())})
