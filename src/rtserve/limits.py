"""The Config turned, once, into the numbers the conductor's parts use (ns, bytes, counts).

Built by server.py on the main thread before serving; read-only afterwards, so every
part reads plain attributes instead of converting seconds and milliseconds per request.
"""

from __future__ import annotations

from .config import Config


class Limits:
    """Ready-to-use limits: times in ns, sizes in bytes."""

    __slots__ = (
        "threads", "max_connections", "header_ns", "body_ns", "idle_ns", "write_ns",
        "graceful_ns", "drain_ns", "readahead", "max_request_line", "max_header_block",
        "max_header_count", "max_body_size", "default_deadline_ns", "margin_ns",
        "cpu_cap_ns", "ahead_ns", "health", "access_log", "max_requests", "handshake_ns",
    )

    def __init__(self, cfg: Config, max_requests: int) -> None:
        self.threads = cfg.threads
        self.max_connections = cfg.max_connections
        self.header_ns = int(cfg.header_timeout * 1e9)
        self.body_ns = int(cfg.body_timeout * 1e9)
        self.idle_ns = int(cfg.keepalive_timeout * 1e9)
        self.write_ns = int(cfg.write_timeout * 1e9)
        self.graceful_ns = int(cfg.graceful_timeout * 1e9)
        self.drain_ns = int(cfg.drain_seconds * 1e9)
        self.readahead = cfg.pipeline_readahead
        self.max_request_line = cfg.max_request_line
        self.max_header_block = cfg.max_header_block
        self.max_header_count = cfg.max_header_count
        self.max_body_size = cfg.max_body_size
        self.default_deadline_ns = int(cfg.deadline_ms * 1_000_000)
        self.margin_ns = int(cfg.deadline_margin_ms * 1_000_000)
        self.cpu_cap_ns = int(cfg.cpu_inflight_ms * 1_000_000)
        self.ahead_ns = int(cfg.handoff_ahead_ms * 1_000_000)
        self.health = cfg.health_endpoints
        self.access_log = cfg.access_log
        self.max_requests = max_requests  # with its jitter already drawn (0 = never)
        self.handshake_ns = int(cfg.tls_handshake_timeout * 1e9)
