"""ctsync's own VRRP speaker: where the pure ``core.vrrp`` state machine meets the sockets.

One :class:`VrrpSpeaker` runs all ``[[vrrp.instance]]`` entries as one sync group (a
firewall's connection state has a single role). It owns

* the raw VRRP sockets (:mod:`ctsync.io.vrrp_socket`), one per interface, family and
  multicast / unicast source, shared by the instances that match (dispatch by VRID);
* the virtual addresses and their announcements (:mod:`ctsync.io.vip`);
* a link watcher that turns interface up/down into ``SyncGroup.link``;
* one timer, armed for ``SyncGroup.next_deadline()`` after every event.

An instance runs only when its interface exists, is up, and has the address it sends
from (the primary IPv4 address, the IPv6 link-local address, or ``unicast-src``).
Until then it is "down" for the state machine, so its group is in FAULT: the agent may
start before DHCP or networkd have configured the interface, or before the interface
exists at all, as keepalived with ``dynamic_interfaces`` does. Link and address events
(rtnetlink) make the speaker look again (:meth:`VrrpSpeaker._check`, one path for a
late address, a late interface, a re-created one and a removed source): once the
address is there, the sockets are opened with it and the instance leaves FAULT. The
source is in every advert and in the tie-break, so it is chosen then and kept while
the instance runs; if it goes away, the instance goes back to FAULT (keepalived does).

The core returns actions; they run here, in order. Adverts go out at once, whatever else
is pending: a new master that made its peers wait for its commit would lose the election
it just won. Address work (add, remove, announce) is queued and done in order by one
task, because becoming MASTER waits for ``before_addresses`` — the agent commits the
synced connections there — *before* the addresses are added: "commit before VIP", the
race keepalived + conntrackd lose (DESIGN.md). If the group leaves MASTER while that wait
runs, the addresses of that now stale transition are not added at all.

Received adverts go through keepalived's checks (``check_advert``); each rejection is
counted per reason and logged at most once a minute per instance and reason.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from ctsync.config import VrrpConfig, VrrpInstance
from ctsync.core.vrrp.machine import (
    AddAddresses,
    Announce,
    GroupState,
    InstanceParams,
    InstanceState,
    InstanceStatus,
    RemoveAddresses,
    SendAdvert,
    State,
    SyncGroup,
)
from ctsync.core.vrrp.packet import (
    AUTH_NONE,
    AUTH_PASS,
    Advert,
    Expect,
    VrrpPacketError,
    check_advert,
    decode_advert_ex,
    encode_advert,
    pass_auth_data,
)
from ctsync.io.vip import Addresses, LinkWatcher, Vip, link_is_up, send_garp, send_unsolicited_na
from ctsync.io.vrrp_socket import (
    ChannelKey,
    RateLimitedLog,
    Received,
    VrrpChannel,
    VrrpSocketError,
    check_raw_socket,
)

log = logging.getLogger("ctsync.vrrp")

_TRANSITIONS_KEPT = 10


class SpeakerError(OSError):
    """The speaker cannot start (no rtnetlink or raw socket, conflicting instances).

    A missing interface or address is not one: the instance waits for it in FAULT.
    """


def _wallclock() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


@dataclass(frozen=True)
class _SlotKey:
    """What makes instances share a socket, known from the config alone: the channel's
    key without the source address a unicast channel binds to (found at run time)."""

    interface: str
    family: int
    unicast: bool
    unicast_src: bytes | None  # configured; None: the interface's own address


@dataclass
class _Slot:
    """The instances sharing one socket, and the socket once it can be opened.

    ``up`` says whether its instances run (``SyncGroup.link`` up); ``problem`` why not.
    ``channel`` is the open socket while up; after a fault it stays, closed, for the
    status (its source and counters) until the next one replaces it.
    """

    key: _SlotKey
    exclude: frozenset[bytes]  # the virtual addresses: never a source
    instances: list[_Instance] = field(default_factory=list)
    by_vrid: dict[int, _Instance] = field(default_factory=dict)
    ifindex: int | None = None  # the interface's index when last looked up
    channel: VrrpChannel | None = None
    up: bool = False
    problem: str | None = "not checked yet"
    warned: str | None = None  # the cause last logged; again only once it changed

    def names(self) -> str:
        return ", ".join(i.name for i in self.instances)


@dataclass
class _Instance:
    """Runtime side of one configured instance."""

    cfg: VrrpInstance
    vips: list[Vip]
    slot: _Slot
    params: InstanceParams
    expect: Expect
    peers: list[bytes]  # unicast destinations; empty for multicast
    old_checksum: bool = False  # v3/IPv4 unicast: the peer uses the pre-1.3.6 form
    sent: int = 0
    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    transitions_total: Counter[str] = field(default_factory=Counter)  # by new state
    transitions: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=_TRANSITIONS_KEPT)
    )
    announce_handles: list[asyncio.TimerHandle] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def channel(self) -> VrrpChannel | None:
        return self.slot.channel

    @property
    def ifindex(self) -> int | None:
        return self.slot.ifindex


# Address work queued for the worker; ``generation`` is the group transition it belongs to.
@dataclass(frozen=True)
class _Work:
    kind: str  # "before" | "add" | "remove" | "announce" | "added"
    instance: str | None
    generation: int


class VrrpSpeaker:
    """The VRRP speaker of one node (see the module docstring)."""

    def __init__(
        self,
        config: VrrpConfig,
        *,
        before_addresses: Callable[[], Awaitable[None]],
        on_group_state: Callable[[State, State, str], None],
        on_addresses: Callable[[bool], None] | None = None,
    ) -> None:
        if not config.instance:
            raise SpeakerError("no [[vrrp.instance]] configured")
        self.config = config
        self.before_addresses = before_addresses
        self.on_group_state = on_group_state
        # Called once the addresses of a MASTER transition are added and announced (True),
        # or were not added because the group left MASTER meanwhile (False).
        self.on_addresses = on_addresses
        self.group: SyncGroup | None = None
        self.instances: dict[str, _Instance] = {}
        self.slots: dict[_SlotKey, _Slot] = {}
        self.addresses = Addresses()
        self.links: LinkWatcher | None = None
        self.unknown_vrid = 0
        self.group_transitions: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=_TRANSITIONS_KEPT
        )
        self._generation = 0
        self._master = False  # the group's latest state is MASTER
        self._holding: set[str] = set()  # instances whose addresses we added
        self._work: asyncio.Queue[_Work] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = RateLimitedLog(log)
        self._checker: asyncio.Task[None] | None = None
        self._recheck = False  # interfaces or addresses changed since the last check began
        self._retry: asyncio.TimerHandle | None = None
        self._started = False
        self._stopped = False

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open rtnetlink, clear stale addresses, start the group (raises SpeakerError).

        Instances whose interface or source address is missing start in FAULT.
        """
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._work = asyncio.Queue()
        try:
            self._setup()
            for family in sorted({k.family for k in self.slots}):
                check_raw_socket(family)
            await self.addresses.open()
            # Subscribed before the first look: nothing that changes after it is missed.
            self.links = LinkWatcher(
                {k.interface for k in self.slots}, self._on_link, self._on_addresses
            )
            self.links.start()
            for slot in self.slots.values():
                await self._check(slot)
        except (VrrpSocketError, OSError) as exc:
            await self._close_io()
            raise SpeakerError(str(exc)) from exc
        except BaseException:
            await self._close_io()
            raise
        params = []
        for inst in self.instances.values():
            channel = inst.channel
            if inst.slot.up and channel is not None:
                params.append(replace(inst.params, primary=channel.source))
            else:
                params.append(inst.params)  # a placeholder until it has one
        self.group = SyncGroup(self.config.sync_group, params)
        self._worker = asyncio.create_task(self._run_work(), name="vrrp-addresses")
        self._started = True
        now = self._loop.time()
        for slot in self.slots.values():
            if not slot.up:  # before start: start enters FAULT
                for inst in slot.instances:
                    self.group.link(inst.name, False, now, slot.problem)
        # start() begins with RemoveAddresses for every instance, as keepalived: leftovers
        # of a crash would make two holders of an address.
        self._dispatch(self.group.start(now))
        self._announce_sources()
        self._arm()
        log.info(
            "VRRP speaker started: sync group %s, instances %s",
            self.config.sync_group,
            ", ".join(
                f"{i.name} (VRID {i.cfg.virtual_router_id} on {i.cfg.interface} IPv"
                f"{i.cfg.family} {'unicast' if i.slot.key.unicast else 'multicast'}, v"
                f"{i.cfg.version}, priority {i.cfg.priority})"
                for i in self.instances.values()
            ),
        )
        if self._recheck:  # something changed while we looked
            self._kick()

    def _setup(self) -> None:
        """The instances and the sockets they will share, from the config alone."""
        every_vip = frozenset(
            Vip.parse(text).address for cfg in self.config.instance for text in cfg.virtual_address
        )
        for cfg in self.config.instance:
            vips = [Vip.parse(text) for text in cfg.virtual_address]
            family = cfg.family
            unicast = bool(cfg.unicast_peer)
            src = cfg.unicast_src.packed if cfg.unicast_src is not None else None
            key = _SlotKey(cfg.interface, family, unicast, src)
            slot = self.slots.get(key)
            if slot is None:
                slot = self.slots[key] = _Slot(key, every_vip)
            if cfg.virtual_router_id in slot.by_vrid:
                raise SpeakerError(
                    f"vrrp instance {cfg.name}: VRID {cfg.virtual_router_id} is already used"
                    f" by {slot.by_vrid[cfg.virtual_router_id].name} on {cfg.interface}"
                )
            auth_type = AUTH_PASS if cfg.auth_pass else AUTH_NONE
            auth_data = pass_auth_data(cfg.auth_pass) if cfg.auth_pass else bytes(8)
            params = InstanceParams(
                name=cfg.name,
                version=cfg.version,
                vrid=cfg.virtual_router_id,
                priority=cfg.priority,
                interval_cs=cfg.advert_centiseconds,
                preempt=cfg.preempt,
                preempt_delay=cfg.preempt_delay,
                start_master=cfg.state == "MASTER",
                primary=src or bytes(4 if family == 4 else 16),
                family=family,
            )
            expect = Expect(
                version=cfg.version,
                vrid=cfg.virtual_router_id,
                family=family,
                addresses=frozenset(v.address for v in vips),
                interval_cs=cfg.advert_centiseconds,
                auth_type=auth_type,
                auth_data=auth_data,
                multicast=not unicast,
            )
            inst = _Instance(
                cfg=cfg,
                vips=vips,
                slot=slot,
                params=params,
                expect=expect,
                peers=[p.packed for p in cfg.unicast_peer],
            )
            self.instances[cfg.name] = inst
            slot.instances.append(inst)
            slot.by_vrid[cfg.virtual_router_id] = inst

    async def stop(self) -> None:
        """Graceful stop: priority-0 adverts from a master, then its addresses removed."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._checker
            self._checker = None
        assert self.group is not None
        try:
            self._dispatch(self.group.shutdown(loop.time()))
        except Exception:
            log.exception("VRRP shutdown of the state machine failed")
        # Whatever the worker was doing (maybe waiting for a commit) no longer matters:
        # the addresses must go.
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
            self._worker = None
        for inst in self.instances.values():
            self._cancel_announces(inst)
        for name in sorted(self._holding):
            await self._remove(self.instances[name])
        await self._close_io()
        log.info("VRRP speaker stopped")

    async def _close_io(self) -> None:
        if self.links is not None:
            self.links.close()
            self.links = None
        for slot in self.slots.values():
            if slot.channel is not None:
                slot.channel.close()
        await self.addresses.close()

    # --- events -------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_packet(self, slot: _Slot, channel: VrrpChannel, packet: Received) -> None:
        if self.group is None or self._stopped or channel is not slot.channel:
            return
        msg = packet.message
        inst = slot.by_vrid.get(msg[1]) if len(msg) >= 2 else None
        if inst is None:
            self.unknown_vrid += 1  # D2: keepalived ignores these silently
            return
        try:
            adv, old = decode_advert_ex(
                msg, src=packet.src, dst=packet.dst, verify_ipv6_checksum=False
            )
            check_advert(adv, inst.expect, ttl=packet.ttl, dst=packet.dst)
        except VrrpPacketError as exc:
            inst.rejected[exc.reason] += 1
            self._log(
                logging.WARNING,
                (inst.name, exc.reason),
                "VRRP %s: advert from %s rejected (%s): %s",
                inst.name,
                _text(packet.src),
                exc.reason,
                exc,
            )
            return
        if old and not inst.old_checksum:
            inst.old_checksum = True
            log.info("VRRP %s: peer uses the old unicast VRRPv3 checksum; so do we now", inst.name)
        inst.received += 1
        self._dispatch(self.group.receive(inst.name, adv, packet.src, self._now()))
        self._arm()

    def _on_timer(self) -> None:
        self._timer = None
        if self.group is None or self._stopped:
            return
        self._dispatch(self.group.tick(self._now()))
        self._arm()

    def _on_link(self, ifname: str, up: bool) -> None:
        if self._stopped:
            return
        if self.group is None:  # starting: looked at once start() is through
            self._recheck = True
            return
        log.info("VRRP: interface %s is %s", ifname, "up" if up else "down")
        if not up:
            # At once, not after a look at the addresses: a master must let go now.
            for slot in self.slots.values():
                if slot.key.interface == ifname:
                    self._down(slot, "link down")
            self._arm()
        # Up: the sockets are (re)opened first, on the device that now has the name; it
        # may be a new one (deleted and re-created, or moved back from another
        # namespace), and a backup that hears nothing would become a second master.
        self._kick()

    def _on_addresses(self) -> None:
        if self._stopped:
            return
        if self.group is None:
            self._recheck = True
            return
        self._kick()

    def _kick(self) -> None:
        """Look at every slot again soon: one look at a time, another if events came
        during it."""
        self._recheck = True
        if self._loop is None or self._stopped:
            return
        if self._checker is None or self._checker.done():
            self._checker = self._loop.create_task(self._check_all(), name="vrrp-check")

    async def _check_all(self) -> None:
        while self._recheck and not self._stopped:
            self._recheck = False
            for slot in self.slots.values():
                try:
                    await self._check(slot)
                except Exception as exc:
                    self._log(
                        logging.WARNING,
                        ("check", slot.key),
                        "VRRP %s: cannot read the state of %s: %s",
                        slot.names(),
                        slot.key.interface,
                        exc,
                    )
                    self._retry_later()
            self._arm()

    def _retry_later(self) -> None:
        """After a failure that no event will follow (a socket error): look again in 1 s."""
        if self._retry is None and self._loop is not None and not self._stopped:

            def fire() -> None:
                self._retry = None
                self._kick()

            self._retry = self._loop.call_later(1.0, fire)

    async def _check(self, slot: _Slot) -> None:
        """Bring ``slot`` in line with its interface: running with its sockets open on the
        interface's current device and its source address there, or down saying why."""
        key = slot.key
        ifname = key.interface
        ifindex = await self.addresses.ifindex(ifname)
        if ifindex is None:
            self._down(slot, f"interface {ifname} does not exist")
            return
        slot.ifindex = ifindex
        if not link_is_up(ifname):
            self._down(slot, "link down")
            return
        channel = slot.channel
        lost: str | None = None
        if slot.up and channel is not None:
            if channel.ifindex != ifindex:
                lost = f"{ifname} was re-created"
            elif await self.addresses.present(channel.source, None if key.unicast_src else ifindex):
                return  # running as it should
            else:
                lost = f"its source {_text(channel.source)} was removed"
        source: bytes | None
        if key.unicast_src is not None:
            source = key.unicast_src
            if not await self.addresses.present(source):
                self._down(slot, f"unicast-src {_text(source)} is not an address of this host")
                return
        elif channel is not None and await self.addresses.present(channel.source, ifindex):
            source = channel.source  # the same source as before the fault, if still there
        elif key.family == 4:
            source = await self.addresses.primary_ipv4(ifindex, exclude=slot.exclude)
            if source is None:
                self._down(slot, f"{ifname} has no IPv4 address")
                return
        else:
            source = await self.addresses.link_local(ifindex)
            if source is None:
                self._down(slot, f"{ifname} has no usable IPv6 link-local address")
                return
        if lost is not None:
            # The source changes: through FAULT, so that the election starts again with it.
            self._down(slot, lost)
        if self._stopped or slot.up or not link_is_up(ifname):
            return  # changed while we looked; the event that said so looks again
        new = VrrpChannel(
            ChannelKey(ifname, key.family, source if key.unicast else None),
            ifindex=ifindex,
            source=source,
            on_packet=functools.partial(self._on_packet, slot),
        )
        try:
            new.open()
        except VrrpSocketError as exc:
            self._down(slot, f"cannot open its socket: {exc}")
            self._retry_later()
            return
        if channel is not None:
            new.adopt_counters(channel)
            channel.close()
        slot.channel = new
        assert self._loop is not None
        new.start(self._loop)
        if channel is not None and channel.ifindex != ifindex:
            log.info("VRRP: sockets reopened on the new %s", ifname)
        log.info("VRRP %s: sending from %s on %s", slot.names(), _text(source), ifname)
        self._up(slot)

    def _down(self, slot: _Slot, why: str) -> None:
        """The slot's instances cannot run: FAULT for the group (said once per cause)."""
        slot.problem = why
        if why not in (slot.warned, "link down"):  # the link watcher logs link changes
            slot.warned = why
            log.warning("VRRP %s: %s; FAULT until that changes", slot.names(), why)
        if not slot.up:
            return
        slot.up = False
        if self.group is not None:
            now = self._now()
            for inst in slot.instances:
                self._dispatch(self.group.link(inst.name, False, now, why))
        # After the FAULT transition: a member still on the socket may resign through it.
        if slot.channel is not None:
            slot.channel.close()

    def _up(self, slot: _Slot) -> None:
        """The slot's sockets are open with their source: its instances may run."""
        channel = slot.channel
        assert channel is not None
        why = "link up" if slot.problem == "link down" else f"sending from {_text(channel.source)}"
        slot.up, slot.problem, slot.warned = True, None, None
        if self.group is None:
            return
        now = self._now()
        for inst in slot.instances:
            self.group.set_primary(inst.name, channel.source)
        for inst in slot.instances:
            self._dispatch(self.group.link(inst.name, True, now, why))
        self._announce_sources(slot)
        self._arm()

    def _announce_sources(self, slot: _Slot | None = None) -> None:
        """Unicast instances: one gratuitous ARP / unsolicited NA for our own source address,
        as keepalived sends when it starts or leaves FAULT. A peer that sent us adverts
        before we existed holds a failed neighbour entry for us; refreshed, its adverts
        reach us before our Master_Down runs out (else both would be master for a moment)."""
        for each in [slot] if slot is not None else list(self.slots.values()):
            channel = each.channel
            if not each.key.unicast or not each.up or channel is None:
                continue
            ifname = each.key.interface
            if each.key.family == 4:
                send_garp(ifname, [channel.source], 1)
            else:
                send_unsolicited_na(ifname, channel.ifindex, [channel.source], 1)

    def _arm(self) -> None:
        """One timer, for the state machine's next deadline."""
        if self.group is None or self._stopped or self._loop is None:
            return
        deadline = self.group.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    # --- actions ------------------------------------------------------------------------

    def _dispatch(self, actions: list[Any]) -> None:
        """Run the core's actions in order: adverts and notifications now, addresses queued."""
        for action in actions:
            try:
                self._do(action)
            except Exception:
                log.exception("VRRP action %r failed", action)
        if any(isinstance(a, GroupState) and a.new == State.MASTER for a in actions):
            self._queue("added", None)  # after this transition's adds and announces

    def _do(self, action: Any) -> None:
        if isinstance(action, SendAdvert):
            self._send(self.instances[action.instance], action.priority)
        elif isinstance(action, GroupState):
            self._generation += 1
            self._master = action.new == State.MASTER
            self.group_transitions.append(
                {
                    "time": _wallclock(),
                    "from": str(action.old),
                    "to": str(action.new),
                    "reason": action.reason,
                }
            )
            log.info(
                "VRRP group %s: %s -> %s (%s)", action.group, action.old, action.new, action.reason
            )
            if self._master:
                self._queue("before", None)
            try:
                self.on_group_state(action.old, action.new, action.reason)
            except Exception:
                log.exception("VRRP group state handler failed")
        elif isinstance(action, InstanceState):
            inst = self.instances[action.instance]
            inst.transitions_total[str(action.new)] += 1
            inst.transitions.append(
                {
                    "time": _wallclock(),
                    "from": str(action.old),
                    "to": str(action.new),
                    "reason": action.reason,
                }
            )
            log.info(
                "VRRP %s: %s -> %s (%s)", action.instance, action.old, action.new, action.reason
            )
        elif isinstance(action, AddAddresses):
            self._queue("add", action.instance)
        elif isinstance(action, RemoveAddresses):
            self._cancel_announces(self.instances[action.instance])
            self._queue("remove", action.instance)
        elif isinstance(action, Announce):
            self._queue("announce", action.instance)
        else:
            log.warning("VRRP: unknown action %r ignored", action)

    def _queue(self, kind: str, instance: str | None) -> None:
        if self._work is not None:
            self._work.put_nowait(_Work(kind, instance, self._generation))

    def _send(self, inst: _Instance, priority: int) -> None:
        cfg = inst.cfg
        adv = Advert(
            version=cfg.version,
            vrid=cfg.virtual_router_id,
            priority=priority,
            interval_cs=cfg.advert_centiseconds,
            addresses=tuple(v.address for v in inst.vips),
            auth_type=inst.expect.auth_type,
            auth_data=inst.expect.auth_data if inst.expect.auth_type else b"",
        )
        channel = inst.channel
        if channel is None:
            return  # never opened: the instance is in FAULT, and sends nothing there
        for dst in inst.peers or [channel.group]:
            msg = encode_advert(adv, src=channel.source, dst=dst, old_checksum=inst.old_checksum)
            if channel.send(msg, dst):
                inst.sent += 1

    async def _run_work(self) -> None:
        assert self._work is not None
        while True:
            work = await self._work.get()
            try:
                await self._do_work(work)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("VRRP address work %s failed", work)

    async def _do_work(self, work: _Work) -> None:
        current = work.generation == self._generation and self._master
        if work.kind == "before":
            if current:
                try:
                    await self.before_addresses()
                except Exception:
                    # The addresses are taken anyway: forwarding with part of the state
                    # beats not forwarding.
                    log.exception("VRRP: before_addresses failed; adding the addresses anyway")
            return
        if work.kind == "added":
            if self.on_addresses is not None:
                self.on_addresses(current)
            return
        assert work.instance is not None
        inst = self.instances[work.instance]
        if work.kind == "remove":
            await self._remove(inst)
        elif work.kind == "add":
            ifindex = inst.ifindex
            if not current or ifindex is None:
                log.info("VRRP %s: no longer master; addresses not added", inst.name)
                return
            self._holding.add(inst.name)
            for vip in inst.vips:
                await self.addresses.add(ifindex, vip)
        elif work.kind == "announce" and current:
            self._announce(inst)
            delay = inst.cfg.garp_master_delay
            if delay > 0:
                assert self._loop is not None
                generation = work.generation
                handle = self._loop.call_later(delay, self._announce_again, inst, generation)
                inst.announce_handles.append(handle)

    def _announce_again(self, inst: _Instance, generation: int) -> None:
        inst.announce_handles = [h for h in inst.announce_handles if not h.cancelled()]
        if generation == self._generation and self._master and not self._stopped:
            self._announce(inst)

    def _announce(self, inst: _Instance) -> None:
        count = inst.cfg.garp_master_repeat
        addrs = [v.address for v in inst.vips]
        if inst.cfg.family == 4:
            send_garp(inst.cfg.interface, addrs, count)
        elif inst.ifindex is not None:
            send_unsolicited_na(inst.cfg.interface, inst.ifindex, addrs, count)

    def _cancel_announces(self, inst: _Instance) -> None:
        for handle in inst.announce_handles:
            handle.cancel()
        inst.announce_handles.clear()

    async def _remove(self, inst: _Instance) -> None:
        self._holding.discard(inst.name)
        ifindex = inst.ifindex
        if ifindex is None:
            return  # the interface never existed: nothing of ours on it
        for vip in inst.vips:
            try:
                await self.addresses.remove(ifindex, vip)
            except Exception:
                log.exception("VRRP %s: removing %s failed", inst.name, vip)

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """JSON-able view for ``ctsync show status``."""
        group = self.group
        instances = []
        for inst in self.instances.values():
            view = group.instance(inst.name) if group is not None else None
            instances.append(
                {
                    "name": inst.name,
                    "interface": inst.cfg.interface,
                    "family": inst.cfg.family,
                    "version": inst.cfg.version,
                    "virtual_router_id": inst.cfg.virtual_router_id,
                    "mode": "unicast" if inst.slot.key.unicast else "multicast",
                    "source": _text(inst.channel.source) if inst.channel is not None else None,
                    "problem": inst.slot.problem,
                    "virtual_addresses": [str(v) for v in inst.vips],
                    **_instance_view(view, inst),
                    "adverts_sent": inst.sent,
                    "adverts_received": inst.received,
                    "rejected": dict(inst.rejected),
                    "transitions_total": dict(inst.transitions_total),
                    "old_unicast_checksum": inst.old_checksum,
                    "holds_addresses": inst.name in self._holding,
                    "transitions": list(inst.transitions),
                }
            )
        return {
            "sync_group": self.config.sync_group,
            "state": str(group.state) if group is not None else str(State.INIT),
            "transitions": list(self.group_transitions),
            "instances": instances,
            "unknown_vrid": self.unknown_vrid,
            "channels": [s.channel.stats() for s in self.slots.values() if s.channel is not None],
        }


def _instance_view(view: InstanceStatus | None, inst: _Instance) -> dict[str, Any]:
    """The core's per-instance status, as JSON-able fields."""
    if view is None:
        return {"state": str(State.INIT), "priority": inst.cfg.priority}
    return {
        "state": str(view.state),
        "priority": view.priority,
        "base_priority": view.base_priority,
        "master": _text(view.master) if view.master else None,
        "master_priority": view.master_priority,
        "learned_interval": view.master_interval_cs / 100,
        "link_up": view.link_up,
        "reason": view.reason,
    }


class SpeakerThread:
    """A :class:`VrrpSpeaker` on an event loop and thread of its own.

    VRRP timing must not wait for the agent's loop: a reconcile dump, a burst of events or
    a commit can keep it busy for longer than Master_Down (0.36 s at 100 ms adverts), and a
    backup that reads its adverts late takes over from a live master (keepalived runs VRRP
    in a process of its own for the same reason). The callbacks run on the agent's loop,
    in the order the speaker makes them.
    """

    def __init__(
        self,
        config: VrrpConfig,
        *,
        before_addresses: Callable[[], Coroutine[Any, Any, None]],
        on_group_state: Callable[[State, State, str], None],
        on_addresses: Callable[[bool], None],
    ) -> None:
        self.config = config
        self._before_addresses = before_addresses
        self._on_group_state = on_group_state
        self._on_addresses = on_addresses
        self.speaker: VrrpSpeaker | None = None
        self._agent_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Start the thread and the speaker in it; raises what ``VrrpSpeaker.start`` does."""
        self._agent_loop = asyncio.get_running_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(started,), name="ctsync-vrrp", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(started)

    def _main(self, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        speaker = VrrpSpeaker(
            self.config,
            before_addresses=self._before,
            on_group_state=self._state,
            on_addresses=self._addresses,
        )
        try:
            loop.run_until_complete(speaker.start())
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        self.speaker = speaker
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # The speaker's callbacks (its thread) -> the agent's loop.

    async def _before(self) -> None:
        assert self._agent_loop is not None
        future = asyncio.run_coroutine_threadsafe(self._before_addresses(), self._agent_loop)
        await asyncio.wrap_future(future)

    def _state(self, old: State, new: State, reason: str) -> None:
        assert self._agent_loop is not None
        self._agent_loop.call_soon_threadsafe(self._on_group_state, old, new, reason)

    def _addresses(self, added: bool) -> None:
        assert self._agent_loop is not None
        self._agent_loop.call_soon_threadsafe(self._on_addresses, added)

    # The agent's calls -> the speaker's loop.

    async def stop(self) -> None:
        """Graceful stop (priority-0 adverts, addresses removed), then end the thread."""
        loop, speaker, thread = self._loop, self.speaker, self._thread
        if loop is None or speaker is None or thread is None:
            return
        try:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(speaker.stop(), loop))
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join, 10.0)
            self.speaker = None

    async def status(self) -> dict[str, Any]:
        loop, speaker = self._loop, self.speaker
        if loop is None or speaker is None:  # starting or stopped
            return {"sync_group": self.config.sync_group, "state": str(State.INIT)}

        async def read() -> dict[str, Any]:
            return speaker.status()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(read(), loop))
