"""The VRRP state machine of a sync group, as keepalived 2.2.7 runs it (reference §5, §9.3).

Pure: the runner feeds events with the current monotonic time (``start``, ``receive`` for
an advert that already passed :func:`~ctsync.core.vrrp.packet.check_advert`, ``tick`` at
:meth:`SyncGroup.next_deadline`, ``link``, ``shutdown``) and executes the returned
actions in list order. ``link`` says whether an instance can run at all: its interface
up, and (the runner's business) existing, with the source address the instance sends
from; ``set_primary`` fixes that address while the instance cannot run.

Every instance belongs to one sync group (a lone instance is a group of one), so all
members always share the group's state: any member falling to BACKUP takes the others
with it, any FAULT faults them all, and the group becomes MASTER only when every member
wants to (a member whose Master_Down expired waits, re-arming its timer, until all the
others' have expired too; keepalived's ``vrrp_sync_can_goto_master``).

Action order is a contract with the runner and the failover controller:

* entering MASTER: ``GroupState``, ``InstanceState`` per member, ``SendAdvert`` per
  member, ``AddAddresses`` per member, ``Announce`` per member. The runner sends the
  adverts, commits the synced connection state, and only then adds the addresses;
* leaving MASTER: ``GroupState``, ``InstanceState`` per member, ``SendAdvert`` priority 0
  where keepalived sends one (FAULT, shutdown), ``RemoveAddresses`` per member.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from ctsync.core.vrrp.packet import Advert, master_down_us, skew_us

PRIO_OWNER = 255
PRIO_STOP = 0


class State(StrEnum):
    INIT = "INIT"
    BACKUP = "BACKUP"
    MASTER = "MASTER"
    FAULT = "FAULT"
    STOP = "STOP"


@dataclass(frozen=True)
class InstanceParams:
    """One instance as the machine needs it (the runner builds it from the config).

    ``interval_cs`` is the own advert interval in centiseconds (v2: seconds * 100);
    ``start_master`` is keepalived's ``state MASTER`` with priority 255 (address owner);
    ``primary`` is the packed source address our adverts carry (IPv4 primary or IPv6
    link-local), which the equal-priority tie-break compares.
    """

    name: str
    version: int
    vrid: int
    priority: int
    interval_cs: int
    preempt: bool
    preempt_delay: float
    start_master: bool
    primary: bytes
    family: int


# --- actions: the runner executes them in list order ------------------------------------


@dataclass(frozen=True, slots=True)
class SendAdvert:
    """Send one advert now (to the group or to every unicast peer); priority 0 = resign."""

    instance: str
    priority: int


@dataclass(frozen=True, slots=True)
class AddAddresses:
    instance: str


@dataclass(frozen=True, slots=True)
class RemoveAddresses:
    instance: str


@dataclass(frozen=True, slots=True)
class Announce:
    """Gratuitous ARP / unsolicited NA burst now; the runner schedules the repeat."""

    instance: str


@dataclass(frozen=True, slots=True)
class InstanceState:
    instance: str
    old: State
    new: State
    reason: str


@dataclass(frozen=True, slots=True)
class GroupState:
    group: str
    old: State
    new: State
    reason: str


Action = SendAdvert | AddAddresses | RemoveAddresses | Announce | InstanceState | GroupState


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """A snapshot of one member, for status output.

    ``master`` is the current master's address as far as we know: our own primary while
    MASTER, the source of the last advert heard while BACKUP, None when unknown.
    ``master_interval_cs`` is Master_Adver_Interval (v3 learns it from the master).
    """

    name: str
    state: State
    priority: int
    base_priority: int
    master: bytes | None
    master_priority: int | None
    master_interval_cs: int
    down_deadline: float | None
    advert_deadline: float | None
    preempt_deadline: float | None
    wants_master: bool
    link_up: bool
    reason: str


class _Member:
    """Mutable per-instance state (the group owns the state itself)."""

    def __init__(self, params: InstanceParams) -> None:
        self.p = params
        self.priority = params.priority  # effective: 254 after an owner conflict
        self.master_interval_cs = params.interval_cs
        self.down_at: float | None = None
        self.advert_at: float | None = None
        self.master: bytes | None = None
        self.master_priority: int | None = None
        self.wants_master = False
        self.link_up = True
        self.down_why = ""  # why the link is "down" (the runner's words)
        self.preempt_until: float | None = None
        self.reason = ""

    def master_down(self) -> float:
        return master_down_us(self.p.version, self.priority, self.master_interval_cs) / 1e6

    def skew(self) -> float:
        return skew_us(self.p.version, self.priority, self.master_interval_cs) / 1e6

    def interval(self) -> float:
        return self.p.interval_cs / 100


def _addr(addr: bytes) -> str:
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        return addr.hex()


def _compare(a: bytes, b: bytes) -> int:
    """keepalived's inet_inaddrcmp: unsigned, network order; other families compare equal."""
    if len(a) != len(b):
        return 0
    return (a > b) - (a < b)


class SyncGroup:
    """The state machine the runner drives: one sync group of VRRP instances."""

    def __init__(self, name: str, instances: Sequence[InstanceParams]) -> None:
        if not instances:
            raise ValueError("a sync group needs at least one instance")
        self.name = name
        self._members: dict[str, _Member] = {}
        for params in instances:
            if params.name in self._members:
                raise ValueError(f"instance {params.name!r} is listed twice")
            if params.version not in (2, 3) or not 1 <= params.interval_cs <= 0x0FFF:
                raise ValueError(f"instance {params.name!r}: bad version or interval")
            if not 1 <= params.priority <= PRIO_OWNER:
                raise ValueError(f"instance {params.name!r}: priority must be 1..255")
            self._members[params.name] = _Member(params)
        self._state = State.INIT
        self._reason = ""

    # --- views -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        """Why the group entered its current state."""
        return self._reason

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    def instance(self, name: str) -> InstanceStatus:
        m = self._members[name]
        return InstanceStatus(
            name=name,
            state=self._state,
            priority=m.priority,
            base_priority=m.p.priority,
            master=m.master,
            master_priority=m.master_priority,
            master_interval_cs=m.master_interval_cs,
            down_deadline=m.down_at,
            advert_deadline=m.advert_at,
            preempt_deadline=m.preempt_until,
            wants_master=m.wants_master,
            link_up=m.link_up,
            reason=m.reason,
        )

    def instances(self) -> tuple[InstanceStatus, ...]:
        return tuple(self.instance(name) for name in self._members)

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do (None: nothing is armed)."""
        times = [t for _m, t, _kind in self._timers()]
        return min(times) if times else None

    # --- events --------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """keepalived's startup: remove leftover addresses, enter BACKUP (init), arm timers.

        Owners (``start_master``) time out at once (keepalived arms 1 µs); a group made
        only of owners therefore goes MASTER straight away, without reporting BACKUP.
        """
        if self._state is not State.INIT:
            return []
        actions: list[Action] = [RemoveAddresses(n) for n in self._members]
        down = [m for m in self._members.values() if not m.link_up]
        if down:
            actions += self._enter(State.FAULT, f"{down[0].p.name}: {down[0].down_why}", None)
            return actions
        members = self._members.values()
        if all(m.p.start_master for m in members):
            actions += self._enter_master("address owner (init)", None, now)
            return actions
        actions += self._enter(State.BACKUP, "init", None)
        for m in members:
            m.down_at = now if m.p.start_master else now + m.master_down()
        actions += self.tick(now)
        return actions

    def receive(self, instance: str, adv: Advert, src: bytes, now: float) -> list[Action]:
        """A valid advert (it passed check_advert) from ``src`` for ``instance``."""
        m = self._members[instance]
        if self._state is State.BACKUP:
            self._backup_rx(m, adv, src, now)
            return []
        if self._state is State.MASTER:
            return self._master_rx(m, adv, src, now)
        return []  # INIT, FAULT, STOP: ignored (reference D3)

    def tick(self, now: float) -> list[Action]:
        """Run every timer due at ``now``, earliest first."""
        actions: list[Action] = []
        while True:
            due = [(t, kind, m) for m, t, kind in self._timers() if t <= now]
            if not due:
                return actions
            _t, kind, m = min(due, key=lambda d: d[0])
            if kind == "advert":
                m.advert_at = now + m.interval()  # re-armed after each send (§5.5)
                actions.append(SendAdvert(m.p.name, m.priority))
            else:
                actions += self._down_expired(m, now)

    def link(self, instance: str, up: bool, now: float, why: str | None = None) -> list[Action]:
        """The instance can no longer run (FAULT for the group) or can again.

        ``why`` goes into the transition's reason ("link down" / "link up" by default):
        the runner also reports an interface that does not exist, or has no address to
        send from, as down.
        """
        m = self._members[instance]
        if m.link_up == up:
            return []
        m.link_up = up
        why = why or ("link up" if up else "link down")
        if not up:
            m.down_why = why
        if self._state in (State.INIT, State.STOP):
            return []
        if not up:
            if self._state is State.FAULT:
                return []
            return self._enter(State.FAULT, f"{instance}: {why}", m)
        if self._state is not State.FAULT or not all(x.link_up for x in self._members.values()):
            return []
        actions = self._enter(State.BACKUP, f"{instance}: {why}", m)
        for x in self._members.values():
            x.down_at = now + x.master_down()
        return actions

    def set_primary(self, instance: str, primary: bytes) -> None:
        """The instance's source address, learned after the group was built.

        Only while the instance is down (``link(instance, False, ...)``): the address is in
        every advert and in the tie-break, so it is fixed while the instance runs.
        """
        m = self._members[instance]
        if m.link_up:
            raise ValueError(f"instance {instance!r}: its source changes only while it is down")
        if len(primary) != (4 if m.p.family == 4 else 16):
            raise ValueError(f"instance {instance!r}: not an IPv{m.p.family} address")
        m.p = replace(m.p, primary=primary)

    def shutdown(self, now: float) -> list[Action]:
        """Graceful stop: masters resign with a priority-0 advert and drop their addresses."""
        if self._state is State.STOP:
            return []
        return self._enter(State.STOP, "shutdown", None)

    # --- internals -----------------------------------------------------------------------

    def _timers(self) -> Iterator[tuple[_Member, float, str]]:
        for m in self._members.values():
            if self._state is State.MASTER and m.advert_at is not None:
                yield m, m.advert_at, "advert"
            elif self._state is State.BACKUP and m.down_at is not None:
                yield m, m.down_at, "down"

    def _down_expired(self, m: _Member, now: float) -> list[Action]:
        m.wants_master = True
        if all(x.wants_master for x in self._members.values()):
            return self._enter_master(f"{m.p.name}: master-down timer expired", m, now)
        # Another member still hears its master: stay BACKUP, look again later.
        m.down_at = now + m.master_down()
        return []

    def _backup_rx(self, m: _Member, adv: Advert, src: bytes, now: float) -> None:
        """keepalived's vrrp_state_backup (reference §5.3)."""
        p = m.p
        if adv.priority == PRIO_STOP:
            m.down_at = now + m.skew()  # the master resigned: take over after Skew
            return
        delay_pending = p.preempt_delay > 0 and (m.preempt_until is None or m.preempt_until > now)
        if not p.preempt or adv.priority >= m.priority or delay_pending:
            if p.version == 3:
                m.master_interval_cs = adv.interval_cs  # Master_Adver_Interval, learned
            m.down_at = now + m.master_down()
            m.master, m.master_priority = src, adv.priority
            if p.preempt_delay > 0:
                if adv.priority >= m.priority:
                    m.preempt_until = None
                elif m.preempt_until is None:
                    m.preempt_until = now + p.preempt_delay  # "start preempt delay"
            m.wants_master = False
        else:
            # "received lower priority advert - discarding": the timer keeps running, so
            # we take over Master_Down after the last advert we accepted.
            m.master, m.master_priority = src, adv.priority

    def _master_rx(self, m: _Member, adv: Advert, src: bytes, now: float) -> list[Action]:
        """keepalived's vrrp_state_master_rx (reference §5.4)."""
        name = m.p.name
        if adv.priority == PRIO_STOP:
            m.advert_at = now + m.interval()
            return [SendAdvert(name, m.priority)]
        cmp = _compare(src, m.p.primary)
        reason = ""
        if adv.priority == m.priority:
            if cmp == 0:
                return []  # "equal priority advert received from remote host with our IP"
            if m.priority == PRIO_OWNER:
                m.priority = PRIO_OWNER - 1
                reason = (
                    f"{name}: CONFIGURATION ERROR: local instance and {_addr(src)} are both"
                    f" configured as address owner, reducing local priority"
                )
        if adv.priority < m.priority or (adv.priority == m.priority and cmp < 0):
            # "Received advert with lower priority, forcing new election"
            m.advert_at = now + m.interval()
            return [SendAdvert(name, m.priority), Announce(name)]
        if not reason:
            reason = (
                f"{name}: higher priority {adv.priority} advert from {_addr(src)}"
                if adv.priority > m.priority
                else f"{name}: same priority {adv.priority} from higher address {_addr(src)}"
            )
        if m.p.version == 3:
            m.master_interval_cs = adv.interval_cs
        actions = self._enter(State.BACKUP, reason, m)
        m.down_at = now + m.master_down()
        m.master, m.master_priority = src, adv.priority
        for x in self._members.values():
            if x is not m:
                x.down_at = now + x.master_down()
        return actions

    def _enter_master(self, reason: str, trigger: _Member | None, now: float) -> list[Action]:
        actions = self._enter(State.MASTER, reason, trigger)
        for m in self._members.values():
            m.master_interval_cs = m.p.interval_cs  # back to our own interval
            m.advert_at = now + m.interval()
            m.master, m.master_priority = m.p.primary, m.priority
        names = list(self._members)
        members = list(self._members.values())
        actions += [SendAdvert(m.p.name, m.priority) for m in members]
        actions += [AddAddresses(n) for n in names]
        actions += [Announce(n) for n in names]
        return actions

    def _enter(self, new: State, reason: str, trigger: _Member | None) -> list[Action]:
        """Move the whole group; the MASTER extras are added by :meth:`_enter_master`."""
        old = self._state
        self._state, self._reason = new, reason
        actions: list[Action] = [GroupState(self.name, old, new, reason)]
        for m in self._members.values():
            m.reason = reason if m is trigger or trigger is None else f"sync group: {reason}"
            actions.append(InstanceState(m.p.name, old, new, m.reason))
            m.down_at = m.advert_at = m.preempt_until = None
            m.wants_master = False
            if new is not State.MASTER:
                m.master = m.master_priority = None  # unknown until an advert is heard
                if new is not State.BACKUP:
                    m.master_interval_cs = m.p.interval_cs
        if old is State.MASTER:
            # keepalived resigns with priority 0 when going to FAULT or stopping (not to
            # BACKUP); an instance whose own link is down cannot send.
            if new in (State.FAULT, State.STOP):
                actions += [
                    SendAdvert(m.p.name, PRIO_STOP) for m in self._members.values() if m.link_up
                ]
            actions += [RemoveAddresses(n) for n in self._members]
        return actions
