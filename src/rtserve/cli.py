"""`rtserve module:app [options]`: the command line, generated from the settings table."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import logging.config
import os
import sys
from typing import Any

from .config import SETTINGS, Config, ConfigError


class AppImportError(Exception):
    """The application named on the command line cannot be loaded."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rtserve",
        description="A real-time HTTP/1.1 server: every request answered before its deadline.",
        epilog="Every option can also be set as RTSERVE_<NAME> in the environment.",
    )
    p.add_argument("app", help="MODULE:ATTR, an rtserve App, an ASGI app or a WSGI callable; "
                               "MODULE:factory() calls a factory")
    sections: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        group = sections.get(s.section)
        if group is None:
            group = sections[s.section] = p.add_argument_group(s.section)
        kw: dict[str, Any] = {"dest": s.name, "default": None, "help": f"{s.help} "
                              f"(default: {s.default!r}; env {s.env})"}
        if s.choices:
            kw["choices"] = s.choices
        if s.repeatable:
            kw["action"] = "append"
        elif s.type.__name__ == "_as_bool":
            kw["action"] = argparse.BooleanOptionalAction
        group.add_argument(s.flag, **kw)
    return p


def load_app(spec: str) -> Any:
    """Import `module:attr` (or `module:factory()`); `module` alone means `module:app`."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppImportError(f"cannot import module {module_name!r}: {exc}") from None
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if call:
        obj = obj()
    return obj


def configure_logging(cfg: Config) -> None:
    if cfg.log_config:
        with open(cfg.log_config) as f:
            logging.config.dictConfig(json.load(f))
        return
    level = getattr(logging, cfg.log_level.upper())
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"))
    root = logging.getLogger("rtserve")
    root.handlers[:] = [err]
    root.setLevel(level)
    root.propagate = False
    acc = logging.getLogger("rtserve.access")
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    acc.handlers[:] = [out]
    acc.setLevel(logging.INFO)
    acc.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "app" and v is not None}
    try:
        cfg = Config(**overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(cfg)
    from .tls import TLSFileError, build_context, requested

    if requested(cfg):
        # Checked before anything starts (the supervisor's children build their own).
        try:
            build_context(cfg)
        except TLSFileError as exc:
            print(f"rtserve: error: {exc}", file=sys.stderr)
            return 3
        except ConfigError as exc:
            parser.error(str(exc))
    procs = (os.cpu_count() or 1) if cfg.processes == "auto" else int(cfg.processes)
    if procs > 1:  # the supervisor never imports the app: its first children check it
        from .supervisor import run_supervisor

        return run_supervisor(args.app, cfg, procs, overrides)
    try:
        app = load_app(args.app)
    except AppImportError as exc:
        print(f"rtserve: error: {exc}", file=sys.stderr)
        return 3
    from .server import Server, as_dispatcher, freeze_startup_objects

    try:
        dispatcher = as_dispatcher(app, cfg)  # WSGI settings (route_deadline...) checked here
    except ConfigError as exc:
        parser.error(str(exc))
    if os.environ.get("RTSERVE_SUPERVISED"):  # a child started by supervisor.py
        from .child import run_child

        return run_child(dispatcher, cfg)
    server = Server(dispatcher, cfg)
    log = logging.getLogger("rtserve.error")
    freeze_startup_objects()
    code = server.serve()
    log.info("rtserve stopped (exit %d)", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
