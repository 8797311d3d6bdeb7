"""Every setting in one declarative table (waitress `_params`, gunicorn `Setting` style).

The table feeds keyword arguments (`Config(threads=4)`), CLI flags (`--threads 4`),
environment variables (`RTSERVE_THREADS=4`) and an optional TOML file (`--config FILE`,
`threads = 4`), which the supervisor re-reads on SIGHUP. An unknown or invalid setting is
rejected with a message that names it.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
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


_JSON_LIST_START = re.compile(r"\[\s*[\"\]]")


def _as_list(v: Any) -> list[str]:
    """A list setting from a list, or from text: a JSON list of strings (`["a,b", "c"]`,
    for items that contain commas) or else comma-separated items (`a, c`).

    Text is JSON when it starts with `["` or is `[]` (spaces allowed), so a bracketed IPv6
    address (`[::1]`) is still one comma-separated item.
    """
    if isinstance(v, str):
        text = v.strip()
        if _JSON_LIST_START.match(text):
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON list: {exc}") from None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError("not a JSON list of strings")
            return items
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
    secret: bool = False  # never on a command line the supervisor builds (child_command.py)

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
    Setting("config", str, "", "a TOML file of settings (name = value); the supervisor "
            "re-reads it on SIGHUP"),
    # -- listener and pool
    Setting("bind", str, "127.0.0.1:8080", "address to listen on, HOST:PORT", _bind),
    Setting("threads", int, 8, "worker threads that run handlers", _positive),
    Setting("backlog", int, 1024, "listen(2) backlog", _positive),
    Setting("max_connections", int, 10000, "open connections before accepting pauses", _positive),
    Setting("reuse_port", _as_bool, False, "set SO_REUSEPORT on the listener"),
    Setting("defer_accept", int, 1,
            "seconds the kernel holds a new TCP connection back until its first bytes come "
            "(TCP_DEFER_ACCEPT), which are then read at accept; 0 = off", _non_negative),
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
    # -- memory (memory.py: glibc only, a no-op elsewhere; see docs/reliability.md, "Soak")
    Setting("malloc_trim_idle", float, 10.0,
            "seconds with no request in flight before the conductor calls malloc_trim(0), "
            "once per idle period (0 = never)", _non_negative),
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
    Setting("codel_budget_share", float, 0.5,
            "under a standing queue a request with a deadline may wait this share of its "
            "budget if that is longer than the CoDel target (0 = the target alone)",
            lambda v: 0.0 <= v <= 1.0, section="deadlines"),
    Setting("max_inflight", int, 0, "requests queued + running before 503 (0 = unlimited)",
            _non_negative, section="deadlines"),
    Setting("adaptive_limit", str, "off", "adaptive concurrency limit", None,
            ("off", "aimd", "gradient2"), section="deadlines"),
    Setting("shed_with_fallback", _as_bool, False,
            "answer a shed request (CoDel, limit) with its route's fallback, not 503",
            section="deadlines"),
    Setting("cpu_inflight_ms", float, 3.0,
            "CPU time of handlers started but not finished before more wait (0 = off)",
            _non_negative, section="deadlines"),
    Setting("handoff_ahead_ms", float, 0.25,
            "estimated handler time that may wait in the pool's queue behind busy workers "
            "(cheap routes only; 0 = one request per free worker)", _non_negative,
            section="deadlines"),
    Setting("handoff_batch", _as_bool, True,
            "hand the requests of cheap routes (--handoff-ahead-ms) started in one loop turn "
            "to one worker as a batch: one thread woken per turn, not one per request",
            section="deadlines"),
    Setting("handoff_yield", _as_bool, True,
            "after a loop turn that accepted connections hands its batch to the pool, yield "
            "the CPU (sched_yield) so a worker runs it before the conductor's next turn, not "
            "when the conductor next blocks", section="deadlines"),
    Setting("path_estimates", int, 256,
            "distinct method and path pairs of a WSGI or ASGI app that get handler-time and "
            "CPU estimates of their own (CPU gate, hand-ahead, dead on arrival); a full "
            "table starts over; 0 = one estimate per route prefix", _non_negative,
            section="deadlines"),
    Setting("switch_interval_ms", float, 0.5,
            "sys.setswitchinterval in ms (GIL hand-off; see docs/deadlines.md)",
            _positive, section="deadlines"),
    Setting("relax_after_s", float, 1.0,
            "seconds with nothing at stake (no deadline configured, no request with a client "
            "budget, no light request beside CPU-bound handlers) before the CPU gate opens "
            "and the switch interval becomes --relaxed-switch-interval-ms, for throughput; "
            "the next stake undoes it at once (0 = never relax)", _non_negative,
            section="deadlines"),
    Setting("relaxed_switch_interval_ms", float, 5.0,
            "sys.setswitchinterval in ms while relaxed (--relax-after-s; 5 = CPython's "
            "default)", _positive, section="deadlines"),
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
    Setting("asgi_threads", int, 0,
            "threads for an ASGI app's sync code (anyio's: FastAPI's def endpoints), "
            "per loop; 0 = --threads", _non_negative, section="interface"),
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
    # -- TLS (see docs/tls.md); files are read at start, and again on SIGHUP
    Setting("certfile", str, "", "PEM certificate chain; set it to serve HTTPS", section="tls"),
    Setting("keyfile", str, "", "PEM private key of the certificate (default: in the certfile)",
            section="tls"),
    Setting("keyfile_password", str, "",
            "password of an encrypted keyfile (prefer the environment or a password file: a "
            "flag shows in ps)", section="tls", secret=True),
    Setting("keyfile_password_file", str, "",
            "file whose first line is the keyfile's password", section="tls"),
    Setting("ca_certs", str, "",
            "PEM CA certificates that client certificates must chain to (mutual TLS)",
            section="tls"),
    Setting("client_cert", str, "none", "ask clients for a certificate (mutual TLS)", None,
            ("none", "optional", "required"), section="tls"),
    Setting("ssl_ciphers", str, "",
            "OpenSSL cipher list for TLS 1.2 (default: OpenSSL's; TLS 1.3 suites are "
            "OpenSSL's)", section="tls"),
    Setting("tls_min_version", str, "1.2", "oldest TLS version accepted", None, ("1.2", "1.3"),
            section="tls"),
    Setting("tls_handshake_timeout", float, 5.0,
            "seconds a TLS handshake may take before the connection is closed", _positive,
            section="tls"),
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
    Setting("dashboard", _as_bool, False,
            "serve a live page at /dashboard and its data at /dashboard.json (answered by "
            "the conductor, like /metrics)", section="logging"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a TOML file, as the environment would give them; ConfigError if the
    file cannot be read or names an unknown setting.

    Scalars become text (`threads = 1.5` fails as `RTSERVE_THREADS=1.5` does, instead of
    int() quietly truncating it); lists stay lists. `config` cannot be set from a file.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config file {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r}: {exc}") from None
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in BY_NAME or name == "config":
            raise ConfigError(f"config file {path!r}: unknown setting {name!r}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, (list, str)):
            value = str(value)
        out[name] = value
    return out


class Config:
    """Resolved settings: keyword arguments, then environment, then the config file, then
    defaults (the first that sets a value wins)."""

    def __init__(
        self, _env: Mapping[str, str] | None = None, _read_file: bool = True, **kwargs: Any
    ) -> None:
        env = os.environ if _env is None else _env
        for name in kwargs:
            if name not in BY_NAME:
                raise ConfigError(f"unknown setting {name!r}")
        path = kwargs.get("config", env.get(BY_NAME["config"].env, ""))
        path = BY_NAME["config"].cast(path)
        from_file = read_config_file(path) if path and _read_file else {}
        values: dict[str, Any] = {}
        for s in SETTINGS:
            if s.name in kwargs:
                values[s.name] = s.cast(kwargs[s.name])
            elif s.env in env:
                values[s.name] = s.cast(env[s.env])
            elif s.name in from_file:
                try:
                    values[s.name] = s.cast(from_file[s.name])
                except ConfigError as exc:
                    raise ConfigError(f"config file {path!r}: {exc}") from None
            else:
                values[s.name] = s.cast(s.default) if s.default is not None else None
        self._values = values
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:  # only called for unknown names
        raise AttributeError(f"unknown setting {name!r}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def replace(self, **kwargs: Any) -> Config:
        """These settings changed, every other one as resolved here (no file re-read)."""
        merged = dict(self._values)
        merged.update(kwargs)
        return Config(_env={}, _read_file=False, **merged)  # every value is explicit


def settings_markdown() -> str:
    """The settings reference (docs/configuration.md), generated from the table."""
    lines = [
        "# Configuration",
        "",
        "Every setting is a keyword argument (`Config(threads=4)`, `serve(app, threads=4)`),",
        "a command-line flag (`--threads 4`), an environment variable (`RTSERVE_THREADS=4`)",
        "and a line of the TOML file named by `--config` (`threads = 4`). Precedence: flag",
        "or keyword, then environment, then the config file, then default.",
        "An unknown setting or an invalid value is an error that names it.",
        "",
        "A list setting given as text (a variable, a non-repeatable flag) is a JSON list of",
        "strings when it starts with `[\"` (`RTSERVE_FALLBACK='[\"/a=200:{\\\"x\\\":1}\"]'`),",
        "for items that contain commas; otherwise it is split on commas. In the file, write",
        "a TOML list (`route_deadline = [\"/score=20\", \"/batch=200\"]`).",
        "",
        "Under the supervisor (`--processes N`), SIGHUP re-reads the config file and restarts",
        "the processes one by one with the result (see docs/deploy.md, \"Reload\"). Flags and",
        "`RTSERVE_*` variables are fixed for the life of the process and keep winning over",
        "the file; `bind`, `backlog`, `reuse_port`, `share_listener` and `processes` need a",
        "restart. A single process reads the file once, at start.",
        "",
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
            secret = " (secret: not passed on child command lines)" if s.secret else ""
            choices = f" ({', '.join(s.choices)})" if s.choices else ""
            again = " (repeatable)" if s.repeatable else ""
            lines.append(
                f"| `{s.flag}` | `{s.env}` | `{default}` | {s.help}{choices}{again}{secret} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_markdown(), end="")
