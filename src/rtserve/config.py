"""Every setting in one declarative table (waitress `_params`, gunicorn `Setting` style).

The table feeds keyword arguments (`Config(threads=4)`), CLI flags (`--threads 4`) and
environment variables (`RTSERVE_THREADS=4`). An unknown or invalid setting is rejected
with a message that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting is unknown or its value is invalid; the message names it."""


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _bind(v: str) -> bool:
    if v.startswith("unix:"):
        return len(v) > 5
    host, sep, port = v.rpartition(":")
    return bool(sep) and port.isdigit() and 0 <= int(port) <= 65535


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _as_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    return [str(p) for p in v]


@dataclass(frozen=True)
class Setting:
    """One row of the table: name, caster, default, help, and an optional validator."""

    name: str
    type: Callable[[Any], Any]
    default: Any
    help: str
    validator: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] | None = None
    repeatable: bool = False  # CLI flag may be given several times (list value)
    section: str = "server"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RTSERVE_" + self.name.upper()

    def cast(self, value: Any) -> Any:
        try:
            v = self.type(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid value for {self.name}: {value!r} ({exc})") from None
        if self.choices is not None and v not in self.choices:
            raise ConfigError(
                f"invalid value for {self.name}: {value!r} (choose from {', '.join(self.choices)})"
            )
        if self.validator is not None and not self.validator(v):
            raise ConfigError(f"invalid value for {self.name}: {value!r}")
        return v


SETTINGS: tuple[Setting, ...] = (
    # -- listener and pool
    Setting("bind", str, "127.0.0.1:8080", "address to listen on, HOST:PORT", _bind),
    Setting("threads", int, 8, "worker threads that run handlers", _positive),
    Setting("backlog", int, 1024, "listen(2) backlog", _positive),
    Setting("max_connections", int, 10000, "open connections before accepting pauses", _positive),
    Setting("reuse_port", _as_bool, False, "set SO_REUSEPORT on the listener"),
    # -- timeouts (seconds)
    Setting("header_timeout", float, 10.0, "seconds to receive a request head (408)", _positive),
    Setting("body_timeout", float, 30.0, "seconds to receive a request body (408)", _positive),
    Setting("keepalive_timeout", float, 5.0, "idle keep-alive seconds before close", _positive),
    Setting("write_timeout", float, 30.0, "seconds a stalled write may last", _positive),
    Setting("graceful_timeout", float, 30.0, "seconds to finish in-flight work on stop",
            _non_negative),
    # -- limits
    Setting("max_body_size", int, 1 << 20, "largest request body in bytes (413)", _non_negative),
    Setting("max_request_line", int, 8192, "longest request line in bytes (414)", _positive),
    Setting("max_header_block", int, 65536, "largest header block in bytes (431)", _positive),
    Setting("max_header_count", int, 100, "most header fields (431)", _positive),
    Setting("pipeline_readahead", int, 65536,
            "bytes of pipelined requests buffered before reading pauses", _positive),
    Setting("stream_high_water", int, 262144,
            "bytes a streamed response may buffer before the worker waits", _positive),
    # -- deadlines and admission
    Setting("deadline_ms", float, 0.0, "default request deadline in ms (0 = none)",
            _non_negative, section="deadlines"),
    Setting("deadline_margin_ms", float, 1.0, "fallback is sent this long before the deadline",
            _non_negative, section="deadlines"),
    Setting("route_deadline", _as_list, [], "PREFIX=MS deadline for a path prefix (WSGI apps)",
            repeatable=True, section="deadlines"),
    Setting("fallback", _as_list, [],
            "PREFIX=STATUS:BODY fallback for a path prefix (WSGI apps); BODY may be JSON",
            repeatable=True, section="deadlines"),
    Setting("codel_target_ms", float, 5.0, "CoDel queue-wait target M in ms (0 = off)",
            _non_negative, section="deadlines"),
    Setting("codel_interval_ms", float, 100.0, "CoDel interval N in ms", _positive,
            section="deadlines"),
    Setting("max_inflight", int, 0, "requests queued + running before 503 (0 = unlimited)",
            _non_negative, section="deadlines"),
    Setting("adaptive_limit", str, "off", "adaptive concurrency limit", None,
            ("off", "aimd", "gradient2"), section="deadlines"),
    Setting("cpu_inflight_ms", float, 3.0,
            "CPU time of handlers started but not finished before more wait (0 = off)",
            _non_negative, section="deadlines"),
    Setting("switch_interval_ms", float, 0.5,
            "sys.setswitchinterval in ms (GIL hand-off; see docs/deadlines.md)",
            _positive, section="deadlines"),
    # -- WSGI and proxies
    Setting("root_path", str, "", "SCRIPT_NAME for WSGI apps mounted below /", section="wsgi"),
    Setting("forwarded_allow_ips", _as_list, ["127.0.0.1"],
            "addresses whose X-Forwarded-*/Forwarded headers are trusted ('*' = all)",
            section="wsgi"),
    # -- the application's interface, and ASGI
    Setting("interface", str, "auto", "how the app is called: detected (auto), or forced",
            None, ("auto", "asgi", "wsgi", "native"), section="interface"),
    Setting("lifespan", str, "auto",
            "ASGI lifespan: auto (used if the app speaks it), on (required), off", None,
            ("auto", "on", "off"), section="interface"),
    Setting("asgi_loops", int, 1, "event loop threads that run an ASGI app's coroutines",
            _positive, section="interface"),
    Setting("asgi_loop", str, "auto", "event loop for ASGI apps (auto: uvloop if installed)",
            None, ("auto", "asyncio", "uvloop"), section="interface"),
    Setting("asgi_concurrency", int, 100,
            "ASGI requests running at once before more wait in the queue", _positive,
            section="interface"),
    # -- processes
    Setting("processes", str, "1", "worker processes (a number or 'auto')",
            lambda v: v == "auto" or (v.isdigit() and int(v) >= 1), section="processes"),
    Setting("drain_seconds", float, 0.0, "seconds /readyz reports not ready before stopping",
            _non_negative, section="processes"),
    Setting("max_requests", int, 0, "recycle a process after this many requests (0 = never)",
            _non_negative, section="processes"),
    Setting("max_requests_jitter", int, 0, "random extra requests added to max_requests",
            _non_negative, section="processes"),
    Setting("heartbeat_timeout", float, 30.0,
            "seconds without a heartbeat before the supervisor kills and replaces a process",
            _positive, section="processes"),
    Setting("share_listener", _as_bool, False,
            "processes accept from one inherited listener instead of one SO_REUSEPORT "
            "listener each", section="processes"),
    # -- logging and observability
    Setting("log_level", str, "info", "logging level", None,
            ("critical", "error", "warning", "info", "debug"), section="logging"),
    Setting("access_log", _as_bool, False, "write an access log line per request",
            section="logging"),
    Setting("access_log_format", str, "", "access log format string (default: combined + timings)",
            section="logging"),
    Setting("log_config", str, "", "a logging.config.dictConfig JSON file", section="logging"),
    Setting("health_endpoints", _as_bool, True, "answer /livez, /readyz, /metrics on the conductor",
            section="logging"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


class Config:
    """Resolved settings: defaults, then environment, then explicit keyword arguments."""

    def __init__(self, _env: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        env = os.environ if _env is None else _env
        values: dict[str, Any] = {}
        for s in SETTINGS:
            if s.env in env:
                values[s.name] = s.cast(env[s.env])
            else:
                values[s.name] = s.cast(s.default) if s.default is not None else None
        for name, value in kwargs.items():
            setting = BY_NAME.get(name)
            if setting is None:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = setting.cast(value)
        self._values = values
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # only called for unknown names
        raise AttributeError(f"unknown setting {name!r}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **kwargs: Any) -> Config:
        merged = dict(self._values)
        merged.update(kwargs)
        return Config(_env={}, **merged)


def settings_markdown() -> str:
    """The settings reference (docs/configuration.md), generated from the table."""
    lines = [
        "# Configuration",
        "",
        "Every setting is a keyword argument (`Config(threads=4)`, `serve(app, threads=4)`),",
        "a command-line flag (`--threads 4`) and an environment variable",
        "(`RTSERVE_THREADS=4`). Precedence: flag or keyword, then environment, then default.",
        "An unknown setting or an invalid value is an error that names it.",
        "This page is generated from `src/rtserve/config.py`"
        " (`python -m rtserve.config > docs/configuration.md`).",
        "",
    ]
    sections: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        sections.setdefault(s.section, []).append(s)
    for section, rows in sections.items():
        lines += [f"## {section}", "", "| flag | environment | default | meaning |",
                  "|---|---|---|---|"]
        for s in rows:
            default = s.default if s.default not in ("", []) else "—"
            choices = f" ({', '.join(s.choices)})" if s.choices else ""
            again = " (repeatable)" if s.repeatable else ""
            lines.append(
                f"| `{s.flag}` | `{s.env}` | `{default}` | {s.help}{choices}{again} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_markdown(), end="")
