"""Workload B over TLS: build and run bench/tlsconn.c, a full TLS handshake per connection.

Runs in the benchmark driver (bench/run.py), never in a server. wrk 4.1 offers each
connection's previous TLS session again when it reconnects, so against a server that
issues session tickets (all three TLS rows do) its B measured abbreviated handshakes:
counted on rtserve's side, 1,477 of 1,542 handshakes of a 3 s `wrk -H "Connection: close"`
run were resumed. tlsconn never offers a session and counts `SSL_session_reused()` on
every handshake, so a run that resumed anything says so.

The client is C (OpenSSL, one epoll thread) so that it costs as little per handshake as
OpenSSL allows, and offers one cipher suite and one group, so every server negotiates the
same. Even so, OpenSSL 3.0's client spends 1.1-1.5 ms of CPU per handshake on the 2-core
test machine (its certificate decoders and algorithm fetches; callgrind), more than
rtserve (1.2 ms) or granian (0.6 ms) spend per connection: every run records the client's
CPU time next to the server's, and docs/tls.md says which B-TLS rows it limited. It is
compiled at bench time into the run's temp dir; the compiler and headers come from Debian
(gcc, libc6-dev, libssl-dev) when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).resolve().parent / "tlsconn.c"
#: Debian packages the build needs: a C compiler, libc headers, OpenSSL's headers.
BUILD_PACKAGES = ("gcc", "libc6-dev", "libssl-dev")
#: What every full handshake must negotiate (the C client offers only these).
SUITE = "TLS_AES_256_GCM_SHA384"
GROUP = "X25519"


def _compile(out: Path) -> subprocess.CompletedProcess[str]:
    cc = shutil.which("cc") or shutil.which("gcc") or "cc"
    return subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(SOURCE), "-lssl",
                           "-lcrypto"], capture_output=True, text=True, timeout=120)


def build(out_dir: Path) -> Path:
    """Compile tlsconn into ``out_dir``; install the build packages with apt-get first if
    the compile fails and this is root. Raises RuntimeError with the reason otherwise."""
    out = out_dir / "tlsconn"
    try:
        got = _compile(out)
    except OSError as exc:  # no compiler at all
        got = subprocess.CompletedProcess([], 127, "", str(exc))
    if got.returncode == 0:
        return out
    if os.geteuid() != 0:
        raise RuntimeError(f"cannot build bench/tlsconn.c (install {' '.join(BUILD_PACKAGES)}):"
                           f" {got.stderr[-500:]}")
    print(f"# building tlsconn failed; installing {' '.join(BUILD_PACKAGES)} with apt-get",
          flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 *BUILD_PACKAGES]):
        step = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if step.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed, so bench/tlsconn.c cannot be "
                               f"built: {step.stderr[-500:]}")
    got = _compile(out)
    if got.returncode:
        raise RuntimeError(f"bench/tlsconn.c does not compile: {got.stderr[-500:]}")
    return out


def command(binary: Path, port: int, seconds: float, connections: int, path: str,
            deadline_ms: float, resume: bool = False) -> list[str]:
    """The client's command line (without the pinning prefix)."""
    return [str(binary), "--port", str(port), "-c", str(connections), "-d", f"{seconds:g}",
            "--path", path, "--timeout", "5", "--deadline-ms", f"{deadline_ms:g}",
            "--ciphersuites", SUITE, "--groups", GROUP, *(["--resume"] if resume else [])]


def parse(stdout: str) -> dict[str, Any]:
    """The client's result (WRK_JSON's fields, see bench/lua/bench.lua, plus the handshake
    facts and the client's CPU time), with ``rps`` and ``real_rps`` as run_wrk adds them.

    Raises RuntimeError when there is no result, or when a handshake was resumed without
    ``--resume`` (the figure would not be what B over TLS claims to measure).
    """
    for line in stdout.splitlines():
        if line.startswith("TLSCONN_JSON "):
            r: dict[str, Any] = json.loads(line[len("TLSCONN_JSON "):])
            break
    else:
        raise RuntimeError(f"tlsconn gave no result: {stdout[-1000:]}")
    if r["resumed_handshakes"] and not r["offered_resumption"]:
        raise RuntimeError(f"tlsconn: {r['resumed_handshakes']} handshakes were resumed "
                           "though no session was offered")
    secs = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / secs
    r["real_rps"] = (r["requests"] - r["errors"]["status"]) / secs
    return r
