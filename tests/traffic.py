"""Known traffic for the observability tests: an app, a script of requests whose outcome
(answer, fallback, 504, shed) is forced by events, not by timing, and the counts it must
leave in /metrics, /dashboard.json, the page and Prometheus."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from rtserve import App, Request, Response
from tests.helpers import Client, wait_for

REVIEW = Response.json({"decision": "review"})
# Settings the traffic needs: 10 admitted at most, so 10 held handlers make the next
# request a `limit` shed (503); 12 workers so the held and the stuck ones never starve it.
SETTINGS = {"threads": 12, "max_inflight": 10, "dashboard": True}


class Holds:
    """Handlers wait here until the test lets them go; `entered` counts arrivals."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def hold(self) -> None:
        self.entered.release()
        self.release.wait(30)

    def wait_entered(self, n: int) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=30), "a held handler never started"


@dataclass
class Traffic:
    """What `drive` sent, per route: requests answered, and how."""

    fast: int = 120
    score_ok: int = 10
    fallbacks: int = 5  # /score held past its 20 ms deadline: the fallback
    strict_ok: int = 5
    timeouts: int = 3  # /strict held past its 20 ms deadline, no fallback: 504
    held: int = 10  # /hold requests that fill the admission limit
    sheds: int = 2  # /fast while the limit is full: 503
    stalls: Holds = field(default_factory=Holds)
    limit: Holds = field(default_factory=Holds)

    @property
    def requests(self) -> dict[str, int]:
        return {"/fast": self.fast + self.sheds, "/score": self.score_ok + self.fallbacks,
                "/strict": self.strict_ok + self.timeouts, "/hold": self.held}

    def app(self) -> App:
        app = App()
        stalls, limit = self.stalls, self.limit

        @app.get("/fast")
        def fast(request: Request) -> Response:
            return Response.text("fast\n")

        @app.post("/score", deadline_ms=20, fallback=REVIEW)
        def score(request: Request) -> Response:
            if request.query_param("stall"):
                stalls.hold()
            return Response.json({"decision": "approve"})

        @app.get("/strict", deadline_ms=20)
        def strict(request: Request) -> Response:
            if request.query_param("stall"):
                stalls.hold()
            return Response.text("in time\n")

        @app.get("/hold")
        def hold(request: Request) -> Response:
            limit.hold()
            return Response.text("held\n")

        return app

    def drive(self, server) -> None:
        """Send everything; return once every handler has finished."""
        addr = server.address
        c = Client(addr)
        for _ in range(self.fast):
            assert c.request("GET", "/fast")[0] == 200
        for _ in range(self.score_ok):
            assert c.request("POST", "/score", body=b"{}")[0] == 200
        for _ in range(self.strict_ok):
            assert c.request("GET", "/strict")[0] == 200
        # Late: the handler waits until released, so the conductor must answer at respond_by.
        for _ in range(self.fallbacks):
            status, headers, _ = c.request("POST", "/score?stall=1", body=b"{}")
            assert status == 200 and headers["x-rtserve-fallback"] == "deadline"
        for _ in range(self.timeouts):
            assert c.request("GET", "/strict?stall=1")[0] == 504
        # Release the held handlers only once the conductor has recorded every late answer:
        # a handler let go the moment its 504 reached the client can finish before the
        # conductor records that request, and the worker's serialisation then overwrites
        # the request's status (seen: a 504 counted as 200; a conductor race, see the
        # issue 13 report). Traffic here must stay known, so wait for the records.
        requests = server.metrics.requests

        def recorded(key: tuple, n: int) -> bool:
            h = requests.get(key)
            return h is not None and h.count == n

        wait_for(lambda: recorded(("GET", "/strict", 504), self.timeouts)
                 and recorded(("POST", "/score", 200), self.score_ok + self.fallbacks))
        self.stalls.release.set()
        wait_for(lambda: server.metrics.late_dropped == self.fallbacks + self.timeouts)
        wait_for(lambda: gauge(server, "rtserve_busy_workers") == 0)
        # Fill the admission limit with held handlers; the next requests are shed.
        holders = [Client(addr) for _ in range(self.held)]
        for h in holders:
            h.send("GET", "/hold")
        self.limit.wait_entered(self.held)
        for _ in range(self.sheds):
            status, headers, _ = c.request("GET", "/fast")
            assert status == 503 and "retry-after" in headers
        self.limit.release.set()
        for h in holders:
            assert h.recv()[0] == 200
            h.close()
        c.close()


def gauge(server, name: str) -> float:
    """A gauge's value as /metrics would render it now (read on the calling thread)."""
    for gname, _help, read in server.metrics.gauges:
        if gname == name:
            return read()
    raise KeyError(name)


Samples = dict[tuple[str, frozenset], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> {(sample name, labels): value} (prometheus_client's parser)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def route_count(samples: Samples, route: str, status: str | None = None) -> float:
    """Requests of a route in the duration histogram (all methods; one status if given)."""
    total = 0.0
    for (name, labels), v in samples.items():
        lab = dict(labels)
        if (name == "http_server_request_duration_seconds_count"
                and lab.get("http_route") == route
                and (status is None or lab.get("http_response_status_code") == status)):
            total += v
    return total


def route_buckets(samples: Samples, route: str) -> list[tuple[float, float]]:
    """The route's cumulative buckets summed over methods and statuses: [(le, count)]."""
    acc: dict[float, float] = {}
    for (name, labels), v in samples.items():
        lab = dict(labels)
        if name == "http_server_request_duration_seconds_bucket" and \
                lab.get("http_route") == route:
            le = float(lab["le"])
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs (an independent
    implementation: the test's reference, not the code under test)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le
