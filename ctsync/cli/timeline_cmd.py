"""``ctsync timeline record``: sample a running agent into a JSON-lines failover timeline.

A client only: it polls the agent's control socket (``status`` and ``counts``, the same
requests ``ctsync show status`` and the benchmark harness make) at a fixed interval and
writes one JSON object per line and sample. Nothing in the agent changes, and the agent
keeps no history beyond its last ten transitions, so a recording is how a failover is seen
as it happens: ``bench/plot_timeline.py`` turns recordings of both nodes into a picture.

One line (a *sample*), keys in this order::

    {"t": 1732212345.123456,          # wall clock (time.time()) when the request was sent
     "rtt": 0.0011,                   # seconds until both replies were in
     "node_id": 2,
     "role": "BACKUP",                # the failover controller's role (null before the first)
     "counts": {"internal": 20, "external": 100000},   # cache sizes
     "kernel": 100020,                # --kernel only: nf_conntrack_count where this runs
     "peers": [{"node": 1, "up": true, "verified": true, "last_heard": 0.09,
                "external_entries": 100000, "lost": 0}],
     "vrrp": {"group": "G1", "state": "BACKUP",        # null without ctsync's speaker
              "last_transition": {"time": ..., "from": "INIT", "to": "BACKUP", "reason": ...},
              "instances": [{"name": "VI_LAN", "state": "BACKUP", "priority": 100,
                             "master": "192.0.2.11", "holds_addresses": false}, ...]},
     "transition": {"at": ..., "from": "BACKUP", "to": "MASTER", "reason": ..., "done": ...,
                    "skipped": false, "planned": [...],
                    "steps": [{"step": "commit", "started": ..., "seconds": 0.35,
                               "error": null, "result": {"committed": 100000, ...}}, ...]},
     "missed_transitions": [...]}     # only if more than one transition began between samples

A sample the agent did not answer is ``{"t": ..., "rtt": ..., "error": "..."}`` and the
recording goes on (a killed agent may be restarted); an agent that cannot be reached at
the start is an error (exit 3), as for every agent command.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click

from ctsync.cli.agent_cmds import socket_option
from ctsync.cli.errors import AgentUnreachableError, CliError
from ctsync.cli.options import EPILOG

#: The kernel's table size in the network namespace the recorder runs in (``--kernel``).
CONNTRACK_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"

Query = Callable[[str], Any]
"""One control request by command name (``status`` or ``counts``) -> its result."""


# --------------------------------------------------------------------------- pure part


_INSTANCE_KEYS = ("name", "state", "priority", "master", "holds_addresses")
_PEER_KEYS = ("node", "up", "verified", "last_heard", "external_entries", "lost")


def _pick(reply: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The keys a sample keeps, in this order (null when the agent leaves one out)."""
    return {key: reply.get(key) for key in keys}


def _vrrp(vrrp: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not vrrp:
        return None
    transitions = vrrp.get("transitions") or []
    return {
        "group": vrrp.get("sync_group"),
        "state": vrrp.get("state"),
        "last_transition": transitions[-1] if transitions else None,
        "instances": [_pick(i, _INSTANCE_KEYS) for i in vrrp.get("instances") or []],
    }


def sample(
    t: float,
    rtt: float,
    status: Mapping[str, Any],
    counts: Mapping[str, Any],
    *,
    seen: set[float] | None = None,
    kernel: int | None = None,
) -> dict[str, Any]:
    """One timeline line from a ``status`` and a ``counts`` reply.

    *seen* holds the start times of the transitions already reported by earlier samples
    (updated here): a transition that began and was followed by another one between two
    samples still appears once, under ``missed_transitions``.
    """
    failover = status.get("failover") or {}
    transitions = list(failover.get("transitions") or [])
    last = transitions[-1] if transitions else None
    out: dict[str, Any] = {
        "t": round(t, 6),
        "rtt": round(rtt, 6),
        "node_id": status.get("node_id"),
        "role": failover.get("state"),
        "counts": {"internal": counts.get("internal"), "external": counts.get("external")},
    }
    if kernel is not None:
        out["kernel"] = kernel
    out["peers"] = [_pick(p, _PEER_KEYS) for p in status.get("peers") or []]
    out["vrrp"] = _vrrp(status.get("vrrp"))
    out["transition"] = last
    if seen is not None:
        missed = [tr for tr in transitions[:-1] if tr.get("at") not in seen]
        if seen and missed:  # the first sample only sets the baseline
            out["missed_transitions"] = missed
        seen.update(tr.get("at") for tr in transitions)
    return out


def error_sample(t: float, rtt: float, error: str) -> dict[str, Any]:
    return {"t": round(t, 6), "rtt": round(rtt, 6), "error": error}


# --------------------------------------------------------------------------- the recorder


def _read_count(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0))
    except (OSError, ValueError):
        return None


class Recorder:
    """Polls *query* every *interval* seconds and writes one line per sample to *out*.

    The schedule is fixed (sample *k* is due at start + k x interval); a poll that takes
    longer than the interval skips the slots it overran instead of bursting to catch up.
    """

    def __init__(
        self,
        query: Query,
        out: IO[str],
        *,
        interval: float,
        duration: float | None = None,
        kernel_fd: int | None = None,
    ) -> None:
        self.query = query
        self.out = out
        self.interval = interval
        self.duration = duration
        self.kernel_fd = kernel_fd
        self.stop = threading.Event()
        self.samples = 0
        self.errors = 0
        self._seen: set[float] = set()

    def poll(self) -> dict[str, Any]:
        from ctsync.io.control_client import ControlError

        t = time.time()
        started = time.monotonic()
        try:
            status = self.query("status")
            counts = self.query("counts")
        except ControlError as exc:
            self.errors += 1
            return error_sample(t, time.monotonic() - started, str(exc) or type(exc).__name__)
        rtt = time.monotonic() - started
        kernel = None if self.kernel_fd is None else _read_count(self.kernel_fd)
        return sample(t, rtt, status, counts, seen=self._seen, kernel=kernel)

    def write(self, line: Mapping[str, Any]) -> None:
        import json

        # Flushed per line: a recorder killed mid-run leaves only whole lines behind.
        self.out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.out.flush()
        self.samples += 1

    def run(self, first: Mapping[str, Any] | None = None) -> float:
        """Record until :attr:`stop` is set or the duration is over; returns the seconds."""
        start = time.monotonic()
        end = math.inf if self.duration is None else start + self.duration
        slot = 0
        if first is not None:
            self.write(first)
            slot = 1
        while not self.stop.is_set():
            due = start + slot * self.interval
            now = time.monotonic()
            if due >= end:
                break
            if due > now:
                if self.stop.wait(due - now):
                    break
            else:
                slot = max(slot, math.floor((now - start) / self.interval))
            self.write(self.poll())
            slot += 1
        return time.monotonic() - start


# --------------------------------------------------------------------------- commands


@click.group("timeline", epilog=EPILOG)
def timeline_group() -> None:
    """Record the agent's failover state over time (for bench/plot_timeline.py)."""


@timeline_group.command("record", epilog=EPILOG)
@click.option(
    "-o",
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, allow_dash=True, path_type=Path),
    help="The JSON-lines file to write (replaced if it exists; '-' for stdout).",
)
@click.option(
    "-i",
    "--interval",
    type=click.FloatRange(0.001, 60.0),
    default=0.01,
    show_default=True,
    help="Seconds between samples.",
)
@click.option(
    "-d",
    "--duration",
    type=click.FloatRange(0.0, min_open=True),
    default=None,
    help="Stop after this many seconds (default: at SIGINT or SIGTERM).",
)
@click.option(
    "--kernel",
    is_flag=True,
    help="Also record nf_conntrack_count of the network namespace this runs in.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.01, 300.0),
    default=2.0,
    show_default=True,
    help="Seconds to wait for each reply; a sample without one records the error.",
)
@socket_option
def timeline_record(
    out_path: Path,
    interval: float,
    duration: float | None,
    kernel: bool,
    timeout: float,
    socket_path: str,
) -> None:
    """Sample the agent (status and cache sizes) every INTERVAL seconds into a file.

    Each line is one JSON object: wall-clock time, the failover role, the VRRP group and
    instance states, the last transition with its timed steps (commit start, duration,
    entries committed), the cache sizes and the peers' health. Stops at SIGINT/SIGTERM or
    after --duration, and says how many samples it wrote. Exits 3 if the agent cannot be
    reached at the start; later unanswered samples are recorded as errors.
    """
    from ctsync.io.control_client import call

    def query(command: str) -> Any:
        return call(socket_path, command, None, timeout=timeout)

    to_stdout = str(out_path) == "-"
    kernel_fd: int | None = None
    out: IO[str] | None = None
    try:
        if kernel:
            try:
                kernel_fd = os.open(CONNTRACK_COUNT, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise CliError(f"--kernel: cannot read {CONNTRACK_COUNT}: {exc.strerror}") from exc
        recorder = Recorder(
            query, sys.stdout, interval=interval, duration=duration, kernel_fd=kernel_fd
        )
        first = recorder.poll()
        if "error" in first:
            raise AgentUnreachableError(
                f"cannot reach the ctsync agent at {socket_path}: {first['error']}"
            )
        if not to_stdout:
            try:
                out = out_path.open("w", encoding="utf-8")
            except OSError as exc:
                raise CliError(f"cannot write {out_path}: {exc.strerror}") from exc
            recorder.out = out

        def on_signal(signum: int, frame: FrameType | None) -> None:
            recorder.stop.set()

        where = "stdout" if to_stdout else str(out_path)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            until = f"for {duration:g}s" if duration is not None else "until SIGINT/SIGTERM"
            click.echo(f"recording {socket_path} every {interval:g}s {until} to {where}", err=True)
            seconds = recorder.run(first)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if out is not None:
            out.close()
        if kernel_fd is not None:
            os.close(kernel_fd)
    unanswered = f", {recorder.errors} unanswered" if recorder.errors else ""
    click.echo(
        f"{recorder.samples} samples written to {where} in {seconds:.1f}s{unanswered}", err=True
    )
