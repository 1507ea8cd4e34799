"""Feeds ``ctsync flows``: conntrack events (and the current table) into a FlowCollector.

Subscribe first, then dump, so that no connection falls between the two (as
:class:`ctsync.io.netlink.KernelTable` does); then read NEW/UPDATE/DESTROY events until the
duration is over or ``stop`` is set (the CLI sets it on SIGINT/SIGTERM). Events go through
the fast record parser (:func:`ctsync.core.record.parse_ct`): a connection already known
costs one parse and a dict lookup; only its first sight builds an :class:`Entry` (the
reply tuple only when the kernel reports NAT). Read-only: no sysctl is changed.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import threading
import time
from collections.abc import Callable

from ctsync.core import ctnetlink as nl
from ctsync.core import record
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.core.entry import NAT_MASK, Entry
from ctsync.core.flows import FlowCollector, ObservationInfo
from ctsync.io.netlink import CT_GROUPS, iter_dump, open_socket, set_receive_buffer

_RECV_SIZE = 1 << 17
_POLL_SECONDS = 0.2  # how often a stop request is noticed at the latest
EVENTS_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_events"


def entry_from_parts(parts: record.Parsed) -> Entry:
    """The Entry a flow needs (tuples, status, mark, zone) from parsed record parts."""
    key = parts[0]
    orig, zone = record.decode_key(key)
    present = parts[1]
    status = parts[2] if present & record.P_STATUS else None
    mark = parts[4] if present & record.P_MARK else None
    reply = None
    if status is not None and status & NAT_MASK:
        reply = record.to_entry(key, record.value_from_parts(parts)).reply
    return Entry(orig, reply=reply, status=status, mark=mark, zone=zone)


def local_addresses() -> frozenset[bytes]:
    """This namespace's addresses, broadcast addresses included (rtnetlink via pyroute2)."""
    from pyroute2 import IPRoute

    found: set[bytes] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            for name in ("IFA_ADDRESS", "IFA_LOCAL", "IFA_BROADCAST"):
                text = msg.get(name)
                if text:
                    found.add(ipaddress.ip_address(str(text).split("%")[0]).packed)
    return frozenset(found)


def events_setting() -> int | None:
    """nf_conntrack_events of this namespace (0: no events at all), None if unreadable."""
    try:
        with open(EVENTS_SYSCTL) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class FlowWatch:
    """One observation: a subscribed event socket, a dump, then events until told to stop.

    Open it (the constructor subscribes), :meth:`read_table` if the current table counts,
    then :meth:`run`; :meth:`close` in every case (or use it as a context manager).
    """

    def __init__(
        self,
        collector: FlowCollector,
        *,
        include_table: bool = True,
        rcvbuf: int = 8 << 20,
        rcvbuf_max: int = 64 << 20,
    ) -> None:
        self.collector = collector
        self.include_table = include_table
        self.rcvbuf_max = max(rcvbuf, rcvbuf_max)
        self.events = 0
        self.overruns = 0
        self.table_entries = 0
        self.decode_errors = 0
        self._rcvbuf = rcvbuf
        self._sock = open_socket(CT_GROUPS, rcvbuf)
        self._buf = bytearray(_RECV_SIZE)

    def __enter__(self) -> FlowWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def read_table(self) -> int:
        """Observe every entry of the current table; returns how many were read."""
        count = 0
        with open_socket() as sock:
            for buf, mtype, start, end in iter_dump(sock, 0):
                if mtype != nl.CT_NEW:
                    continue
                count += 1
                self._handle(buf, start, end, deleted=False)
        self.table_entries += count
        return count

    def _handle(self, buf: bytearray, start: int, end: int, *, deleted: bool) -> None:
        try:
            parts = record.parse_ct(buf, start, end)
        except CtnetlinkError:
            self.decode_errors += 1
            return
        collector = self.collector
        key = parts[0]
        if collector.known(key):
            if parts[1] & record.P_STATUS:
                collector.update_status(key, parts[2])
        else:
            try:
                entry = entry_from_parts(parts)
            except CtnetlinkError:
                self.decode_errors += 1
                return
            collector.observe(key, entry)
        if deleted:
            collector.destroy(key)

    def read_events(self) -> int:
        """Read what the socket holds now (non-blocking); returns the events handled."""
        sock = self._sock
        buf = self._buf
        handled = 0
        while True:
            try:
                n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._on_overrun()
                continue
            try:
                for mtype, _flags, _seq, _pid, start, end in nl.iter_messages(buf, n):
                    if mtype in (nl.CT_NEW, nl.CT_DELETE):
                        handled += 1
                        self._handle(
                            buf, start + nl.NFGEN_HDRLEN, end, deleted=mtype == nl.CT_DELETE
                        )
            except CtnetlinkError:
                self.decode_errors += 1
        self.events += handled
        return handled

    def _on_overrun(self) -> None:
        """The kernel dropped events: grow the buffer; re-read the table if it counts."""
        self.overruns += 1
        if self._rcvbuf < self.rcvbuf_max:
            self._rcvbuf = min(self._rcvbuf * 2, self.rcvbuf_max)
            set_receive_buffer(self._sock, self._rcvbuf)
        if self.include_table:
            self.read_table()

    def run(
        self,
        duration: float | None,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> float:
        """Read events until ``duration`` seconds passed or ``stop`` is set; the seconds."""
        start = clock()
        end = None if duration is None else start + duration
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        while not stop.is_set():
            wait = _POLL_SECONDS
            if end is not None:
                left = end - clock()
                if left <= 0:
                    break
                wait = min(wait, left)
            if poller.poll(wait * 1000):
                self.read_events()
        self.read_events()  # what arrived up to the end still counts
        return clock() - start

    def info(
        self, seconds: float, *, interrupted: bool, warnings: tuple[str, ...] = ()
    ) -> ObservationInfo:
        extra = list(warnings)
        if self.overruns:
            extra.append(
                f"the kernel dropped events {self.overruns} times (buffer overrun):"
                " short-lived connections may be missing"
            )
        if self.decode_errors:
            extra.append(f"{self.decode_errors} messages could not be decoded")
        return ObservationInfo(
            seconds=seconds,
            include_table=self.include_table,
            table_entries=self.table_entries,
            events=self.events,
            overruns=self.overruns,
            ignored=self.collector.ignored,
            interrupted=interrupted,
            warnings=tuple(extra),
        )
