"""bench/tlsconn.c, the B-over-TLS generator, against a real rtserve TLS server on 127.0.0.1.

The benchmark's claim is that every connection of B over TLS is a full handshake (wrk
resumed its sessions). These tests hold the generator to it: without --resume no
handshake is resumed and the server counts one handshake per connection; with --resume
(what wrk does) the same server does resume, so the check can fail. Skipped when the C
client cannot be built here (no compiler or OpenSSL headers); the bench installs them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import server_thread, wait_for
from tests.test_tls import Certs, tls_app, tls_settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import tlsconn  # noqa: E402


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tlsconn") / "tlsconn"
    got = subprocess.run(["cc", "-O2", "-o", str(out), str(tlsconn.SOURCE), "-lssl",
                          "-lcrypto"], capture_output=True, text=True, timeout=120)
    if got.returncode:
        pytest.skip(f"bench/tlsconn.c does not build here: {got.stderr[-300:]}")
    return out


def run_client(client: Path, port: int, resume: bool = False) -> dict[str, Any]:
    cmd = tlsconn.command(client, port, 1, 4, "/hello", 50, resume=resume)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return tlsconn.parse(out.stdout)


def test_every_connection_is_a_full_handshake(client: Path, certs: Certs) -> None:
    with server_thread(tls_app(), **tls_settings(certs)) as srv:
        r = run_client(client, srv.address[1])
        # The client counts a handshake when the server's Finished came; the server when
        # the client's did, which the conductor may read a moment after the client exits.
        wait_for(lambda: srv.metrics.tls_handshakes >= r["full_handshakes"],
                 what="the server to count the last handshakes")
        handshakes = srv.metrics.tls_handshakes
    assert r["requests"] > 0
    assert r["errors"] == {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0,
                           "handshake": 0}
    assert r["resumed_handshakes"] == 0
    assert r["full_handshakes"] >= r["requests"]
    # The server saw at least one handshake per answered connection (some of the last
    # ones were cut by the end of the run, after their handshake).
    assert handshakes >= r["full_handshakes"]
    assert r["negotiated"].startswith(f"TLSv1.3 {tlsconn.SUITE} {tlsconn.GROUP} ")
    assert r["negotiated_mixed"] == 0
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert r["handshake_us"]["p50"] <= lat["p50"]
    assert r["client_cpu_s"] > 0


def test_the_same_server_resumes_when_a_session_is_offered(client: Path,
                                                           certs: Certs) -> None:
    """The control: --resume offers each slot's previous session, as wrk does on every
    reconnect, and the server accepts it; so a zero above is the client's doing."""
    with server_thread(tls_app(), **tls_settings(certs)) as srv:
        r = run_client(client, srv.address[1], resume=True)
    assert r["requests"] > 4
    assert r["resumed_handshakes"] > 0
    assert r["full_handshakes"] <= 4  # one per slot: the first connection has no session


def test_parse_refuses_a_resumed_run_that_offered_no_session() -> None:
    line = ('TLSCONN_JSON {"requests": 10, "duration_us": 1000000, "errors": {"status": 0},'
            ' "resumed_handshakes": 3, "offered_resumption": false}')
    with pytest.raises(RuntimeError, match="3 handshakes were resumed"):
        tlsconn.parse(line)
    with pytest.raises(RuntimeError, match="no result"):
        tlsconn.parse("wrk-like noise\n")
