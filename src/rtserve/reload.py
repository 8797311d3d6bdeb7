"""SIGHUP under a supervisor: the settings a reload gives, and the rolling restart.

Supervisor process, its main thread (the supervisor's loop; supervisor.py). A SIGHUP
re-reads the config file (`reload_config`: flags and environment as at start win over
it, the listener settings wait for a full restart), then replaces the children one slot
at a time (`start_reload`, then `advance_reload` every turn of the supervisor's loop):
start the new child on the slot's listener, wait until it beats (it is accepting), then
SIGTERM the old one, so the port never lacks a listener. A config file that no longer
parses leaves everything as it was (logged). The supervisor aborts a reload whose new
child ends before it was ready (`Supervisor._on_exit`), and drops one when it stops.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import SETTINGS, Config, ConfigError

if TYPE_CHECKING:
    from .supervisor import Child, Supervisor

log = logging.getLogger("rtserve.error")

# Settings the supervisor itself applies once: they shape the listeners and the slots.
RESTART_ONLY = ("bind", "backlog", "reuse_port", "share_listener", "processes")


@dataclass(eq=False)
class Reload:
    """A rolling restart in progress: slots still to replace and the child booting now."""

    queue: list[int] = field(default_factory=list)
    pending: Child | None = None


def reload_config(cfg: Config, overrides: dict[str, Any]) -> tuple[Config, list[str]]:
    """The settings a SIGHUP gives: flags (`overrides`) and environment as at start, the
    config file as it is now. Returns the new Config and one line per change; a change to
    a RESTART_ONLY setting is reported and not applied. ConfigError if the file is bad."""
    new = Config(**overrides)
    keep = {name: getattr(cfg, name) for name in RESTART_ONLY}
    notes = []
    for s in SETTINGS:
        old_value, new_value = getattr(cfg, s.name), getattr(new, s.name)
        if old_value == new_value:
            continue
        if s.name in keep:
            notes.append(f"{s.name} changed to {new_value!r}: needs a restart, "
                         f"keeping {old_value!r}")
        else:
            notes.append(f"{s.name}: {old_value!r} -> {new_value!r}")
    return new.replace(**keep), notes


def start_reload(sup: Supervisor) -> None:
    """SIGHUP: the new settings, then a rolling restart of every slot (or, during one,
    the same restart starting over, so every slot ends with the newest code)."""
    if sup.stopping:
        return
    try:
        cfg, notes = reload_config(sup.cfg, sup.overrides)
    except ConfigError as exc:
        log.error("SIGHUP: %s: settings and processes left as they were", exc)
        return
    for note in notes:
        log.info("SIGHUP: %s", note)
    sup.apply(cfg)  # the supervisor's own timeouts now, every setting to the new children
    slots = [s.index for s in sup.slots]
    if sup.reload is None:
        sup.reload = Reload(queue=slots)
        log.info("SIGHUP: rolling restart of %d processes", len(slots))
    else:  # a reload during a reload: go round once more, with the newest code
        sup.reload.queue = slots
        log.info("SIGHUP: rolling restart starts over")


def advance_reload(sup: Supervisor) -> None:
    """One step of the rolling restart, each turn of the supervisor's loop: a new child
    that beat takes its slot and the old one gets SIGTERM; then the next slot's new child
    starts. Slots restarting after crashes are passed over (they load the new code)."""
    rl = sup.reload
    if rl is None or sup.stopping:
        return
    new = rl.pending
    if new is not None:
        if not new.ready_at:
            return
        slot = sup.slots[new.slot]
        old = slot.child
        slot.child = new
        slot.restart_at = 0.0
        rl.pending = None
        if old is not None:
            old.retiring = True
            log.info("reload: process %d replaces %d (slot %d)", new.pid, old.pid, slot.index)
            sup.kill(old, signal.SIGTERM)
    while rl.pending is None and rl.queue:
        slot = sup.slots[rl.queue.pop(0)]
        if slot.sock is None:  # restarting after crashes: it will load the new code
            continue
        rl.pending = sup.spawn(slot)
    if rl.pending is None:
        log.info("reload complete")
        sup.reload = None
