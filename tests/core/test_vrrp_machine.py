"""The VRRP sync-group state machine, driven by a fake clock, against keepalived's behaviour
(reference §5, §9.3): every transition, with keepalived's exact (µs-truncated) times."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctsync.core.vrrp.machine import (
    Action,
    AddAddresses,
    Announce,
    GroupState,
    InstanceParams,
    InstanceState,
    RemoveAddresses,
    SendAdvert,
    State,
    SyncGroup,
)
from ctsync.core.vrrp.packet import Advert


def a(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


ME = a("192.0.2.2")
LOWER = a("192.0.2.1")  # numerically lower than ME
HIGHER = a("192.0.2.3")
VIP = a("192.0.2.100")
T0 = 100.0

B, M, F, N, S = State.BACKUP, State.MASTER, State.FAULT, State.INIT, State.STOP


def params(name: str = "VI_1", **kw: object) -> InstanceParams:
    base = InstanceParams(
        name=name,
        version=3,
        vrid=51,
        priority=100,
        interval_cs=100,
        preempt=True,
        preempt_delay=0.0,
        start_master=False,
        primary=ME,
        family=4,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def adv(priority: int, interval_cs: int = 100, version: int = 3) -> Advert:
    return Advert(version, 51, priority, interval_cs, (VIP,))


def group(*members: InstanceParams, now: float = T0) -> SyncGroup:
    g = SyncGroup("G1", members or (params(),))
    g.start(now)
    return g


def became_master(names: tuple[str, ...], old: State = B) -> list[Action]:
    """The action list of a group entering MASTER: the runner's contract."""
    actions: list[Action] = [GroupState("G1", old, M, "")]
    actions += [InstanceState(n, old, M, "") for n in names]
    actions += [SendAdvert(n, 100) for n in names]
    actions += [AddAddresses(n) for n in names]
    actions += [Announce(n) for n in names]
    return actions


def strip(actions: list[Action]) -> list[Action]:
    """Actions with the free-text reasons blanked, for exact comparisons."""
    return [
        replace(act, reason="") if isinstance(act, GroupState | InstanceState) else act
        for act in actions
    ]


def master_group(*members: InstanceParams) -> SyncGroup:
    g = group(*members)
    while g.state is not M:
        deadline = g.next_deadline()
        assert deadline is not None
        g.tick(deadline)
    return g


# --- start ---------------------------------------------------------------------------------


def test_start_removes_addresses_then_backup_init() -> None:
    g = SyncGroup("G1", [params()])
    assert g.state is N and g.next_deadline() is None
    actions = g.start(T0)
    assert strip(actions) == [
        RemoveAddresses("VI_1"),
        GroupState("G1", N, B, ""),
        InstanceState("VI_1", N, B, ""),
    ]
    assert actions[1] == GroupState("G1", N, B, "init")
    assert g.next_deadline() == T0 + 3.609375
    assert g.start(T0 + 1) == []  # once only


def test_backup_becomes_master_at_exactly_master_down() -> None:
    g = group()
    g.receive("VI_1", adv(150), HIGHER, 110.0)
    assert g.next_deadline() == 113.609375
    assert g.tick(113.609374) == []
    actions = g.tick(113.609375)
    assert strip(actions) == became_master(("VI_1",))
    assert actions[0].reason == "VI_1: master-down timer expired"  # type: ignore[union-attr]
    view = g.instance("VI_1")
    assert view.state is M and view.master == ME and view.advert_deadline == 114.609375


def test_no_peer_master_after_own_master_down() -> None:
    # §5.1: priority 150 at 1 s: start -> MASTER 3.414 s (measured 3.41-3.43).
    g = group(params(priority=150))
    assert g.next_deadline() == T0 + 3.414062
    assert g.tick(T0 + 3.414061) == []
    assert g.tick(T0 + 3.414062) != [] and g.state is M


def test_master_sends_every_own_interval() -> None:
    g = master_group()
    start = g.next_deadline()
    assert start is not None
    sent = []
    now = start
    for _ in range(5):
        assert g.tick(now - 0.001) == []
        sent += g.tick(now)
        next_deadline = g.next_deadline()
        assert next_deadline == pytest.approx(now + 1.0)
        now = next_deadline  # type: ignore[assignment]
    assert sent == [SendAdvert("VI_1", 100)] * 5
    # A late tick re-arms from when it ran (keepalived: "now + advert_int").
    assert g.tick(now + 0.25) == [SendAdvert("VI_1", 100)]
    assert g.next_deadline() == pytest.approx(now + 1.25)


def test_late_tick_runs_each_timer_once() -> None:
    g = master_group()
    assert g.tick(T0 + 60) == [SendAdvert("VI_1", 100)]


# --- BACKUP receiving (§5.3) ------------------------------------------------------------------


def test_priority_zero_takes_over_after_skew() -> None:
    g = group()
    g.receive("VI_1", adv(150), HIGHER, 110.0)
    assert g.receive("VI_1", adv(0), HIGHER, 110.5) == []
    assert g.next_deadline() == 110.5 + 0.609375
    assert g.tick(111.109374) == []
    assert g.tick(111.109375) != [] and g.state is M


def test_priority_zero_skew_v3_fast_and_v2() -> None:
    g = group(params(interval_cs=10))
    g.receive("VI_1", adv(150, 10), HIGHER, 110.0)
    assert g.next_deadline() == 110.0 + 0.360937
    g.receive("VI_1", adv(0, 10), HIGHER, 110.1)
    assert g.next_deadline() == 110.1 + 0.060937
    v2 = group(params(version=2, interval_cs=300))
    v2.receive("VI_1", adv(150, 300, 2), HIGHER, 110.0)
    assert v2.next_deadline() == 110.0 + 9.609375
    v2.receive("VI_1", adv(0, 300, 2), HIGHER, 111.0)
    assert v2.next_deadline() == 111.0 + 0.609375  # v2 skew is not scaled


def test_equal_priority_accepted_in_backup_whatever_the_address() -> None:
    for src in (LOWER, HIGHER):
        g = group()
        g.receive("VI_1", adv(100), src, 110.0)
        assert g.next_deadline() == 113.609375
        assert g.instance("VI_1").master == src
        assert g.instance("VI_1").master_priority == 100


def test_lower_priority_discarded_timer_not_reset() -> None:
    # §5.3: keepalived 200 vs a crafted master at 100: MASTER at its own Master_Down.
    g = group(params(priority=200))
    deadline = T0 + 3.21875
    for second in range(1, 4):
        assert g.receive("VI_1", adv(100), LOWER, T0 + second) == []
        assert g.next_deadline() == deadline
    assert g.tick(deadline) != [] and g.state is M


def test_higher_priority_backup_preempts_after_last_accepted_advert() -> None:
    g = group(params(priority=200))
    g.receive("VI_1", adv(250), HIGHER, 101.0)  # accepted: 104.21875
    g.receive("VI_1", adv(100), LOWER, 102.0)  # the old master is now lower: discarded
    g.receive("VI_1", adv(100), LOWER, 103.0)
    assert g.tick(104.218749) == [] and g.state is B
    assert g.tick(104.21875) != [] and g.state is M


def test_nopreempt_stays_backup() -> None:
    g = group(params(priority=200, preempt=False))
    for second in range(1, 30):
        assert g.receive("VI_1", adv(100), LOWER, T0 + second) == []
        assert g.tick(T0 + second + 0.5) == []
    assert g.state is B and g.next_deadline() == T0 + 29 + 3.21875


def test_preempt_delay() -> None:
    # §5.3: preempt_delay 3 -> MASTER ~ delay + Master_Down (measured +5.94 s).
    g = group(params(priority=200, preempt_delay=3.0))
    g.receive("VI_1", adv(100), LOWER, 100.5)  # starts the delay: until 103.5
    assert g.instance("VI_1").preempt_deadline == 103.5
    g.receive("VI_1", adv(100), LOWER, 101.5)
    g.receive("VI_1", adv(100), LOWER, 102.5)  # still accepted: timer reset
    assert g.next_deadline() == 102.5 + 3.21875
    g.receive("VI_1", adv(100), LOWER, 103.5)  # delay over: discarded
    g.receive("VI_1", adv(100), LOWER, 104.5)
    assert g.instance("VI_1").preempt_deadline == 103.5  # not restarted
    assert g.tick(105.718749) == []
    assert g.tick(105.71875) != [] and g.state is M


def test_preempt_delay_cancelled_by_higher_priority() -> None:
    g = group(params(priority=200, preempt_delay=3.0))
    g.receive("VI_1", adv(100), LOWER, 100.5)
    g.receive("VI_1", adv(220), HIGHER, 101.0)
    assert g.instance("VI_1").preempt_deadline is None
    g.receive("VI_1", adv(100), LOWER, 102.0)  # a new lower master: a new delay
    assert g.instance("VI_1").preempt_deadline == 105.0


def test_v3_learns_master_interval() -> None:
    g = group()
    g.receive("VI_1", adv(150, 300), HIGHER, 110.0)
    assert g.instance("VI_1").master_interval_cs == 300
    assert g.next_deadline() == 110.0 + 10.828125  # §5.1: learned 3 s
    g.receive("VI_1", adv(150, 50), HIGHER, 111.0)
    assert g.next_deadline() == 111.0 + 1.804687  # learned 0.5 s
    g.receive("VI_1", adv(150, 300), HIGHER, 112.0)
    g.receive("VI_1", adv(0, 300), HIGHER, 113.0)
    assert g.next_deadline() == 113.0 + 1.828125  # Skew with the learned interval
    g.tick(114.828125)
    assert g.state is M
    view = g.instance("VI_1")
    assert view.master_interval_cs == 100  # own interval again as master
    assert view.advert_deadline == 115.828125


def test_v2_does_not_learn() -> None:
    g = group(params(version=2))
    g.receive("VI_1", adv(150, 100, 2), HIGHER, 110.0)
    assert g.instance("VI_1").master_interval_cs == 100


def test_owner_in_backup_state_waits_skew_of_255() -> None:
    g = group(params(priority=255))
    assert g.next_deadline() == T0 + 3.003906


# --- MASTER receiving (§5.4) ------------------------------------------------------------------


def test_master_answers_priority_zero() -> None:
    g = master_group()
    assert g.receive("VI_1", adv(0), HIGHER, 110.3) == [SendAdvert("VI_1", 100)]
    assert g.state is M and g.next_deadline() == 111.3


def test_master_forces_new_election_on_lower_priority() -> None:
    g = master_group()
    actions = g.receive("VI_1", adv(50), HIGHER, 110.3)
    assert actions == [SendAdvert("VI_1", 100), Announce("VI_1")]
    assert g.state is M and g.next_deadline() == 111.3  # schedule restarts from the reply


def test_tie_break_equal_priority_lower_address_stays_master() -> None:
    g = master_group()
    assert g.receive("VI_1", adv(100), LOWER, 110.3) == [
        SendAdvert("VI_1", 100),
        Announce("VI_1"),
    ]
    assert g.state is M


def test_tie_break_equal_priority_higher_address_goes_backup() -> None:
    g = master_group()
    actions = g.receive("VI_1", adv(100), HIGHER, 110.3)
    assert strip(actions) == [
        GroupState("G1", M, B, ""),
        InstanceState("VI_1", M, B, ""),
        RemoveAddresses("VI_1"),
    ]
    assert "same priority 100 from higher address 192.0.2.3" in actions[0].reason  # type: ignore[union-attr]
    assert g.next_deadline() == 110.3 + 3.609375
    assert g.instance("VI_1").master == HIGHER


def test_tie_break_is_unsigned_numeric() -> None:
    g = master_group(params(primary=a("192.0.2.200")))
    # 192.0.2.20 < 192.0.2.200 numerically (unsigned big-endian), not as text.
    assert g.receive("VI_1", adv(100), a("192.0.2.20"), 110.0)[0] == SendAdvert("VI_1", 100)
    g2 = master_group(params(primary=a("10.0.0.1")))
    g2.receive("VI_1", adv(100), a("200.0.0.1"), 110.0)  # high bit set: still "higher"
    assert g2.state is B


def test_higher_priority_takes_over_no_advert_learns_interval() -> None:
    g = master_group()
    actions = g.receive("VI_1", adv(150, 200), LOWER, 110.0)
    assert not any(isinstance(x, SendAdvert) for x in actions)
    assert RemoveAddresses("VI_1") in actions and g.state is B
    assert g.instance("VI_1").master_interval_cs == 200
    assert g.next_deadline() == 110.0 + 7.21875  # 3 * 2 s + 156 * 2 s / 256


def test_equal_priority_from_own_address_is_ignored() -> None:
    g = master_group()
    before = g.next_deadline()
    assert g.receive("VI_1", adv(100), ME, 110.0) == []
    assert g.state is M and g.next_deadline() == before


def test_owner_starts_master_at_once() -> None:
    g = SyncGroup("G1", [params(priority=255, start_master=True)])
    actions = g.start(T0)
    assert strip(actions) == [
        RemoveAddresses("VI_1"),
        GroupState("G1", N, M, ""),
        InstanceState("VI_1", N, M, ""),
        SendAdvert("VI_1", 255),
        AddAddresses("VI_1"),
        Announce("VI_1"),
    ]
    assert g.next_deadline() == T0 + 1.0


def test_both_owners_lower_to_254_and_go_backup() -> None:
    for src in (LOWER, HIGHER):
        g = SyncGroup("G1", [params(priority=255, start_master=True)])
        g.start(T0)
        actions = g.receive("VI_1", adv(255), src, 100.5)
        assert g.state is B, src
        assert "CONFIGURATION ERROR" in actions[0].reason  # type: ignore[union-attr]
        assert not any(isinstance(x, SendAdvert) for x in actions)
        view = g.instance("VI_1")
        assert (view.priority, view.base_priority) == (254, 255)
        assert g.next_deadline() == 100.5 + master_down_254()
        # The other owner goes away: we take over, advertising 254.
        assert SendAdvert("VI_1", 254) in g.tick(200.0)


def master_down_254() -> float:
    return 3.007812  # 3 s + (256 - 254) * 100 cs * 625 / 16 µs = 7812 µs (truncated)


# --- FAULT and shutdown ---------------------------------------------------------------------


def test_link_down_master_goes_fault_and_back_to_backup() -> None:
    g = master_group()
    actions = g.link("VI_1", False, 110.0)
    assert strip(actions) == [
        GroupState("G1", M, F, ""),
        InstanceState("VI_1", M, F, ""),
        RemoveAddresses("VI_1"),  # no priority-0 advert: its own link is down
    ]
    assert g.next_deadline() is None
    assert g.receive("VI_1", adv(0), HIGHER, 111.0) == []  # ignored in FAULT
    assert g.tick(1000.0) == []
    assert g.link("VI_1", False, 111.0) == []
    actions = g.link("VI_1", True, 112.0)
    assert strip(actions) == [GroupState("G1", F, B, ""), InstanceState("VI_1", F, B, "")]
    assert g.next_deadline() == 112.0 + 3.609375


def test_link_up_resets_learned_interval() -> None:
    g = group()
    g.receive("VI_1", adv(150, 300), HIGHER, 110.0)
    assert strip(g.link("VI_1", False, 111.0)) == [
        GroupState("G1", B, F, ""),
        InstanceState("VI_1", B, F, ""),
    ]
    g.link("VI_1", True, 112.0)
    assert g.instance("VI_1").master_interval_cs == 100
    assert g.next_deadline() == 112.0 + 3.609375


def test_link_down_before_start_starts_in_fault() -> None:
    g = SyncGroup("G1", [params()])
    assert g.link("VI_1", False, T0) == []
    assert strip(g.start(T0)) == [
        RemoveAddresses("VI_1"),
        GroupState("G1", N, F, ""),
        InstanceState("VI_1", N, F, ""),
    ]
    assert g.link("VI_1", True, T0 + 1) != [] and g.state is B


def test_shutdown_master_resigns_then_removes() -> None:
    g = master_group()
    actions = g.shutdown(110.0)
    assert strip(actions) == [
        GroupState("G1", M, S, ""),
        InstanceState("VI_1", M, S, ""),
        SendAdvert("VI_1", 0),
        RemoveAddresses("VI_1"),
    ]
    assert g.next_deadline() is None
    assert g.receive("VI_1", adv(150), HIGHER, 111.0) == []
    assert g.tick(1000.0) == [] and g.shutdown(112.0) == []
    assert g.link("VI_1", False, 113.0) == []


def test_shutdown_backup_sends_nothing() -> None:
    g = group()
    assert strip(g.shutdown(110.0)) == [GroupState("G1", B, S, ""), InstanceState("VI_1", B, S, "")]


# --- sync group (§9.3) ------------------------------------------------------------------------

VI_1, VI_2 = params("VI_1"), params("VI_2", vrid=52)


def test_group_starts_together() -> None:
    g = SyncGroup("G1", [VI_1, VI_2])
    assert strip(g.start(T0)) == [
        RemoveAddresses("VI_1"),
        RemoveAddresses("VI_2"),
        GroupState("G1", N, B, ""),
        InstanceState("VI_1", N, B, ""),
        InstanceState("VI_2", N, B, ""),
    ]


def test_group_master_action_order() -> None:
    g = group(VI_1, VI_2)
    assert strip(g.tick(T0 + 3.609375)) == became_master(("VI_1", "VI_2"))


def test_member_waits_for_all_members() -> None:
    g = group(VI_1, VI_2)
    # VI_1 keeps hearing its master; VI_2 hears nothing.
    for second in range(1, 20):
        g.receive("VI_1", adv(150), HIGHER, T0 + second)
        assert g.tick(T0 + second + 0.5) == []
    assert g.state is B
    view = g.instance("VI_2")
    assert view.wants_master and view.state is B
    # VI_2's timer is re-armed each time it expires and finds VI_1 unwilling.
    assert view.down_deadline is not None and view.down_deadline > T0 + 19
    # VI_1's master dies after its advert at T0 + 19: the group goes MASTER at its timeout.
    assert g.tick(T0 + 19 + 3.609374) == []
    assert strip(g.tick(T0 + 19 + 3.609375)) == became_master(("VI_1", "VI_2"))


def test_priority_zero_on_one_member_waits_for_the_other() -> None:
    # Observed: VI_1 did not take over after Skew while VI_2's Master_Down ran.
    g = group(VI_1, VI_2)
    g.receive("VI_1", adv(150), HIGHER, 101.0)
    g.receive("VI_2", adv(150), HIGHER, 101.0)
    g.receive("VI_1", adv(0), HIGHER, 101.5)
    assert g.tick(101.5 + 0.609375) == [] and g.state is B
    assert g.instance("VI_1").wants_master
    assert strip(g.tick(101.0 + 3.609375)) == became_master(("VI_1", "VI_2"))


def test_accepted_advert_cancels_wanting_master() -> None:
    g = group(VI_1, VI_2)
    g.receive("VI_2", adv(150), HIGHER, 101.0)
    g.tick(T0 + 3.609375)  # VI_1 expires and waits
    assert g.instance("VI_1").wants_master
    g.receive("VI_1", adv(150), HIGHER, 104.0)
    assert not g.instance("VI_1").wants_master
    assert g.tick(101.0 + 3.609375) == [] and g.state is B  # VI_2 now waits for VI_1


def test_any_member_to_backup_takes_all_to_backup() -> None:
    g = master_group(VI_1, VI_2)
    actions = g.receive("VI_2", adv(200), HIGHER, 110.0)
    assert strip(actions) == [
        GroupState("G1", M, B, ""),
        InstanceState("VI_1", M, B, ""),
        InstanceState("VI_2", M, B, ""),
        RemoveAddresses("VI_1"),
        RemoveAddresses("VI_2"),
    ]
    assert actions[1].reason.startswith("sync group: VI_2: higher priority 200")  # type: ignore[union-attr]
    assert g.instance("VI_1").down_deadline == 110.0 + 3.609375
    assert g.instance("VI_2").master == HIGHER


def test_any_member_fault_faults_all_and_others_resign() -> None:
    g = master_group(VI_1, VI_2)
    actions = g.link("VI_1", False, 110.0)
    assert strip(actions) == [
        GroupState("G1", M, F, ""),
        InstanceState("VI_1", M, F, ""),
        InstanceState("VI_2", M, F, ""),
        SendAdvert("VI_2", 0),  # the member whose link is up resigns
        RemoveAddresses("VI_1"),
        RemoveAddresses("VI_2"),
    ]
    assert g.link("VI_2", False, 111.0) == []
    assert g.link("VI_1", True, 112.0) == [] and g.state is F  # VI_2 still down
    assert strip(g.link("VI_2", True, 113.0)) == [
        GroupState("G1", F, B, ""),
        InstanceState("VI_1", F, B, ""),
        InstanceState("VI_2", F, B, ""),
    ]
    assert g.next_deadline() == 113.0 + 3.609375


def test_owner_in_mixed_group_waits_for_the_others() -> None:
    owner = params("VI_1", priority=255, start_master=True)
    g = SyncGroup("G1", [owner, VI_2])
    actions = g.start(T0)
    assert g.state is B and not any(isinstance(x, AddAddresses) for x in actions)
    assert g.instance("VI_1").wants_master
    assert g.tick(T0 + 3.609374) == []
    actions = g.tick(T0 + 3.609375)
    assert g.state is M and SendAdvert("VI_1", 255) in actions


def test_group_of_owners_starts_master() -> None:
    g = SyncGroup(
        "G1",
        [
            params("VI_1", priority=255, start_master=True),
            params("VI_2", priority=255, start_master=True),
        ],
    )
    actions = g.start(T0)
    assert g.state is M and [x for x in actions if isinstance(x, AddAddresses)] == [
        AddAddresses("VI_1"),
        AddAddresses("VI_2"),
    ]


def test_group_master_timers_independent_intervals() -> None:
    g = master_group(VI_1, params("VI_2", vrid=52, interval_cs=50))
    now = T0 + 3.609375
    assert g.tick(now + 0.5) == [SendAdvert("VI_2", 100)]
    sent = g.tick(now + 1.0 + 1e-9)
    assert sorted(x.instance for x in sent) == ["VI_1", "VI_2"]  # type: ignore[union-attr]
    assert g.tick(now + 1.5 + 1e-9) == [SendAdvert("VI_2", 100)]


def test_timers_run_in_deadline_order() -> None:
    g = group(params("VI_1", priority=100), params("VI_2", vrid=52, priority=200))
    # VI_2 (3.21875) expires first and waits; VI_1 (3.609375) then finds it willing.
    actions = g.tick(T0 + 10)
    assert g.state is M and actions[0].reason.startswith("VI_1")  # type: ignore[union-attr]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        SyncGroup("G1", [])
    with pytest.raises(ValueError):
        SyncGroup("G1", [VI_1, VI_1])
    with pytest.raises(ValueError):
        SyncGroup("G1", [params(interval_cs=0)])
    with pytest.raises(KeyError):
        group().receive("nope", adv(100), HIGHER, T0)


# --- invariants under random event sequences ------------------------------------------------

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["adv", "tick", "link", "wait"]),
        st.sampled_from(["VI_1", "VI_2"]),
        st.sampled_from([0, 50, 100, 150, 255]),
        st.sampled_from([LOWER, HIGHER, ME]),
        st.floats(0.0, 5.0),
        st.booleans(),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS, st.booleans())
def test_invariants(events: list[tuple[str, str, int, bytes, float, bool]], owner: bool) -> None:
    g = SyncGroup("G1", [params("VI_1", priority=255 if owner else 100, start_master=owner), VI_2])
    now = T0
    state = N
    has_addresses = {"VI_1": False, "VI_2": False}

    def apply(actions: list[Action]) -> None:
        nonlocal state
        for i, act in enumerate(actions):
            if isinstance(act, GroupState):
                assert act.old is state and act.new is not state
                state = act.new
                members = actions[i + 1 : i + 3]
                assert [x.instance for x in members] == ["VI_1", "VI_2"]  # type: ignore[union-attr]
                assert all(isinstance(x, InstanceState) and x.new is state for x in members)
            elif isinstance(act, AddAddresses):
                assert state is M and not has_addresses[act.instance]
                has_addresses[act.instance] = True
            elif isinstance(act, RemoveAddresses):
                has_addresses[act.instance] = False
            elif isinstance(act, SendAdvert):
                assert state is M or act.priority == 0
        assert g.state is state
        if state is M:
            assert all(has_addresses.values())
        else:
            assert not any(has_addresses.values())

    apply(g.start(now))
    for kind, name, prio, src, dt, up in events:
        now += dt
        if kind == "adv":
            apply(g.receive(name, adv(prio), src, now))
        elif kind == "link":
            apply(g.link(name, up, now))
        elif kind == "tick":
            apply(g.tick(now))
        else:
            deadline = g.next_deadline()
            if deadline is not None:
                now = max(now, deadline)
                apply(g.tick(now))
        deadline = g.next_deadline()
        assert deadline is None or deadline > now or kind in ("adv", "link")
        if state in (B, M):
            assert deadline is not None
    apply(g.shutdown(now))
    assert g.state is S and g.next_deadline() is None
