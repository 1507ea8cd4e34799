"""Gateway watch (``[[gateway-watch]]``): the pure up/down state machine of a probed gateway.

Like RouterOS's netwatch: a gateway is probed at an interval; ``down-after`` probes lost in
a row take it down, ``up-after`` probes answered in a row bring it up. A state change may
ask for the connections that match the watch's filter to be removed (``flush-on``), so that
they are re-created on the path that works now: connections NATed to a dead uplink's
address never recover by themselves, and a connection pinned by its mark to a fallback
uplink stays there after the preferred one is back.

Pure: the agent passes the time (``now``, monotonic seconds) and the probe outcomes in, and
runs the probes and the removal itself (``ctsync.io.probe``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final


class GatewayState(StrEnum):
    UNKNOWN = "unknown"  # from start until a threshold is first reached
    UP = "up"
    DOWN = "down"


#: Probe outcomes: answered, no answer within the timeout, or an immediate failure
#: (no route, connection refused, the socket cannot be opened, ...).
PROBE_RESULTS: Final = ("ok", "timeout", "error")
#: The state changes a watch can remove connections on (``flush-on``).
FLUSH_EVENTS: Final = ("down", "up")


@dataclass(frozen=True)
class WatchRules:
    """Thresholds and flush policy of one watch (from its ``[[gateway-watch]]`` table)."""

    down_after: int = 3
    up_after: int = 3
    flush_on: frozenset[str] = frozenset({"down"})

    def __post_init__(self) -> None:
        if self.down_after < 1 or self.up_after < 1:
            raise ValueError("down-after and up-after must be at least 1")
        unknown = set(self.flush_on) - set(FLUSH_EVENTS)
        if unknown:
            raise ValueError(f"unknown flush-on event(s): {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class Transition:
    """A state change, and whether the matching connections are to be removed now."""

    old: GatewayState
    new: GatewayState
    at: float
    reason: str
    flush: bool

    @property
    def event(self) -> str:
        """The ``flush-on`` name of the change: ``"down"`` or ``"up"``."""
        return self.new.value


@dataclass(frozen=True)
class FlushReport:
    """What one removal of the matching connections did."""

    event: str  # "down" / "up"
    removed: int
    failed: int  # delete refused, or the connection was already gone
    seconds: float
    at: float  # monotonic time it ended
    error: str | None = None  # the dump or the socket failed: nothing or part removed

    def to_dict(self, now: float, wall: float) -> dict[str, Any]:
        return {
            "event": self.event,
            "removed": self.removed,
            "failed": self.failed,
            "seconds": self.seconds,
            "at": wall - (now - self.at),
            "error": self.error,
        }


@dataclass
class GatewayMachine:
    """One watched gateway: consecutive-outcome counters, state and what it did.

    ``observe`` is called once per probe, in order; it returns a :class:`Transition` when
    the state changes. The first state is reached like any other (``down-after`` failures
    or ``up-after`` answers from ``unknown``). Going down always asks for a flush when
    ``"down"`` is in ``flush-on``, also from ``unknown`` (a node that starts while its
    uplink is dead removes what still points there); going up asks for one only when it
    comes from ``down`` and ``"up"`` is in ``flush-on``: at start there is nothing to move
    back.
    """

    rules: WatchRules
    since: float  # monotonic time of the last state change (or of the start)
    state: GatewayState = GatewayState.UNKNOWN
    ok_run: int = 0  # consecutive answered probes
    fail_run: int = 0  # consecutive lost probes
    probes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBE_RESULTS, 0))
    last_rtt: float | None = None
    last_error: str | None = None
    transitions: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    last_transition: Transition | None = None
    flushes: int = 0
    removed_total: int = 0
    failed_total: int = 0
    last_flush: FlushReport | None = None
    flushing: bool = False

    @property
    def probes_sent(self) -> int:
        return sum(self.probes.values())

    @property
    def probes_lost(self) -> int:
        return self.probes_sent - self.probes["ok"]

    def observe(
        self, now: float, result: str, rtt: float | None = None, error: str | None = None
    ) -> Transition | None:
        """One probe's outcome (``ok``, ``timeout`` or ``error``); a Transition or None."""
        if result not in PROBE_RESULTS:
            raise ValueError(f"unknown probe result {result!r}")
        self.probes[result] += 1
        if result == "ok":
            self.ok_run += 1
            self.fail_run = 0
            self.last_rtt = rtt
        else:
            self.fail_run += 1
            self.ok_run = 0
            if error is not None:
                self.last_error = error
        rules = self.rules
        if self.state != GatewayState.UP and self.ok_run >= rules.up_after:
            rtt_text = "" if rtt is None else f", rtt {rtt * 1000:.1f} ms"
            return self._change(now, GatewayState.UP, f"{self.ok_run} probes answered{rtt_text}")
        if self.state != GatewayState.DOWN and self.fail_run >= rules.down_after:
            detail = result if error is None else f"{result}: {error}"
            return self._change(
                now, GatewayState.DOWN, f"{self.fail_run} probes lost in a row ({detail})"
            )
        return None

    def _change(self, now: float, new: GatewayState, reason: str) -> Transition:
        old = self.state
        if new == GatewayState.DOWN:
            flush = "down" in self.rules.flush_on
        else:
            flush = old == GatewayState.DOWN and "up" in self.rules.flush_on
        self.state = new
        self.since = now
        self.transitions[new.value] += 1
        transition = Transition(old, new, now, reason, flush)
        self.last_transition = transition
        return transition

    def flush_started(self) -> None:
        self.flushing = True

    def flush_done(self, report: FlushReport) -> None:
        self.flushing = False
        self.flushes += 1
        self.removed_total += report.removed
        self.failed_total += report.failed
        self.last_flush = report


@dataclass(frozen=True)
class GatewaySnapshot:
    """A watch as ``ctsync show status`` and the metrics read it (taken on the loop)."""

    name: str
    target: str  # "icmp 198.51.100.1" / "tcp [2001:db8::1]:443"
    state: str
    since: float  # unix time of the last state change (or of the start)
    since_seconds: float
    last_rtt: float | None
    probes: Mapping[str, int]
    transitions: Mapping[str, int]
    flush_on: tuple[str, ...]
    match: Mapping[str, str]
    flushes: int = 0
    removed_total: int = 0
    failed_total: int = 0
    last_flush: Mapping[str, Any] | None = None
    last_error: str | None = None
    flushing: bool = False

    @property
    def probes_sent(self) -> int:
        return sum(self.probes.values())

    @property
    def probes_lost(self) -> int:
        return self.probes_sent - self.probes.get("ok", 0)

    @classmethod
    def of(
        cls,
        name: str,
        target: str,
        machine: GatewayMachine,
        match: Mapping[str, str],
        now: float,
        wall: float,
    ) -> GatewaySnapshot:
        """``now`` is the machine's (monotonic) clock, ``wall`` the unix time at ``now``."""
        last = machine.last_flush
        return cls(
            name=name,
            target=target,
            state=machine.state.value,
            since=wall - (now - machine.since),
            since_seconds=max(now - machine.since, 0.0),
            last_rtt=machine.last_rtt,
            probes=dict(machine.probes),
            transitions=dict(machine.transitions),
            flush_on=tuple(e for e in FLUSH_EVENTS if e in machine.rules.flush_on),
            match=dict(match),
            flushes=machine.flushes,
            removed_total=machine.removed_total,
            failed_total=machine.failed_total,
            last_flush=None if last is None else last.to_dict(now, wall),
            last_error=machine.last_error,
            flushing=machine.flushing,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``gateways[]`` item of ``ctsync show status --json``."""
        return {
            "name": self.name,
            "target": self.target,
            "state": self.state,
            "since": self.since,
            "since_seconds": self.since_seconds,
            "last_rtt": self.last_rtt,
            "probes_sent": self.probes_sent,
            "probes_lost": self.probes_lost,
            "probes": dict(self.probes),
            "transitions": dict(self.transitions),
            "flush_on": list(self.flush_on),
            "match": dict(self.match),
            "flushes": self.flushes,
            "flushed_total": self.removed_total,
            "flush_failed_total": self.failed_total,
            "last_flush": None if self.last_flush is None else dict(self.last_flush),
            "last_error": self.last_error,
            "flushing": self.flushing,
        }


def describe_match(match: Mapping[str, str]) -> str:
    """``mark=0x1/0xff dst=198.51.100.0/24`` (conntrack's words), for logs and status."""
    return " ".join(f"{key}={value}" for key, value in match.items()) or "everything"


def status_lines(gateways: Iterable[Mapping[str, Any]]) -> list[str]:
    """``ctsync show status`` lines for the ``gateways`` section (``to_dict`` items)."""
    lines: list[str] = []
    for gw in gateways:
        rtt = gw.get("last_rtt")
        rtt_text = "-" if rtt is None else f"{rtt * 1000:.1f} ms"
        text = (
            f"gateway {gw['name']:<14} : {gw['state']} for {_ago(gw['since_seconds'])},"
            f" {gw['target']}, rtt {rtt_text}, {gw['probes_sent']} probes"
            f" ({gw['probes_lost']} lost)"
        )
        flush = gw.get("last_flush")
        if flush:
            text += f", last flush ({flush['event']}): {flush['removed']} removed"
            if flush["failed"]:
                text += f", {flush['failed']} failed"
            if flush.get("error"):
                text += f", ERROR {flush['error']}"
        if gw.get("flushing"):
            text += ", flush in progress"
        lines.append(text)
    return lines


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
