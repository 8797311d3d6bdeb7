"""Debian tools the observability tests drive (chromium, prometheus, promtool): found on
PATH, or installed with `apt-get install -y` once per test session; a test skips, with
apt's own words as the reason, only when the install itself fails."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest

APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


@functools.cache
def _apt_install(package: str, recommends: bool) -> str:
    """Install `package`; '' on success, else why not (the last lines apt printed)."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available on this machine"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=APT_ENV, capture_output=True, text=True, timeout=900,
                              stdin=subprocess.DEVNULL)

    args = ["apt-get", "install", "-y", "-q", package]
    if not recommends:
        args.append("--no-install-recommends")
    res = run(*args)
    if res.returncode != 0:  # a new machine may not have fetched the package lists yet
        run("apt-get", "update", "-q")
        res = run(*args)
    if res.returncode != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        return f"apt-get install -y {package} failed: {tail}"
    return ""


def require(binary: str, package: str, recommends: bool = True) -> str:
    """The path of `binary`, installing Debian `package` if it is missing (else skip).

    `recommends=False` leaves out what the package only recommends (prometheus would
    bring a node exporter that its install script tries to start as a service)."""
    path = shutil.which(binary)
    if path is None:
        why = _apt_install(package, recommends)
        path = shutil.which(binary)
        if path is None:
            pytest.skip(why or f"{package} installed but {binary} is not on PATH")
    return path
