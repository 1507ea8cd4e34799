"""The failover controller's plan: which steps a node takes when its role changes.

Pure: a role change in, an ordered tuple of steps out. The agent executes them (and times
each one); whoever decides the role — ctsync's VRRP speaker, keepalived's notify FIFO or
``ctsync failover`` from a notify script — only says which role the node should have.

The order is the point of this module:

- MASTER: **commit first**, then take the virtual addresses. keepalived + conntrackd run
  the commit after the addresses are up, and connections whose packets reach the new
  master before their state is there are dropped as INVALID (reference/failover-testing.md).
  Then what conntrackd's primary-backup.sh does after its commit: forget the external
  cache (it is now in our kernel), re-read our kernel into the internal cache (one
  mark-and-sweep instead of -f + -R, so the cache is never empty while peers compare
  digests), and send everything to the peers (-B).
- BACKUP: ask the master for a full transfer (-n); if we were master, shorten the timeouts
  of the entries we owned so that those the new master does not carry expire (-t), and
  nothing else: entries a peer put into our kernel (``disable-external-cache``) are never
  purged, or a later failover would find an empty table.
- FAULT: as conntrackd's fault branch, the purge (-t) when we were master.
- STOP (keepalived shut down): nothing; the node keeps its state and its caches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Final


class Role(StrEnum):
    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    STOP = "STOP"


class Step(StrEnum):
    COMMIT = "commit"  # external caches -> kernel (bounded wait)
    ADOPT = "adopt"  # disable-external-cache: entries peers injected become ours
    ADDRESSES = "addresses"  # VIPs + GARP/NA (done by the VRRP speaker once COMMIT is done)
    FLUSH_EXTERNAL = "flush-external"
    RESYNC_KERNEL = "resync"  # internal cache <- kernel table (mark and sweep)
    BULK_SEND = "bulk-send"
    REQUEST_RESYNC = "request-resync"
    PURGE = "purge"  # our own entries get failover.purge-timeout


# Words operators and keepalived use for the roles: conntrackd's primary-backup.sh takes
# primary|backup|fault; keepalived's notify tail and FIFO say MASTER|BACKUP|FAULT|STOP and,
# for an instance removed at reload, DELETED (which it otherwise reports as FAULT).
_ROLE_WORDS: Final = {
    "master": Role.MASTER,
    "primary": Role.MASTER,
    "backup": Role.BACKUP,
    "fault": Role.FAULT,
    "stop": Role.STOP,
    "deleted": Role.FAULT,
}


def parse_role(word: str) -> Role:
    """A role from a command line or FIFO word; ValueError names the accepted words."""
    try:
        return _ROLE_WORDS[word.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown state {word!r}: master (or primary), backup, fault or stop"
        ) from None


def parse_notify(args: Sequence[str]) -> tuple[Role, str | None]:
    """The role in ``ctsync failover`` arguments: ``primary|master|backup|fault`` as for
    primary-backup.sh, or keepalived's generic notify tail ``INSTANCE|GROUP NAME STATE
    PRIORITY`` (returned with ``"GROUP NAME"`` / ``"INSTANCE NAME"`` as the source)."""
    if len(args) == 1:
        return parse_role(args[0]), None
    if len(args) in (3, 4) and args[0].upper() in ("INSTANCE", "GROUP"):
        return parse_role(args[2]), f"{args[0].upper()} {args[1]}"
    raise ValueError(
        "expected one of master|primary|backup|fault|stop, or keepalived's notify"
        " arguments: INSTANCE|GROUP NAME STATE PRIORITY"
    )


def parse_fifo_line(line: str) -> tuple[str, str, Role] | None:
    """A keepalived notify FIFO line ``TYPE "NAME" STATE PRIORITY`` -> (type, name, role).

    None for lines that are not a state change (``MASTER_RX_LOWER_PRI``, priority
    changes, LVS events) or that do not parse: the FIFO is read, never trusted to be tidy.
    """
    match = _FIFO_LINE.fullmatch(line.strip())
    if match is None or match["state"].lower() not in _ROLE_WORDS:
        return None
    return match["kind"], match["name"], _ROLE_WORDS[match["state"].lower()]


_FIFO_LINE: Final = re.compile(r'(?P<kind>INSTANCE|GROUP) "(?P<name>[^"]+)" (?P<state>\S+) -?\d+')


def plan(
    old: Role | None,
    new: Role,
    *,
    speaker: bool,
    inject: bool,
    purge: bool,
) -> tuple[Step, ...]:
    """The steps for ``old -> new`` (``old`` None at start-up).

    ``speaker``: ctsync's VRRP speaker holds the virtual addresses (else keepalived does,
    and has added them already by the time it tells us). ``inject``: the peers' entries are
    already in our kernel (``disable-external-cache``), so there is nothing to commit, but
    they must become ours. ``purge``: ``failover.purge-timeout`` is set.

    Idempotent by design: the same role again is no steps (keepalived repeats itself,
    e.g. after a reload, and notify scripts can run twice).
    """
    if old == new:
        return ()
    if new is Role.MASTER:
        steps = [Step.ADOPT] if inject else [Step.COMMIT]
        if speaker:
            steps.append(Step.ADDRESSES)
        if not inject:
            steps.append(Step.FLUSH_EXTERNAL)
        steps += [Step.RESYNC_KERNEL, Step.BULK_SEND]
        return tuple(steps)
    was_master = old is Role.MASTER
    if new is Role.BACKUP:
        return (Step.REQUEST_RESYNC, Step.PURGE) if was_master and purge else (Step.REQUEST_RESYNC,)
    if new is Role.FAULT:
        return (Step.PURGE,) if was_master and purge else ()
    return ()
