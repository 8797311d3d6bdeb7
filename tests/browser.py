"""Headless Chromium driven over the DevTools protocol on a pipe (stdlib only).

`--remote-debugging-pipe` makes Chromium read protocol commands from fd 3 and write
answers and events to fd 4, each a JSON message ended by a NUL byte (what Puppeteer's
`pipe: true` uses): no WebSocket client and no chromedriver are needed.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
    "--mute-audio", "--remote-debugging-pipe",
)


_TRAMPOLINE = (
    "import fcntl, os, sys\n"
    "r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n"
    "os.dup2(r, 3); os.dup2(w, 4); os.close(r); os.close(w)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class BrowserError(RuntimeError):
    """The browser answered a command with an error, or went away."""


class Browser:
    """One headless Chromium with a fresh profile, and one page attached to it."""

    def __init__(self, exe: str, width: int = 1400, height: int = 900) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="rtserve-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [*FLAGS, f"--user-data-dir={self._profile.name}",
                f"--window-size={width},{height}", "about:blank"]
        # A tiny Python trampoline moves the two pipe ends onto fds 3 and 4 (via fds >= 10,
        # since either end may already be 3 or 4), then becomes Chromium.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TRAMPOLINE, str(to_browser_r), str(from_browser_w), exe,
             *args], pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.events: list[dict] = []  # protocol events (console, network, exceptions)
        self._next_id = 0
        self._replies: dict[int, queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.page(domain + ".enable")
        self.page("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # ---- the protocol -------------------------------------------------------------------

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_browser, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" not in msg:  # an event
                    if len(self.events) < 10000:
                        self.events.append(msg)
                    continue
                q = self._replies.get(msg["id"])
                if q is not None:
                    q.put(msg)
        for q in list(self._replies.values()):
            q.put({"error": {"message": "the browser closed its pipe"}})

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self._stderr) < 200:
                self._stderr.append(line)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its answer's `result`."""
        with self._lock:
            self._next_id += 1
            mid = self._next_id
            q: queue.SimpleQueue = queue.SimpleQueue()
            self._replies[mid] = q
            msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
            if session:
                msg["sessionId"] = session
            os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout)
        except queue.Empty:
            raise BrowserError(f"{method}: no answer in {timeout} s; stderr: "
                               f"{b''.join(self._stderr[-5:])!r}") from None
        finally:
            self._replies.pop(mid, None)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def page(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        return self.send(method, params, self.session, timeout)

    # ---- what the tests use --------------------------------------------------------------

    def requested_urls(self) -> list[str]:
        """Every URL the page asked the network for, in order."""
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def errors(self) -> list[str]:
        """Uncaught exceptions and console/browser errors (CSP violations land here)."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(str(p.get("args")))
        return out

    def goto(self, url: str) -> None:
        self.page("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        res = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll until `expression` is truthy in the page; returns its value."""
        end = time.monotonic() + timeout
        value = None
        while time.monotonic() < end:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None  # the page is still navigating
            if value:
                return value
            time.sleep(0.05)
        raise BrowserError(f"{expression!r} still falsy after {timeout} s (last {value!r})")

    def screenshot(self, path: str, full_page: bool = True) -> None:
        """A PNG of the page (the whole scroll height when `full_page`)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth,"
                                 " document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.page("Page.captureScreenshot", params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
