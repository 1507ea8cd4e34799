"""The ctsync agent: the one place where the pure core and the I/O adapters meet.

One asyncio loop runs everything a node does:

- ``KernelTable`` keeps the internal cache equal to the kernel table (events, dumps,
  reconciliation) and reports each change;
- ``SyncSession`` turns those changes into DATA for the peers and keeps one external cache
  per peer from what they send (it is pure: the agent feeds it datagrams and the time);
- ``Transport`` carries the datagrams over the sync links;
- ``ControlServer`` answers the CLI (statistics, caches, commit, flush, resync, ...);
- ``FailoverController`` runs the failover plan when the role changes, as told by the
  VRRP speaker (``VrrpSpeaker``), keepalived's notify FIFO or ``ctsync failover``;
- a timer runs ``SyncSession.tick`` when its next deadline comes.

Systemd style: logs to stderr, SIGTERM/SIGINT stop cleanly, SIGHUP reloads what can be
reloaded (log level, filters), READY/WATCHDOG/STOPPING go to $NOTIFY_SOCKET when set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ctsync.config import Config, GatewayWatch, load_config, read_key
from ctsync.controller import FailoverController
from ctsync.core import expect, record
from ctsync.core.cache import Cache, CacheCounters, Change
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.core.entry import entry_to_json
from ctsync.core.failover import Role, parse_fifo_line, parse_notify
from ctsync.core.gateway import (
    FlushReport,
    GatewayMachine,
    GatewaySnapshot,
    GatewayState,
    Transition,
    WatchRules,
    describe_match,
)
from ctsync.core.select import EntryFilter as Selector
from ctsync.core.stats import CacheStats, CommitStats, LinkStats, NetlinkStats, PeerStats, Snapshot
from ctsync.core.sync import SessionConfig, SyncSession
from ctsync.core.wire import Authenticator
from ctsync.io import sdnotify
from ctsync.io.commit_pool import CommitPool
from ctsync.io.control import CommandError, ControlServer
from ctsync.io.metrics import MetricsInput, MetricsServer
from ctsync.io.netlink import CommitResult, Committer, KernelTable
from ctsync.io.notify_fifo import NotifyFifo
from ctsync.io.probe import (
    IcmpProber,
    Prober,
    ProbeResult,
    RemovalResult,
    TcpProber,
    remove_connections,
)
from ctsync.io.timeouts import set_timeouts
from ctsync.io.transport import LinkConfig, Transport

if TYPE_CHECKING:
    from ctsync.speaker import SpeakerThread

log = logging.getLogger("ctsync.agent")

# How long kernel changes may wait to share a datagram with the next ones (seconds).
FLUSH_DELAY = 0.001
_LIST_SLICE = 5000  # cache entries listed between two yields to the event loop
# Full transfers and repairs: one line each time (they are rare), with the total.
_TRANSFER_EVENTS = (
    ("bulk_sent", "sent a full transfer of the internal cache"),
    ("bulk_received", "received a full transfer from a peer"),
    ("resyncs_sent", "asked the peers for a full transfer"),
    ("repairs_sent", "sent a repair for buckets a peer's digest disagreed on"),
)
# Dropped datagrams are logged per class at most this often (seconds).
DROP_LOG_EVERY = 60.0
_DROPPED_CLASSES = (
    ("auth_failed", "sync datagram(s) that failed authentication (wrong key, or forged)"),
    ("replayed", "replayed or too old sync datagram(s)"),
    ("malformed", "malformed sync datagram(s)"),
    ("version", "sync datagram(s) of another protocol version"),
    ("unknown_type", "sync datagram(s) of an unknown message type"),
    ("queue_overflow", "entries from the full resend queue (the digests repair them)"),
)


class Agent:
    """A running node. Build with a validated :class:`Config`; ``await run()``."""

    def __init__(
        self, config: Config, *, config_path: Path | None = None, key: bytes | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        sync = config.sync
        self.started = time.monotonic()
        self.epoch = int(time.time() * 1000)
        self.internal = Cache("internal", config.entry_filter(), digest=True)
        self.session = SyncSession(
            config.node_id,
            self.epoch,
            Authenticator(key),
            self.internal,
            SessionConfig(
                queue_limit_bytes=sync.resend_queue_bytes,
                alive_interval=sync.alive_interval,
                peer_dead_after=sync.peer_dead_after,
                digest_interval=sync.digest_interval,
            ),
            os.urandom,
        )
        self.inject = sync.disable_external_cache
        self.inject_stats = CacheCounters()  # conntrackd's `external inject` block
        if self.inject:
            self.session.on_external_change = self._queue_injection
        self._inject_updates: dict[bytes, tuple[int, bytes]] = {}  # key -> (node, value)
        self._inject_destroys: set[bytes] = set()
        self._inject_scheduled = False
        self.transport = Transport(
            [
                LinkConfig(
                    interface=ch.interface,
                    group=str(ch.mcast_group) if ch.mcast_group is not None else None,
                    peers=tuple(str(p) for p in ch.peers),
                    port=ch.port,
                    listen_address=str(ch.listen_address) if ch.listen_address else None,
                    sndbuf=sync.sync_queue_bytes,
                    rcvbuf=sync.sync_queue_bytes,
                )
                for ch in sync.channels()
            ],
            self._on_datagram,
        )
        self.control = ControlServer(str(config.control.socket))
        self.pool: CommitPool | None = None
        self.committer: Committer | None = None
        self.kernel: KernelTable | None = None
        self.last_commit: CommitStats | None = None
        self._last_commit_at: float | None = None
        self._commit_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._duplicates_logged = 0
        self._peers_logged: dict[int, bool] = {}
        self._drops_logged: dict[str, tuple[int, float]] = {}
        self._events_logged: dict[str, int] = {}
        self._flush_scheduled = False
        self._timer_deadline = 0.0
        failover = config.failover
        self.controller = FailoverController(
            _Steps(self),
            mechanism=failover.mechanism,
            speaker=failover.mechanism == "vrrp",
            inject=self.inject,
            purge_timeout=config.sync.purge_timeout,
            commit_wait=failover.commit_wait,
        )
        self.speaker: SpeakerThread | None = None
        self.fifo: NotifyFifo | None = None
        self.fifo_ignored = 0
        self.metrics: MetricsServer | None = None
        self.gateways = [GatewayRunner(watch) for watch in config.gateway_watch]

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        sync = self.config.sync
        try:
            # First, while the process is single-threaded: the commit worker is a fork.
            self.pool = CommitPool()
            self.committer = self.pool.local
            self.kernel = KernelTable(
                self.internal,
                rcvbuf=sync.event_listen_queue_bytes,
                rcvbuf_max=sync.event_listen_queue_max_bytes,
                sink=self._on_local_change,
                own_portids=[self.committer.portid],
                after_batch=self._flush,
                expect_helpers=sync.expect_helpers(),
            )
            await self.transport.start()
            self._register_commands()
            await self.control.start()
            endpoint = self.config.metrics.endpoint()
            if endpoint is not None:
                self.metrics = MetricsServer(*endpoint, self.metrics_input)
                await self.metrics.start()
            await self.kernel.start()
            self._tasks.append(loop.create_task(self._timer(), name="ctsync-timer"))
            for gateway in self.gateways:  # after the kernel table: removals reach the peers
                self._tasks.append(loop.create_task(gateway.run(), name=f"gateway-{gateway.name}"))
            await self._start_failover()
            interval = sdnotify.watchdog_interval()
            if interval:
                self._tasks.append(loop.create_task(self._watchdog(interval / 2)))
            log.info(
                "ctsync agent started: node %d, epoch %d, %d entries in the kernel table, "
                "sync links %s",
                self.config.node_id,
                self.epoch,
                len(self.internal),
                ", ".join(ch.interface for ch in sync.channels()),
            )
            if sync.expect_sync:
                log.info("expectation sync on for: %s", ", ".join(sync.expect_sync))
            sdnotify.ready(f"{len(self.internal)} entries")
            await self._stop.wait()
        finally:
            sdnotify.stopping()
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        log.info("stopping")
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply the log level and the filters."""
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
        except Exception as exc:  # a bad file must not stop a running agent
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        logging.getLogger("ctsync").setLevel(new.log.level.upper())
        self.internal.set_filter(new.entry_filter())
        self.config = new
        log.info("configuration reloaded (log level, filters); other changes need a restart")

    async def _start_failover(self) -> None:
        """The role source named by ``failover.mechanism``, once the caches are running."""
        failover = self.config.failover
        if failover.mechanism == "vrrp":
            from ctsync.speaker import SpeakerThread

            self.speaker = SpeakerThread(
                self.config.vrrp,
                before_addresses=self.controller.before_addresses,
                on_group_state=self._on_vrrp_state,
                on_addresses=self.controller.addresses_done,
            )
            await self.speaker.start()
        elif failover.notify_fifo is not None:
            self.fifo = NotifyFifo(failover.notify_fifo, self._on_fifo_line)
            self.fifo.open()

    def _on_vrrp_state(self, old: str, new: str, reason: str) -> None:
        # MASTER goes through before_addresses(), which the speaker awaits; INIT is no role.
        if new != Role.MASTER and new in Role.__members__:
            self.controller.request_role(Role(new), f"VRRP: {reason}")

    def _on_fifo_line(self, line: str) -> None:
        parsed = parse_fifo_line(line)
        failover = self.config.failover
        if failover.sync_group:
            wanted = ("GROUP", failover.sync_group)
        else:
            wanted = ("INSTANCE", str(failover.instance))
        if parsed is None or (parsed[0], parsed[1]) != wanted:
            self.fifo_ignored += 1
            return
        self.controller.request_role(parsed[2], f"keepalived {parsed[0]} {parsed[1]}")

    async def _shutdown(self) -> None:
        if self.speaker is not None:
            # First: the priority-0 advert lets a backup take over within its skew.
            await self.speaker.stop()
        if self.fifo is not None:
            self.fifo.close()
        if self.metrics is not None:
            await self.metrics.close()
        await self.controller.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.control.close()
        self.transport.close()
        if self.kernel is not None:
            self.kernel.close()
        if self.pool is not None:
            self.pool.close()
        log.info("stopped")

    async def _timer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self.session.next_deadline()
            now = loop.time()
            timeout = 1.0 if deadline is None else min(max(deadline - now, 0.0), 1.0)
            self._timer_deadline = now + timeout
            self._wake.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns normally when the
            # event is set just as the task is cancelled, losing the cancel (a stop that
            # hung until systemd's TimeoutStopSec, found under systemd).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self.session.tick(loop.time())
            self._send()
            duplicates = self.session.stats.duplicate_node_id
            if duplicates > self._duplicates_logged:
                if not self._duplicates_logged:
                    log.error(
                        "another agent on the sync link uses node-id %d: node ids must be "
                        "unique, its datagrams are ignored",
                        self.config.node_id,
                    )
                self._duplicates_logged = duplicates
            self._log_changes(loop.time())

    def _log_changes(self, now: float) -> None:
        """Peer up/down once per change; dropped datagrams once per class and at most every
        DROP_LOG_EVERY seconds with the count since the last line: never a line per packet."""
        for node, peer in self.session.peers.items():
            was = self._peers_logged.get(node)
            if was == peer.up:
                continue
            self._peers_logged[node] = peer.up
            if peer.up:
                log.info("peer node %d is up (epoch %d)", node, peer.epoch)
            elif was is not None:
                log.warning(
                    "peer node %d is down: nothing heard for %.1fs",
                    node,
                    now - peer.last_heard,
                )
        stats = self.session.stats
        for name, what in _TRANSFER_EVENTS:
            count = getattr(stats, name)
            logged = self._events_logged.get(name, 0)
            if count > logged:
                self._events_logged[name] = count
                log.info("%s (%d since start)", what, count)
        for name, why in _DROPPED_CLASSES:
            count = getattr(stats, name)
            logged, at = self._drops_logged.get(name, (0, -DROP_LOG_EVERY))
            if count > logged and now - at >= DROP_LOG_EVERY:
                self._drops_logged[name] = (count, now)
                log.warning(
                    "dropped %d %s (%d in all; see show statistics)", count - logged, why, count
                )

    async def _watchdog(self, period: float) -> None:
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(period)

    # --- data paths -----------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _on_local_change(self, change: Change, key: bytes, own: bool) -> None:
        # Our own writes (commit, injection) are not announced back to the peers, nor is
        # an update that changed nothing we sync (only the timeout counting down).
        if not own and change is not Change.UNCHANGED:
            self.session.local_change(key)

    def _flush(self) -> None:
        """After a batch of kernel events: send the changes within FLUSH_DELAY, so that
        the batches of a busy moment share datagrams (and their per-datagram work)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        self.session.flush(self._now())
        self._send()

    def _send(self) -> None:
        for datagram in self.session.datagrams_to_send():
            self.transport.send(datagram)
        deadline = self.session.next_deadline()
        if deadline is not None and deadline < self._timer_deadline:
            self._wake.set()  # the timer sleeps past something now due earlier

    def _on_datagram(self, data: bytes, source: tuple[str, int], link: int) -> None:
        self.session.receive(data, self._now())
        self._send()

    # --- disable-external-cache: peers' entries go straight into the kernel --------------

    def _queue_injection(self, node: int, change: Change, key: bytes, value: bytes | None) -> None:
        if value is None:
            self._inject_updates.pop(key, None)
            self._inject_destroys.add(key)
        else:
            self._inject_destroys.discard(key)
            self._inject_updates[key] = (node, value)
        if not self._inject_scheduled:
            self._inject_scheduled = True
            asyncio.get_running_loop().call_soon(self._inject)

    def _inject(self) -> None:
        """Write the peers' changes into the kernel, keeping ownership straight.

        A connection belongs to the node whose kernel saw it first: the node that
        announces it. Injected entries are excluded from our internal cache (we never
        announce them back), an injection never overwrites nor deletes an entry we own,
        and if a peer announces an entry we hold as ours — after a restart our dump reads
        back what we had injected — we give it up and announce that we no longer hold it.
        Which of two claims is the read-back: the one of the node that started later
        (the newer epoch). The node that kept running keeps its connections; without this
        both would give up on each other's claim, and a restart could take a node's
        connections away from it.
        """
        self._inject_scheduled = False
        committer = self.committer
        if committer is None:
            return
        queued, self._inject_updates = self._inject_updates, {}
        destroys, self._inject_destroys = self._inject_destroys, set()
        internal, exclude, stats = self.internal, self.internal.exclude, self.inject_stats
        updates: dict[bytes, bytes] = {}
        for key, (node, value) in queued.items():
            if key in internal:
                peer = self.session.peers.get(node)
                if peer is not None and peer.epoch > self.epoch:
                    continue  # the peer restarted after us: its claim is our injection
                internal.destroy(key)  # we restarted after it: stop claiming it
                self.session.local_change(key)
            updates[key] = value
        if updates:
            fresh = sum(1 for key in updates if key not in exclude)
            exclude.update(updates)
            result = committer.commit_records(
                list(updates.items()), self.config.sync.commit_timeout_override
            )
            stats.created += min(fresh, result.committed)
            stats.updated += max(result.committed - fresh, 0)
            stats.created_failed += result.failed
        if destroys:
            targets = []
            expectations = []
            for key in destroys:
                if key in internal:
                    continue  # ours: a peer's stale claim never deletes our connection
                exclude.discard(key)
                if expect.is_expectation_key(key):
                    expectations.append(key)
                    continue
                try:
                    targets.append(record.decode_key(key))
                except CtnetlinkError:
                    stats.destroyed_failed += 1
            done, failed = committer.delete_many(targets)
            stats.destroyed += done
            stats.destroyed_failed += failed
            if expectations:
                # The kernel drops an expectation itself when its connection arrives:
                # a delete that finds nothing is not a failure here.
                done, _missing = committer.delete_expectations(expectations)
                stats.destroyed += done
        if updates or destroys:
            self._flush()

    # --- commands -------------------------------------------------------------------------

    def _register_commands(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "statistics": self.cmd_statistics,
            "counts": self.cmd_counts,
            "status": self.cmd_status,
            "cache": self.cmd_cache,
            "commit": self.cmd_commit,
            "flush": self.cmd_flush,
            "resync": self.cmd_resync,
            "bulk-send": self.cmd_bulk_send,
            "failover": self.cmd_failover,
        }
        inline = {"statistics", "counts", "status"}  # cheap, never wait: answered at once
        for name, handler in handlers.items():
            self.control.register(name, handler, inline=name in inline)

    async def cmd_statistics(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.snapshot().to_dict()

    async def cmd_counts(self, args: dict[str, Any]) -> dict[str, int]:
        """Cache sizes only: cheap enough to poll every few milliseconds."""
        external = sum(len(peer.external) for peer in self.session.peers.values())
        return {"internal": len(self.internal), "external": external}

    async def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        snap = self.snapshot()
        failover = self.config.failover
        mechanism: str = failover.mechanism
        if failover.sync_group:
            mechanism += f" [sync-group {failover.sync_group}]"
        elif failover.instance:
            mechanism += f" [instance {failover.instance}]"
        elif failover.mechanism == "vrrp":
            mechanism += f" [sync-group {self.config.vrrp.sync_group}]"
        expect = self.config.sync.expect_sync
        controller = self.controller.status()
        last = controller["transitions"][-1] if controller["transitions"] else None
        return {
            "node_id": self.config.node_id,
            "epoch": self.epoch,
            "sync_interfaces": [ch.interface for ch in self.config.sync.channels()],
            "failover_mechanism": mechanism,
            "last_transition": last,
            "state": controller["state"] or "n/a",
            "expect_sync": ", ".join(expect) if expect else None,
            "peers": [p.__dict__ for p in snap.peers],
            "last_commit": None if snap.last_commit is None else snap.last_commit.__dict__,
            "failover": controller,
            "vrrp": None if self.speaker is None else await self.speaker.status(),
            "gateways": [gateway.snapshot().to_dict() for gateway in self.gateways],
        }

    async def cmd_failover(self, args: dict[str, Any]) -> dict[str, Any]:
        """``ctsync failover master|backup|fault`` (primary-backup.sh's job)."""
        try:
            role, source = parse_notify([str(a) for a in args.get("args", [])])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if self.speaker is not None:
            raise CommandError(
                'failover.mechanism is "vrrp": ctsync\'s own VRRP speaker decides the role'
            )
        transition = await self.controller.set_role(role, source or "ctsync failover")
        return transition.to_dict()

    async def cmd_cache(self, args: dict[str, Any]) -> dict[str, Any]:
        which = args.get("which", "internal")
        try:
            selector = Selector.from_args(args.get("filter") or {})
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        caches = self._caches(which)
        table = args.get("table", "ct")
        if table == "expect":
            return self._expectations(caches, bool(args.get("count")))
        if table != "ct":
            raise CommandError(f"unknown table {table!r}: ct or expect")
        if args.get("count") and selector.is_empty:
            total = sum(len(cache) for _, cache in caches)
            if self.config.sync.expect_sync:  # a scan: only when there can be any
                total -= sum(cache.count_expectations() for _, cache in caches)
            return {"count": total, "entries": []}
        # "records": the raw records, hex-encoded, for the CLI to decode and render; the
        # agent's own cost is then ~1 us per entry instead of ~30 (the default, "entries",
        # returns decoded JSON entries). Either way the loop yields every _LIST_SLICE
        # entries: listing 100k entries must not stall event reading and sync.
        as_records = args.get("format") == "records"
        count_only = bool(args.get("count"))
        count = 0
        out: list[Any] = []
        for node, cache in caches:
            for index, (key, value) in enumerate(cache.items()):
                if index % _LIST_SLICE == _LIST_SLICE - 1:
                    await asyncio.sleep(0)
                if expect.is_expectation_key(key):
                    continue  # listed with table=expect
                if not selector.is_empty or not as_records:
                    try:
                        entry = record.to_entry(key, value)
                    except CtnetlinkError:
                        continue
                    if not selector.matches(entry):
                        continue
                count += 1
                if count_only:
                    continue
                if as_records:
                    out.append([node, key.hex(), value.hex()])
                else:
                    item = entry_to_json(entry)
                    if node is not None:
                        item["peer"] = node
                    out.append(item)
        return {"count": count, "records" if as_records else "entries": out}

    @staticmethod
    def _expectations(caches: list[tuple[int | None, Cache]], count_only: bool) -> dict[str, Any]:
        """The expectation records of the caches (conntrackd -i/-e expect)."""
        out: list[dict[str, Any]] = []
        count = 0
        for node, cache in caches:
            for key, value in cache.expectation_items():
                try:
                    exp = expect.to_expectation(key, value)
                except CtnetlinkError:
                    continue
                count += 1
                if not count_only:
                    item = expect.expectation_to_json(exp)
                    if node is not None:
                        item["peer"] = node
                    out.append(item)
        return {"count": count, "entries": out}

    def _caches(self, which: str) -> list[tuple[int | None, Cache]]:
        if which == "internal":
            return [(None, self.internal)]
        if which == "external":
            return [(node, peer.external) for node, peer in sorted(self.session.peers.items())]
        raise CommandError(f"unknown cache {which!r}: internal or external")

    async def cmd_commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """conntrackd -c: every peer's external cache into the kernel, NAT included."""
        return commit_report(await self.commit())

    async def commit(self, reconcile: bool = True) -> CommitResult:
        """Every peer's external cache into the kernel; ``reconcile=False`` when the
        caller re-reads the kernel itself right after (the failover plan)."""
        pool, kernel = self.pool, self.kernel
        if pool is None or kernel is None:
            raise CommandError("the agent is not running yet")
        async with self._commit_lock:
            caches = [p.external for _, p in sorted(self.session.peers.items()) if p.external]
            if len(caches) == 1:  # a pair: no merge on the failover's critical path
                items = list(caches[0].items())
            else:
                records: dict[bytes, bytes] = {}
                for cache in caches:
                    records.update(cache.items())
                items = list(records.items())
            log.info("committing %d entries from the external caches", len(items))
            timeout = self.config.sync.commit_timeout_override
            with kernel.events_paused(reconcile):
                result = await asyncio.to_thread(pool.commit_records, items, timeout)
            self.last_commit = CommitStats(
                result.attempted,
                result.committed,
                result.failed,
                result.seconds,
                None,
                dict(result.errors),
            )
            self._last_commit_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.observe_commit(self.last_commit)
            log.info(
                "commit done: %d committed, %d failed in %.3fs%s",
                result.committed,
                result.failed,
                result.seconds,
                f" ({dict(result.errors)})" if result.failed else "",
            )
            return result

    async def cmd_flush(self, args: dict[str, Any]) -> dict[str, Any]:
        """conntrackd -f [internal|external]."""
        which = args.get("which", "all")
        flushed = 0
        if which in ("internal", "all"):
            # The internal cache mirrors the kernel: emptying it without reading the kernel
            # again would tell the peers (through anti-entropy) to drop their copy of our
            # connections. So it is re-read at once, as VyOS's reset internal-cache does.
            flushed += self.internal.clear()
            if self.kernel is not None:
                await self.kernel.reconcile()
        if which in ("external", "all"):
            for peer in self.session.peers.values():
                flushed += peer.external.clear()
            self.internal.exclude.clear()
        if which not in ("internal", "external", "all"):
            raise CommandError(f"unknown cache {which!r}: internal, external or all")
        log.info("flushed %s cache(s): %d entries", which, flushed)
        return {"flushed": flushed}

    async def cmd_resync(self, args: dict[str, Any]) -> dict[str, Any]:
        """conntrackd -n (ask the peers for a full transfer) or -R (``kernel``)."""
        if args.get("kernel"):
            if self.kernel is None:
                raise CommandError("the agent is not running yet")
            removed = await self.kernel.reconcile()
            return {"resynced": "kernel", "entries": len(self.internal), "removed": removed}
        self.session.request_resync(self._now())
        self._send()
        return {"resynced": "peers", "peers": sorted(self.session.peers)}

    async def cmd_bulk_send(self, args: dict[str, Any]) -> dict[str, Any]:
        """conntrackd -B: send the whole internal cache to the peers."""
        self.session.bulk_send(self._now())
        self._send()
        return {"entries": len(self.internal)}

    # --- statistics ---------------------------------------------------------------------

    async def metrics_input(self) -> MetricsInput:
        """What a Prometheus scrape reads, taken on this loop in one go."""
        controller = self.controller.status()
        transitions = controller["transitions"]
        return MetricsInput(
            self.snapshot(),
            failover_role=controller["state"],
            failover_transitions=dict(self.controller.transition_counts),
            last_transition=transitions[-1] if transitions else None,
            vrrp=None if self.speaker is None else await self.speaker.status(),
            gateways=tuple(gateway.snapshot() for gateway in self.gateways),
        )

    def snapshot(self) -> Snapshot:
        now = self._now()
        internal = CacheStats.of(len(self.internal), self.internal.counters)
        if self.inject:
            external = CacheStats.of(0, self.inject_stats)
        else:
            external = CacheStats()
            for peer in self.session.peers.values():
                external = external + CacheStats.of(len(peer.external), peer.external.counters)
        transport = self.transport.stats()
        links = tuple(
            LinkStats(
                link.device,
                link.kind,
                link.status,
                link.role,
                link.bytes_sent,
                link.bytes_recv,
                link.packets_sent,
                link.packets_recv,
                link.send_errors,
                link.recv_errors,
            )
            for link in transport.links
        )
        k = self.kernel.stats if self.kernel is not None else None
        netlink = (
            NetlinkStats()
            if k is None
            else NetlinkStats(
                k.events_received,
                k.events_own,
                k.events_unknown_type,
                k.catch_event_failed,
                k.netlink_overrun,
                k.resync_with_kernel_table,
                k.buffer_size,
                k.last_reconcile_seconds,
            )
        )
        peers = tuple(
            PeerStats(
                node,
                p.epoch,
                p.verified,
                p.up,
                None if p.last_heard == float("-inf") else max(now - p.last_heard, 0.0),
                p.resync_in_progress,
                len(p.external),
                p.counters.data_received,
                p.counters.lost,
            )
            for node, p in sorted(self.session.peers.items())
        )
        commit = self.last_commit
        if commit is not None and self._last_commit_at is not None:
            commit = CommitStats(
                commit.attempted,
                commit.committed,
                commit.failed,
                commit.seconds,
                time.monotonic() - self._last_commit_at,
                commit.errors,
            )
        return Snapshot(
            node_id=self.config.node_id,
            epoch=self.epoch,
            uptime_seconds=time.monotonic() - self.started,
            internal=internal,
            external=external,
            external_inject=self.inject,
            traffic_bytes=0,
            traffic_packets=0,
            links=links,
            netlink=netlink,
            sync=self.session.stats.as_dict(),
            queue_entries=self.session.queue_len,
            queue_bytes=self.session.queue_bytes,
            peers=peers,
            last_commit=commit,
        )


def commit_report(result: CommitResult) -> dict[str, Any]:
    """A commit's result as ``ctsync commit`` and the failover status show it."""
    return {
        "attempted": result.attempted,
        "committed": result.committed,
        "failed": result.failed,
        "seconds": result.seconds,
        "errors": dict(result.errors),
        "expectations": {
            "attempted": result.expect_attempted,
            "committed": result.expect_committed,
            "failed": result.expect_failed,
        },
    }


class _Steps:
    """The failover steps, as the controller runs them, on this agent's parts."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def commit(self) -> dict[str, Any]:
        # reconcile=False: the plan's resync step follows.
        return commit_report(await self.agent.commit(reconcile=False))

    def adopt(self) -> dict[str, Any]:
        """disable-external-cache: the peers' entries in our kernel are ours from now on
        (the next resync reads them into the internal cache and announces them)."""
        exclude = self.agent.internal.exclude
        adopted = len(exclude)
        exclude.clear()
        return {"adopted": adopted}

    def flush_external(self) -> dict[str, Any]:
        flushed = sum(peer.external.clear() for peer in self.agent.session.peers.values())
        self.agent.internal.exclude.clear()
        return {"flushed": flushed}

    async def resync_kernel(self) -> dict[str, Any]:
        kernel = self.agent.kernel
        if kernel is None:
            raise CommandError("the agent is not running yet")
        # After a commit that outlived commit-wait: read the kernel once it is done (its
        # events were paused, and it does not reconcile by itself here).
        async with self.agent._commit_lock:
            removed = await kernel.reconcile()
        return {"entries": len(self.agent.internal), "removed": removed}

    def bulk_send(self) -> dict[str, Any]:
        agent = self.agent
        agent.session.bulk_send(agent._now())
        agent._send()
        return {"entries": len(agent.internal)}

    def request_resync(self) -> dict[str, Any]:
        agent = self.agent
        agent.session.request_resync(agent._now())
        agent._send()
        return {"peers": sorted(agent.session.peers)}

    async def purge(self, timeout: int) -> dict[str, Any]:
        """Our own entries (never those peers injected) get ``timeout`` seconds to live."""
        owned = self.agent.internal.keys()
        keys = [key for key in owned if not expect.is_expectation_key(key)]
        result = await asyncio.to_thread(set_timeouts, keys, timeout)
        log.info(
            "purge: %d entries set to expire in %ds (%d gone already, %d failed)",
            result.updated,
            timeout,
            result.gone,
            result.failed,
        )
        return {"updated": result.updated, "gone": result.gone, "failed": result.failed}


class GatewayRunner:
    """One ``[[gateway-watch]]``: a probe every ``interval``, the pure state machine
    (``ctsync.core.gateway``), and, on the changes ``flush-on`` names, the removal of the
    matching connections in a thread. Removals are local: their DESTROY events reach the
    peers like any other. Removals of one watch run one at a time, while probing goes on."""

    def __init__(self, watch: GatewayWatch) -> None:
        self.watch = watch
        self.name = watch.name
        self.selector = watch.match.selector()
        self.match = watch.match.describe()
        rules = WatchRules(watch.down_after, watch.up_after, frozenset(watch.flush_on))
        self.machine = GatewayMachine(rules, since=time.monotonic())
        self._flush_lock = asyncio.Lock()
        self._flushes: set[asyncio.Task[None]] = set()

    def _prober(self) -> Prober:
        watch = self.watch
        source = None if watch.source_address is None else str(watch.source_address)
        if watch.probe == "tcp":
            assert watch.port is not None  # the config requires it
            return TcpProber(
                str(watch.address), watch.port, source=source, interface=watch.interface
            )
        return IcmpProber(str(watch.address), source=source, interface=watch.interface)

    def snapshot(self) -> GatewaySnapshot:
        return GatewaySnapshot.of(
            self.name, self.watch.target(), self.machine, self.match, time.monotonic(), time.time()
        )

    async def run(self) -> None:
        watch, machine = self.watch, self.machine
        prober = self._prober()
        log.info(
            "gateway watch %s: %s every %gs, down after %d lost, up after %d answered;"
            " on %s remove connections matching %s",
            self.name,
            watch.target(),
            watch.interval,
            watch.down_after,
            watch.up_after,
            " and ".join(watch.flush_on) or "no change",
            describe_match(self.match),
        )
        machine.since = time.monotonic()
        logged_error: str | None = None
        next_at = time.monotonic()
        try:
            while True:
                try:
                    result = await prober.probe(watch.timeout)
                except Exception as exc:  # a bug in a probe must not end the watch
                    log.exception("gateway %s: probe raised", self.name)
                    result = ProbeResult("error", error=f"{type(exc).__name__}: {exc}")
                if result.error is not None and result.error != logged_error:
                    # Once per cause, not once per probe.
                    log.warning("gateway %s: probe failed: %s", self.name, result.error)
                if result.outcome == "ok":
                    logged_error = None
                elif result.error is not None:
                    logged_error = result.error
                now = time.monotonic()
                change = machine.observe(now, result.outcome, result.rtt, result.error)
                if change is not None:
                    self._changed(change)
                next_at = max(next_at + watch.interval, now)  # late: no burst to catch up
                await asyncio.sleep(next_at - now)
        finally:
            prober.close()
            for task in self._flushes:
                task.cancel()

    def _changed(self, change: Transition) -> None:
        if not change.flush:
            log.log(
                logging.WARNING if change.new == GatewayState.DOWN else logging.INFO,
                "gateway %s (%s) is %s (was %s): %s",
                self.name,
                self.watch.target(),
                change.new,
                change.old,
                change.reason,
            )
            return
        task = asyncio.get_running_loop().create_task(self._flush(change))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, change: Transition) -> None:
        async with self._flush_lock:
            self.machine.flush_started()
            try:
                result = await asyncio.to_thread(remove_connections, self.selector)
            except Exception as exc:  # reported like a failed dump, not lost in a task
                log.exception("gateway %s: removing connections raised", self.name)
                result = RemovalResult(0, 0, 0.0, f"{type(exc).__name__}: {exc}")
            finally:
                self.machine.flushing = False
            report = FlushReport(
                change.event,
                result.removed,
                result.failed,
                result.seconds,
                time.monotonic(),
                result.error,
            )
            self.machine.flush_done(report)
        matching = describe_match(self.match)
        outcome = (
            f"removed {result.removed} connection{'' if result.removed == 1 else 's'}"
            f" matching {matching}"
            f" ({result.failed} failed) in {result.seconds:.3f}s"
        )
        if result.error is not None:
            outcome = f"could not remove the connections matching {matching}: {result.error}"
        log.log(
            logging.WARNING if change.new == GatewayState.DOWN or result.error else logging.INFO,
            "gateway %s (%s) is %s (was %s): %s; %s",
            self.name,
            self.watch.target(),
            change.new,
            change.old,
            change.reason,
            outcome,
        )


def load_key(config: Config) -> bytes | None:
    if config.auth.allow_unauthenticated:
        log.warning(
            "auth.allow-unauthenticated is set: sync datagrams are NOT authenticated; anyone "
            "who can reach the sync link can inject connections into this firewall"
        )
        return None
    return read_key(config.auth.key_file)


def run_agent(config_path: Path) -> int:
    """``ctsync agent --config PATH``: returns the process exit status."""
    config = load_config(config_path)
    setup_logging(config.log.format, config.log.level)
    agent = Agent(config, config_path=config_path, key=load_key(config))
    asyncio.run(agent.run())
    return 0


def setup_logging(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Human-readable lines on a terminal; key=value lines under systemd (no timestamps:
    the journal adds them); JSON on request. Lines going to the journal start with their
    syslog priority (``<3>`` ...), so that ``journalctl -p err`` finds the errors."""
    import json
    import sys

    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "text" if out.isatty() else "logfmt"
    priority = _JOURNAL_PRIORITY if stream_is_journal(out) else {}

    class _Formatter(logging.Formatter):
        def format(self, record_: logging.LogRecord) -> str:
            message = record_.getMessage()
            if fmt == "json":
                line = json.dumps(
                    {"level": record_.levelname.lower(), "logger": record_.name, "msg": message}
                )
            elif fmt == "logfmt":
                level = record_.levelname.lower()
                line = f"level={level} logger={record_.name} msg={json.dumps(message)}"
            else:
                line = (
                    f"{self.formatTime(record_)} {record_.levelname:<7} {record_.name}: {message}"
                )
            return priority.get(record_.levelno, "") + line

    handler = logging.StreamHandler(out)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("ctsync")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# sd-daemon(3) prefixes: the journal reads a line's priority from them (SyslogLevelPrefix=).
_JOURNAL_PRIORITY = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}


def stream_is_journal(stream: TextIO) -> bool:
    """Whether *stream* is connected to the journal: systemd sets JOURNAL_STREAM to the
    device and inode of the stream it gave the service (a redirection elsewhere differs)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file behind it (a test's capture)
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"
