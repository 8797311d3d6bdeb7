"""The benchmark logic as a native rtserve App (routes, deadline and fallback on /score)."""

from __future__ import annotations

import os

from apps import logic
from rtserve import App, Request, Response

app = App()
#: BENCH_INLINE=1: /hello runs inline on the conductor (the rtserve-inline bench row).
INLINE = os.environ.get("BENCH_INLINE") == "1"

#: What a scoring service answers when the model is late: send to manual review.
FALLBACK = Response.json({"decision": "review"})


# (inline passed only when asked: a --baseline run serves this file with an older rtserve)
@app.get("/hello", **({"inline": True} if INLINE else {}))
def hello(request: Request) -> Response:
    """Workloads A and B: a constant text body."""
    return Response.text("Hello, world!")


@app.post("/score", deadline_ms=50, fallback=FALLBACK)
def score(request: Request) -> Response:
    """Workloads C and E: ~1 ms CPU, 200 ms stall on 1% of requests, 50 ms deadline."""
    try:
        out = logic.score(request.body)
    except ValueError:
        return Response.text("bad", status=400)
    return Response(out, content_type="application/json")


@app.get("/big")
def big(request: Request) -> Response:
    """Workload D: 1 MiB body."""
    return Response(logic.BIG, content_type="application/octet-stream")
