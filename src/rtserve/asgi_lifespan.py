"""The ASGI lifespan protocol: startup before the server accepts, shutdown after it drained.

The app's lifespan coroutine runs on its event-loop thread for the whole life of the
server; the main thread (the conductor-to-be) waits on `startup()` before it listens and
on `shutdown()` at teardown. Per the ASGI "Lifespan" spec (2.0, with `state`):

- `lifespan.startup.complete` -> serve; `lifespan.startup.failed` -> StartupFailed with
  the app's message (the CLI exits 3, like an app that cannot be imported);
- an app that raises before answering the startup event does not speak lifespan: with
  `--lifespan auto` (the default) that is logged at info and serving goes on, as on
  uvicorn; with `--lifespan on` it is a failed startup;
- `state` is the dict the app fills at startup; each request's scope gets a shallow copy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from .errors import StartupFailed

log = logging.getLogger("rtserve.error")

_LIFESPAN_ASGI = {"version": "3.0", "spec_version": "2.0"}


class Lifespan:
    """One app's lifespan on one event loop."""

    def __init__(self, app: Any, mode: str, state: dict[str, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.mode = mode
        self.state = state
        self.loop = loop
        self.supported = False  # the app answered the startup event
        self.failed = False
        self.message = ""
        self._asked_startup = False
        self._shutdown_asked: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()

    # ---- main thread ------------------------------------------------------------------

    def startup(self) -> None:
        """Run the startup phase; raises StartupFailed with the app's message."""
        if self.mode == "off":
            return
        asyncio.run_coroutine_threadsafe(self._main(), self.loop)
        self._started.wait()
        if self.failed:
            raise StartupFailed(self.message or "lifespan startup failed")

    def shutdown(self, timeout: float) -> None:
        """Ask for shutdown and wait up to `timeout` s for `lifespan.shutdown.complete`."""
        if not self.supported or self.failed or self._stopped.is_set():
            return
        event = self._shutdown_asked
        if event is not None:
            self.loop.call_soon_threadsafe(event.set)
        if not self._stopped.wait(timeout):
            log.warning("ASGI lifespan shutdown did not finish within %.1f s", timeout)

    # ---- event-loop thread ------------------------------------------------------------

    async def _main(self) -> None:
        self._shutdown_asked = asyncio.Event()
        scope = {"type": "lifespan", "asgi": _LIFESPAN_ASGI, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:  # noqa: BLE001 - the app is the boundary
            if self._started.is_set():
                if not self.failed:
                    log.error("exception in the ASGI lifespan protocol", exc_info=exc)
            elif self.mode == "auto":
                log.info("ASGI 'lifespan' protocol appears unsupported (%s: %s)",
                         type(exc).__name__, exc)
            else:
                log.error("exception in the ASGI lifespan startup", exc_info=exc)
                self.failed = True
                self.message = f"{type(exc).__name__}: {exc}"
        finally:
            self._started.set()
            self._stopped.set()

    async def _receive(self) -> dict[str, Any]:
        if not self._asked_startup:
            self._asked_startup = True
            return {"type": "lifespan.startup"}
        assert self._shutdown_asked is not None
        await self._shutdown_asked.wait()
        return {"type": "lifespan.shutdown"}

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.supported = True
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self.supported = True
            self.failed = True
            self.message = str(message.get("message", ""))
            self._started.set()
        elif kind == "lifespan.shutdown.complete":
            self._stopped.set()
        elif kind == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", message.get("message", ""))
            self._stopped.set()
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r}")
