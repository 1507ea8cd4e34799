"""ctnetlink sockets: live events, dumps, batched commits, deletes and flushes.

Thin adapters over raw AF_NETLINK/NETLINK_NETFILTER sockets (no pyroute2 on this path; see
DESIGN.md for the measured reasons). Everything works in the network namespace the process
runs in. Three sockets per table, as conntrackd has:

- the event socket (multicast groups NEW/UPDATE/DESTROY, optionally expectations), read
  by the asyncio loop with ``add_reader``; its receive buffer is forced beyond rmem_max
  (SO_RCVBUFFORCE) and grows on overrun;
- a dump socket, for the initial dump and for reconciliation after lost events;
- a commit socket, whose port id marks the events our own writes cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from ctsync.core import commit as commit_codec
from ctsync.core import ctnetlink as nl
from ctsync.core import expect, record
from ctsync.core.cache import Cache, Change
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.core.entry import CtTuple, Entry, Expectation
from ctsync.core.filter import NO_EXPECTATIONS, HelperFilter

log = logging.getLogger("ctsync.netlink")

_T = TypeVar("_T")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_BROADCAST_ERROR = 4
NETLINK_NO_ENOBUFS = 5
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

CT_GROUPS = (
    1 << (nl.NFNLGRP_CONNTRACK_NEW - 1)
    | 1 << (nl.NFNLGRP_CONNTRACK_UPDATE - 1)
    | 1 << (nl.NFNLGRP_CONNTRACK_DESTROY - 1)
)
EXP_GROUPS = (
    1 << (nl.NFNLGRP_CONNTRACK_EXP_NEW - 1)
    | 1 << (nl.NFNLGRP_CONNTRACK_EXP_UPDATE - 1)
    | 1 << (nl.NFNLGRP_CONNTRACK_EXP_DESTROY - 1)
)

_HDR = struct.Struct("=IHHII")
_RECV_SIZE = 1 << 17  # a dump skb is at most 32 KiB; events are small


class NetlinkError(OSError):
    """The kernel refused a request (errno from NLMSG_ERROR)."""


def open_socket(groups: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A bound, blocking NETLINK_NETFILTER socket in the current network namespace."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    try:
        if rcvbuf:
            set_receive_buffer(sock, rcvbuf)
        # Error replies carry only the header of the failed request, not all of it.
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Set the receive buffer, beyond rmem_max where we may; returns the effective size."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    effective: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return effective


def portid(sock: socket.socket) -> int:
    pid: int = sock.getsockname()[0]
    return pid


def set_conntrack_events(enabled: bool = True) -> bool:
    """Turn on nf_conntrack_events in this namespace (entries made before a listener
    otherwise never report UPDATE/DESTROY); False if the sysctl cannot be written."""
    path = "/proc/sys/net/netfilter/nf_conntrack_events"
    try:
        with open(path, "w") as f:
            f.write("1" if enabled else "0")
    except OSError:
        return False
    return True


# --- request / dump ---------------------------------------------------------------------


class _Seq:
    def __init__(self) -> None:
        self._value = int(time.time()) & 0x3FFFFFFF

    def next(self) -> int:
        self._value = (self._value + 1) & 0xFFFFFFFF
        return self._value

    def reserve(self, count: int) -> int:
        """The first of ``count`` consecutive sequence numbers (never wrapping inside)."""
        if self._value + count + 1 > 0xFFFFFFFF:
            self._value = 0
        first = self._value + 1
        self._value += count
        return first


_seq = _Seq()


def request(sock: socket.socket, message: bytes, seq: int) -> None:
    """Send one request with NLM_F_ACK semantics and raise NetlinkError if it fails."""
    sock.send(message)
    buf = bytearray(_RECV_SIZE)
    while True:
        n = sock.recv_into(buf)
        for mtype, _flags, mseq, _pid, start, end in nl.iter_messages(buf, n):
            if mtype == nl.NLMSG_ERROR and mseq == seq:
                err, _ = nl.decode_error(buf, start, end)
                if err:
                    raise NetlinkError(err, os.strerror(err))
                return


def iter_dump(
    sock: socket.socket, family: int = 0, *, expectations: bool = False, mark: int | None = None
) -> Iterator[tuple[bytearray, int, int, int]]:
    """Yield (buffer, type, start, end) for each message of a dump.

    ``start``/``end`` delimit the ctnetlink attributes. The buffer is reused by the next
    recv: consume each message before asking for the next one.
    """
    seq = _seq.next()
    sock.send(nl.encode_dump_request(seq, family, expectations=expectations, mark=mark))
    buf = bytearray(_RECV_SIZE)
    while True:
        n = sock.recv_into(buf)
        for mtype, _flags, mseq, _pid, start, end in nl.iter_messages(buf, n):
            if mseq != seq:
                continue
            if mtype == nl.NLMSG_DONE:
                return
            if mtype == nl.NLMSG_ERROR:
                err, _ = nl.decode_error(buf, start, end)
                if err:
                    raise NetlinkError(err, os.strerror(err))
                return
            yield buf, mtype, start + nl.NFGEN_HDRLEN, end


def dump_table(family: int = 0) -> list[Entry]:
    """Every conntrack entry of this namespace (family 0: IPv4 and IPv6), fully decoded."""
    with open_socket() as sock:
        return [nl.decode_entry(buf, s, e) for buf, _t, s, e in iter_dump(sock, family)]


def get_entry(sock: socket.socket, key: bytes) -> record.Parsed | None:
    """Read one entry by its record key (CT_GET); None when the kernel has no such entry."""
    orig, zone = record.decode_key(key)
    seq = _seq.next()
    parts = [nl.encode_tuple(nl.CTA_TUPLE_ORIG, orig)]
    if zone is not None:
        parts.append(nl.attr_be16(nl.CTA_ZONE, zone))
    body = b"".join(parts)
    flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK
    sock.send(nl.message_header(nl.CT_GET, flags, seq, orig.family, len(body)) + body)
    found: record.Parsed | None = None
    buf = bytearray(_RECV_SIZE)
    while True:
        n = sock.recv_into(buf)
        for mtype, _flags, mseq, _pid, start, end in nl.iter_messages(buf, n):
            if mseq != seq:
                continue
            if mtype == nl.CT_NEW:
                found = record.parse_ct(buf, start + nl.NFGEN_HDRLEN, end)
            elif mtype == nl.NLMSG_ERROR:
                err, _ = nl.decode_error(buf, start, end)
                if err and err != errno.ENOENT:
                    raise NetlinkError(err, os.strerror(err))
                return found


def dump_expectations(family: int = 0) -> list[Expectation]:
    with open_socket() as sock:
        return [
            nl.decode_expectation(buf, s, e)
            for buf, _t, s, e in iter_dump(sock, family, expectations=True)
        ]


def count_entries() -> int:
    with open("/proc/sys/net/netfilter/nf_conntrack_count") as f:
        return int(f.read())


# --- commit / delete / flush --------------------------------------------------------------


@dataclass
class CommitResult:
    """What a commit did: conntrackd reports the same totals (-c).

    ``attempted``/``committed``/``failed``/``errors`` count every record, expectations
    included; ``expect_*`` count the expectations alone (conntrackd reports them apart).
    ``deferred`` holds the expectation records a commit was told to leave for later
    (``expectations=False``): the commit pool runs them once every master is in."""

    attempted: int = 0
    committed: int = 0
    failed: int = 0
    retried_as_update: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    expect_attempted: int = 0
    expect_committed: int = 0
    expect_failed: int = 0
    deferred: list[tuple[bytes, bytes]] = field(default_factory=list)

    def add_error(self, err: int) -> None:
        self.failed += 1
        self.errors[errno.errorcode.get(err, str(err))] += 1

    def add_expectations(self, other: CommitResult) -> None:
        """Fold the result of an expectation commit into this one."""
        self.attempted += other.attempted
        self.committed += other.committed
        self.failed += other.failed
        self.errors += other.errors
        self.expect_attempted += other.attempted
        self.expect_committed += other.committed
        self.expect_failed += other.failed
        self.seconds += other.seconds


def with_ack(parts: list[bytes]) -> int:
    """Ask for an ACK on the last message of a batch (so we know when the kernel is done
    with it); returns that message's seq."""
    last = bytearray(parts[-1])
    flags = struct.unpack_from("=H", last, 6)[0] | nl.NLM_F_ACK
    struct.pack_into("=H", last, 6, flags)
    parts[-1] = bytes(last)
    return int(struct.unpack_from("=I", last, 8)[0])


def classify_error(
    seq: int,
    err: int,
    pending: dict[int, tuple[bytes, bytes]],
    result: CommitResult,
    retry: list[tuple[bytes, bytes]] | None,
) -> None:
    """A refused CT_NEW: a NAT record whose entry exists already (EEXIST, or EOPNOTSUPP:
    NAT on an update) goes to ``retry`` as a plain update; anything else is a failure."""
    item = pending.get(seq)
    if (
        retry is not None
        and item is not None
        and err in (errno.EOPNOTSUPP, errno.EEXIST)
        and item[1][0] & record.VAL_REPLY
    ):
        retry.append(item)
    else:
        result.add_error(err)


class Committer:
    """Writes entries into the kernel table, many messages per send().

    Only the last message of each batch asks for an ACK: netlink processes a batch in
    order inside send(), so when that ACK arrives every error of the batch (sent without
    ACK, errors only) is already queued before it.
    """

    def __init__(self, sock: socket.socket | None = None, batch: int = 256) -> None:
        self.sock = sock or open_socket(rcvbuf=4 << 20)
        self.batch = batch
        self.portid = portid(self.sock)
        self._buf = bytearray(_RECV_SIZE)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def commit_records(
        self,
        records: Iterable[tuple[bytes, bytes]],
        timeout: int | None = None,
        *,
        expectations: bool = True,
    ) -> CommitResult:
        """Create-or-update each (key, value) record, NAT included; count every failure.

        Expectation records go in after every conntrack record (an expectation needs its
        master in the table), or, with ``expectations=False``, are returned unsent in
        ``result.deferred``. ``timeout`` overrides conntrack timeouts only: a helper's
        policy sets an expectation's timeout anyway."""
        result = CommitResult()
        started = time.perf_counter()
        retry: list[tuple[bytes, bytes]] = []
        self.build_batches(
            records,
            timeout,
            True,
            result,
            lambda b: self._flush_batch(b[0], b[1], result, retry),
            deferred=result.deferred,
        )
        return self.finish_commit(result, retry, timeout, started, expectations=expectations)

    def finish_commit(
        self,
        result: CommitResult,
        retry: list[tuple[bytes, bytes]],
        timeout: int | None,
        started: float,
        *,
        expectations: bool = True,
    ) -> CommitResult:
        """The end of a commit whose CT_NEWs are sent: the NAT records set aside for
        ``retry`` go in as updates, then the expectations (unless the caller defers them)."""
        # A NAT create on an entry that exists already is refused (NAT on an update is
        # EOPNOTSUPP): commit those as plain updates of the live entry.
        if retry:
            result.retried_as_update = len(retry)
            self.build_batches(
                retry,
                timeout,
                False,
                result,
                lambda b: self._flush_batch(b[0], b[1], result, None),
                count=False,
            )
        result.committed = result.attempted - result.failed
        if expectations and result.deferred:
            result.add_expectations(self.commit_expectations(result.deferred))
            result.deferred = []
        result.seconds = time.perf_counter() - started
        return result

    def commit_expectations(self, records: Iterable[tuple[bytes, bytes]]) -> CommitResult:
        """Create (or refresh) expectation records; their masters must be in the table.

        The kernel refuses an expectation whose master is missing (ENOENT), has no helper
        (EOPNOTSUPP), or whose helper is not loaded here (EOPNOTSUPP): each is counted."""
        result = CommitResult()
        started = time.perf_counter()
        self._send_each(records, lambda r, seq: expect.commit_message(r[0], r[1], seq), result)
        result.committed = result.attempted - result.failed
        result.seconds = time.perf_counter() - started
        return result

    def set_timeouts(self, keys: Iterable[bytes], timeout: int) -> CommitResult:
        """Give each entry ``timeout`` seconds, nothing else written (conntrackd's -t on
        leaving MASTER); an entry gone meanwhile counts as an ENOENT error."""
        result = CommitResult()
        started = time.perf_counter()
        self._send_each(
            keys, lambda key, seq: commit_codec.timeout_message(key, seq, timeout), result
        )
        result.committed = result.attempted - result.failed
        result.seconds = time.perf_counter() - started
        return result

    def _send_each(
        self, items: Iterable[_T], build: Callable[[_T, int], bytes], result: CommitResult
    ) -> None:
        """One message per item (``build(item, seq)``), sent in batches; every item is
        counted in ``result``, a build that fails (CtnetlinkError) as EINVAL."""
        parts: list[bytes] = []
        for item in items:
            result.attempted += 1
            try:
                parts.append(build(item, _seq.next()))
            except CtnetlinkError:
                result.add_error(errno.EINVAL)
                continue
            if len(parts) >= self.batch:
                self._flush_batch(parts, {}, result, None)
                parts = []
        if parts:
            self._flush_batch(parts, {}, result, None)

    def build_batches(
        self,
        records: Iterable[tuple[bytes, bytes]],
        timeout: int | None,
        with_nat: bool,
        result: CommitResult,
        ship: Callable[[tuple[list[bytes], dict[int, tuple[bytes, bytes]]]], None],
        *,
        count: bool = True,
        deferred: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Build a CT_NEW per record and hand ``ship`` each batch: its messages and, by
        seq, the record each one carries. Records that fail to build count as EINVAL;
        expectation records go to ``deferred`` (when given)."""
        # The per-entry loop is the failover's critical path: keep it to the build call.
        build = commit_codec.commit_message_positional
        batch = self.batch
        flags = commit_codec.COMMIT_FLAGS
        attempted = invalid = 0
        parts: list[bytes] = []
        batch_records: list[tuple[bytes, bytes]] = []
        base = _seq.reserve(batch)
        for item in records:
            try:
                parts.append(build(item[0], item[1], base + len(parts), timeout, flags, with_nat))
            except CtnetlinkError:
                # Expectation keys fail the conntrack build: set aside here, so the hot
                # loop pays nothing for them.
                if deferred is not None and expect.is_expectation_key(item[0]):
                    deferred.append(item)
                else:
                    invalid += 1
                continue
            batch_records.append(item)
            if len(parts) >= batch:
                attempted += len(parts)
                ship((parts, dict(zip(range(base, base + len(parts)), batch_records, strict=True))))
                parts, batch_records = [], []
                base = _seq.reserve(batch)
        if parts:
            attempted += len(parts)
            ship((parts, dict(zip(range(base, base + len(parts)), batch_records, strict=True))))
        if count:
            result.attempted += attempted + invalid
        for _ in range(invalid):
            result.add_error(errno.EINVAL)

    def commit_entries(self, entries: Iterable[Entry], timeout: int | None = None) -> CommitResult:
        return self.commit_records((record.from_entry(e) for e in entries), timeout)

    def _flush_batch(
        self,
        parts: list[bytes],
        pending: dict[int, tuple[bytes, bytes]],
        result: CommitResult,
        retry: list[tuple[bytes, bytes]] | None,
    ) -> None:
        last_seq = with_ack(parts)
        self.sock.sendmsg(parts)
        for seq, err in self.collect_errors(last_seq):
            classify_error(seq, err, pending, result, retry)

    def send_built(self, batch: bytes, first_seq: int, last_seq: int) -> list[tuple[int, int]]:
        """Send a batch built elsewhere (:func:`with_ack` applied, seqs ``first_seq`` to
        ``last_seq``); returns ``(seq, errno)`` of every message the kernel refused. A
        send that fails as a whole counts against every message of the batch."""
        try:
            self.sock.send(batch)
        except OSError as exc:
            return [(seq, exc.errno or errno.EIO) for seq in range(first_seq, last_seq + 1)]
        return self.collect_errors(last_seq)

    def collect_errors(self, last_seq: int) -> list[tuple[int, int]]:
        """Read the replies to a batch up to its ACK (``last_seq``): ``(seq, errno)`` of
        every refused message."""
        buf = self._buf
        failed: list[tuple[int, int]] = []
        while True:
            n = self.sock.recv_into(buf)
            for mtype, _f, seq, _pid, start, end in nl.iter_messages(buf, n):
                if mtype != nl.NLMSG_ERROR:
                    continue
                err, _ = nl.decode_error(buf, start, end)
                if err:
                    failed.append((seq, err))
                if seq == last_seq:
                    return failed

    def delete(self, orig: CtTuple, zone: int | None = None, ct_id: int | None = None) -> bool:
        """Delete one entry; False if it did not exist."""
        seq = _seq.next()
        try:
            request(self.sock, nl.encode_delete(seq, orig, zone, ct_id), seq)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def delete_many(self, targets: Iterable[tuple[CtTuple, int | None]]) -> tuple[int, int]:
        """Delete entries in batches; returns (deleted, missing or failed)."""
        result = CommitResult()
        self._send_each(
            targets,
            lambda t, seq: nl.encode_delete(seq, t[0], t[1], flags=nl.NLM_F_REQUEST),
            result,
        )
        return result.attempted - result.failed, result.failed

    def delete_matching(self, predicate: Callable[[Entry], bool], family: int = 0) -> int:
        """Delete every entry for which ``predicate`` holds; returns how many went."""
        with open_socket() as dump_sock:
            targets = [
                (entry.orig, entry.zone)
                for entry in (
                    nl.decode_entry(b, s, e) for b, _t, s, e in iter_dump(dump_sock, family)
                )
                if predicate(entry)
            ]
        deleted, _ = self.delete_many(targets)
        return deleted

    def flush(
        self, family: int = 0, *, mark: int | None = None, mark_mask: int = 0xFFFFFFFF
    ) -> None:
        """Flush the table: both families (0), or only IPv4/IPv6.

        With nfgenmsg version 0 the kernel flushes every family whatever we ask; version 1
        makes it honour the family (kernel >= 5.9)."""
        seq = _seq.next()
        message = bytearray(nl.encode_flush(seq, family, mark=mark, mark_mask=mark_mask))
        if family:
            message[nl.NLMSG_HDRLEN + 1] = 1  # nfgenmsg.version
        request(self.sock, bytes(message), seq)

    def delete_expectations(self, keys: Iterable[bytes]) -> tuple[int, int]:
        """Delete expectation records' expectations; returns (deleted, missing or failed)."""
        result = CommitResult()
        self._send_each(
            keys, lambda key, seq: expect.delete_message(key, seq, nl.NLM_F_REQUEST), result
        )
        return result.attempted - result.failed, result.failed

    def flush_expectations(self, family: int = 0) -> None:
        seq = _seq.next()
        request(self.sock, nl.encode_flush(seq, family, expectations=True), seq)

    def create_expectation(self, exp: Expectation) -> None:
        seq = _seq.next()
        flags = nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | nl.NLM_F_EXCL
        request(self.sock, nl.encode_expectation(nl.EXP_NEW, flags, seq, exp), seq)


# --- the live table: events + dump + reconcile -----------------------------------------------


@dataclass
class EventStats:
    """conntrackd's ``netlink stats`` (-s runtime), counted by the event reader."""

    events_received: int = 0
    events_own: int = 0
    events_unknown_type: int = 0
    catch_event_failed: int = 0
    expectation_events: int = 0
    netlink_overrun: int = 0
    resync_with_kernel_table: int = 0
    buffer_size: int = 0
    last_reconcile_seconds: float = 0.0
    last_reconcile_removed: int = 0
    events_discarded: int = 0  # queued before a dump, which superseded them
    expectations_filtered: int = 0  # helper not in expect-sync
    expectations_orphaned: int = 0  # master not in the cache (filtered or unknown)


ChangeSink = Callable[[Change, bytes, bool], None]

# How long after a new expectation its master is re-read (the helper mangles the packet
# right after it creates the expectation, in the same softirq).
MASTER_REFRESH_DELAY = 0.02


class KernelTable:
    """Keeps a Cache equal to this namespace's conntrack table.

    Subscribe first, then dump, so nothing falls between the two. Events are applied as
    they arrive; an overrun (ENOBUFS: the kernel dropped events) is counted, the buffer
    grows (up to ``rcvbuf_max``) and a dump reconciles the cache by mark-and-sweep.
    ``sink`` hears every change with whether our own commit socket caused it.

    ``expect_helpers`` turns on expectation sync (config ``expect-sync``): ``()`` (the
    default) syncs none, ``None`` every helper's, else the helpers named (matched as
    :class:`HelperFilter` does). Expectations are then kept in the same cache as records
    of their own key kind, from EXP events (their own nfnetlink subsystem: the conntrack
    event path does not change) and from the expectation dump that follows each
    conntrack dump; one whose master entry is not in the cache is not kept.
    """

    def __init__(
        self,
        cache: Cache,
        *,
        rcvbuf: int = 8 << 20,
        rcvbuf_max: int = 64 << 20,
        sink: ChangeSink | None = None,
        expectations: bool = False,
        own_portids: Iterable[int] = (),
        after_batch: Callable[[], None] | None = None,
        expect_helpers: Iterable[str] | None = (),
    ) -> None:
        self.cache = cache
        self.expect_filter: HelperFilter = (
            HelperFilter.build(expect_helpers)
            if expect_helpers is None or expect_helpers
            else NO_EXPECTATIONS
        )
        expectations = expectations or self.expect_filter.enabled
        self.stats = EventStats()
        self.sink = sink
        self.after_batch = after_batch
        self.rcvbuf_max = max(rcvbuf, rcvbuf_max)
        self.own_portids = set(own_portids)
        groups = CT_GROUPS | (EXP_GROUPS if expectations else 0)
        self._groups = groups
        set_conntrack_events(True)
        self._sock = open_socket(groups, rcvbuf)
        self._sock.setblocking(False)
        self.stats.buffer_size = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        self._requested_rcvbuf = rcvbuf
        self._buf = bytearray(_RECV_SIZE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconcile_task: asyncio.Task[None] | None = None
        self._reconcile_lock = asyncio.Lock()
        self._resync_needed = False
        self._stale_masters: set[bytes] = set()

    @property
    def fileno(self) -> int:
        return self._sock.fileno()

    @contextlib.contextmanager
    def events_paused(self, reconcile: bool = True) -> Iterator[None]:
        """Leave the event groups while we write the table ourselves, then reconcile.

        With a listener subscribed the kernel builds an event for every entry we commit,
        inside our own send() (about 5 us each: more than the insert itself), only for us
        to discard it as our own. Events from traffic in that window are not lost: the
        reconcile that follows dumps the table, as primary-backup.sh's resync does. A
        caller that reconciles itself right after (the failover plan) says
        ``reconcile=False``, so that the table is not dumped twice on the critical path.
        """
        groups = [g for g in range(1, 7) if self._groups & (1 << (g - 1))]
        for group in groups:
            self._sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, group)
        try:
            yield
        finally:
            for group in groups:
                self._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            self.read_events()
            if reconcile:
                self.schedule_reconcile()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        if self._reconcile_task is not None:
            self._reconcile_task.cancel()
        self._sock.close()

    # Start: subscribe (done in __init__), attach to the loop, then dump.
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self.read_events)
        await self.reconcile()

    def read_events(self, limit: int = 4096) -> int:
        """Read up to ``limit`` events (about one datagram each); returns how many.

        Bounded so that a flood of events cannot starve the rest of the loop: the reader
        is called again as long as the socket has data."""
        sock = self._sock
        buf = self._buf
        cache = self.cache
        sink = self.sink
        own = self.own_portids
        stats = self.stats
        parse = record.parse_ct
        unpack_hdr = _HDR.unpack_from
        handled = 0
        while handled < limit:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._on_overrun()
                    continue
                raise
            off = 0
            while off + 16 <= n:
                mlen, mtype, _flags, _seq, pid = unpack_hdr(buf, off)
                if mlen < 16 or off + mlen > n:
                    stats.catch_event_failed += 1
                    break
                handled += 1
                if mtype in (nl.CT_NEW, nl.CT_DELETE):
                    try:
                        parts = parse(buf, off + 20, off + mlen)
                    except CtnetlinkError:
                        stats.catch_event_failed += 1
                    else:
                        if mtype == nl.CT_NEW:
                            change = cache.update(parts)
                        else:
                            change = cache.destroy(parts[0])
                        is_own = pid in own if pid else False
                        if is_own:
                            stats.events_own += 1
                        if sink is not None and change:
                            sink(change, parts[0], is_own)
                elif mtype >> 8 == nl.NFNL_SUBSYS_CTNETLINK_EXP:
                    stats.expectation_events += 1
                    self._on_expectation(buf, mtype, off + 20, off + mlen, pid)
                elif mtype in (nl.NLMSG_ERROR, nl.NLMSG_DONE):
                    pass
                else:
                    stats.events_unknown_type += 1
                off += (mlen + 3) & ~3
        stats.events_received += handled
        if handled and self.after_batch is not None:
            self.after_batch()
        return handled

    def _on_expectation(self, buf: bytearray, mtype: int, start: int, end: int, pid: int) -> None:
        """An EXP_NEW/EXP_DELETE event: filter by helper and master, apply, report."""
        efilter = self.expect_filter
        if not efilter.enabled or mtype not in (nl.EXP_NEW, nl.EXP_DELETE):
            return
        try:
            parsed = expect.parse_expectation(buf, start, end)
        except CtnetlinkError:
            self.stats.catch_event_failed += 1
            return
        cache = self.cache
        if mtype == nl.EXP_NEW:
            change = self._take_expectation(parsed)
        elif parsed.key in cache:
            change = cache.destroy(parsed.key)
        else:
            return  # never taken (filtered, no master), or gone already
        is_own = pid in self.own_portids if pid else False
        if is_own:
            self.stats.events_own += 1
        if self.sink is not None and change:
            self.sink(change, parsed.key, is_own)

    def _take_expectation(self, parsed: expect.ParsedExpectation) -> Change:
        if not self.expect_filter.accepts(parsed.helper):
            self.stats.expectations_filtered += 1
            return Change.IGNORED
        if parsed.master_key not in self.cache:
            self.stats.expectations_orphaned += 1
            return Change.IGNORED
        change = self.cache.update_expectation(parsed.key, parsed.value)
        if change is Change.NEW and self._loop is not None:
            self._refresh_master_soon(parsed.master_key)
        return change

    def _refresh_master_soon(self, key: bytes) -> None:
        """Re-read a new expectation's master shortly: a NAT helper that mangles the
        packet announcing the expectation (FTP PORT/227, SIP SDP) changes the master's
        sequence adjustment, and the kernel sends no event for that change (only synproxy
        does), so without this read a peer would commit the master without it and the
        connection would break after a failover. Dumps carry it anyway."""
        if not self._stale_masters and self._loop is not None:
            self._loop.call_later(MASTER_REFRESH_DELAY, self._refresh_masters)
        self._stale_masters.add(key)

    def _refresh_masters(self) -> None:
        keys, self._stale_masters = self._stale_masters, set()
        cache, sink = self.cache, self.sink
        try:
            with open_socket() as sock:
                for key in keys:
                    parts = get_entry(sock, key)
                    if parts is None or key not in cache:
                        continue
                    change = cache.update(parts)
                    if sink is not None and change in (Change.NEW, Change.UPDATED):
                        sink(change, key, False)
        except (OSError, CtnetlinkError) as exc:
            log.warning("could not re-read the master of an expectation: %s", exc)
            self.schedule_reconcile()
        if self.after_batch is not None:
            self.after_batch()

    def _on_overrun(self) -> None:
        self.stats.netlink_overrun += 1
        current = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # getsockopt reports twice what was set; ask for double the request, capped.
        wanted = min(max(self._requested_rcvbuf, current // 2) * 2, self.rcvbuf_max)
        if wanted > self._requested_rcvbuf:
            self._requested_rcvbuf = wanted
            self.stats.buffer_size = set_receive_buffer(self._sock, wanted) // 2
            log.warning(
                "netlink event overrun: events were lost; receive buffer now %d bytes, "
                "reconciling with a dump",
                self.stats.buffer_size,
            )
        else:
            log.warning("netlink event overrun at the maximum buffer size; reconciling with a dump")
        self.schedule_reconcile()

    def schedule_reconcile(self) -> None:
        self._resync_needed = True
        if self._loop is None:
            return
        if self._reconcile_task is None or self._reconcile_task.done():
            self._reconcile_task = self._loop.create_task(self._reconcile_soon())

    async def _reconcile_soon(self) -> None:
        while self._resync_needed:
            self._resync_needed = False
            await self.reconcile()

    async def reconcile(self) -> int:
        """Dump the table into the cache; destroy what the dump did not show. Returns the
        number of entries removed. One at a time (a second call waits for the first).

        Order matters under load. Every event already queued is older than the dump,
        which supersedes it: the backlog is discarded unread (a recv is ~10x cheaper than
        applying an event). During the dump the event socket is not read, so only the dump
        marks entries present; the events queued meanwhile are applied afterwards, in
        order, and each is at least as new as what the dump read for its entry. If the
        backlog could not be emptied (the kernel outran us), another pass follows."""
        async with self._reconcile_lock:
            return await self._reconcile()

    def _discard_backlog(self, budget: float = 2.0) -> bool:
        """Read and drop every queued event; False if the queue was still not empty."""
        sock, buf = self._sock, self._buf
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            for _ in range(1024):
                try:
                    sock.recv_into(buf)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.stats.netlink_overrun += 1
                self.stats.events_discarded += 1
        return False

    def _dump_expectations(self, sock: socket.socket) -> None:
        sink = self.sink
        for buf, mtype, start, end in iter_dump(sock, 0, expectations=True):
            if mtype != nl.EXP_NEW:
                continue
            try:
                parsed = expect.parse_expectation(buf, start, end)
            except CtnetlinkError:
                self.stats.catch_event_failed += 1
                continue
            change = self._take_expectation(parsed)
            if sink is not None and change in (Change.NEW, Change.UPDATED):
                sink(change, parsed.key, False)

    async def _reconcile(self) -> int:
        started = time.perf_counter()
        cache = self.cache
        sink = self.sink
        parse = record.parse_ct
        if not self._discard_backlog():
            self.schedule_reconcile()  # older events remain: one more pass after this one
        loop = self._loop
        if loop is not None:
            loop.remove_reader(self._sock.fileno())
        cache.begin_reconcile()
        try:
            with open_socket(rcvbuf=4 << 20) as sock:
                in_batch = 0
                for buf, mtype, start, end in iter_dump(sock, 0):
                    if mtype != nl.CT_NEW:
                        continue
                    try:
                        parts = parse(buf, start, end)
                    except CtnetlinkError:
                        self.stats.catch_event_failed += 1
                        continue
                    change = cache.update(parts)
                    if sink is not None and change in (Change.NEW, Change.UPDATED):
                        sink(change, parts[0], False)
                    in_batch += 1
                    if in_batch >= 4096:  # let timers and the sync link run
                        in_batch = 0
                        if self.after_batch is not None:
                            self.after_batch()
                        await asyncio.sleep(0)
                if self.expect_filter.enabled:
                    # After the conntrack dump: the masters are in the cache by now.
                    self._dump_expectations(sock)
        except BaseException:
            cache.abort_reconcile()
            raise
        finally:
            if loop is not None and self._loop is loop:
                loop.add_reader(self._sock.fileno(), self.read_events)
        gone = cache.end_reconcile()
        if sink is not None:
            for key in gone:
                sink(Change.DESTROYED, key, False)
        if self.after_batch is not None:
            self.after_batch()
        self.stats.resync_with_kernel_table += 1
        self.stats.last_reconcile_seconds = time.perf_counter() - started
        self.stats.last_reconcile_removed = len(gone)
        return len(gone)
