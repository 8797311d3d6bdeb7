"""What a supervised child starts with: its command line and its secret settings, from the
supervisor's Config (the child's whole configuration: see `child_args`). Supervisor
process: supervisor.py calls these at start and on SIGHUP; tested on their own in
tests/test_processes.py and tests/test_tls.py.
"""

from __future__ import annotations

import json
import sys

from .config import SETTINGS, Config


def child_args(app_spec: str, cfg: Config) -> list[str]:
    """The command line of a child: every setting that differs from its default, as a flag.

    Children get RTSERVE_* settings removed from their environment and no --config, so
    these flags are the whole configuration and a child's Config equals the supervisor's
    (processes and config aside). A list that is not a repeatable flag goes as JSON, so
    items with commas survive. Secret settings (the keyfile password) go by environment
    instead (`child_env`): a command line is readable by every user of the machine.
    """
    args = [sys.executable, "-m", "rtserve", app_spec]
    for s in SETTINGS:
        if s.name in ("processes", "config") or s.secret:
            continue
        value = getattr(cfg, s.name)
        if value == s.cast(s.default):
            continue
        if s.repeatable:
            args.extend(f"{s.flag}={item}" for item in value)
        elif s.type.__name__ == "_as_bool":
            args.append(s.flag if value else "--no-" + s.flag[2:])
        elif isinstance(value, list):
            args.append(f"{s.flag}={json.dumps(value)}")
        else:
            args.append(f"{s.flag}={value}")
    return args


def child_env(cfg: Config) -> dict[str, str]:
    """The secret settings that differ from their default, as RTSERVE_* variables."""
    return {
        s.env: str(getattr(cfg, s.name))
        for s in SETTINGS
        if s.secret and getattr(cfg, s.name) != s.cast(s.default)
    }
