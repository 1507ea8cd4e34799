"""The state machine's inputs for an instance that cannot run yet: ``link(..., why)`` and
``set_primary`` (the speaker starts before its interface has an address)."""

from __future__ import annotations

import pytest

from ctsync.core.vrrp.machine import (
    Action,
    GroupState,
    InstanceState,
    SendAdvert,
    State,
    SyncGroup,
)
from tests.core.test_vrrp_machine import HIGHER, LOWER, ME, T0, VIP, adv, params

B, M, F = State.BACKUP, State.MASTER, State.FAULT
PLACEHOLDER = bytes(4)


def reasons(actions: list[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, GroupState | InstanceState)]


def test_start_in_fault_says_why() -> None:
    g = SyncGroup("G1", [params("VI_1", primary=PLACEHOLDER), params("VI_2")])
    assert g.link("VI_1", False, T0, "vr0 has no IPv4 address") == []
    actions = g.start(T0)
    assert g.state is F
    assert reasons(actions) == [
        "VI_1: vr0 has no IPv4 address",
        "VI_1: vr0 has no IPv4 address",
        "VI_1: vr0 has no IPv4 address",
    ]
    assert g.instance("VI_2").reason == "VI_1: vr0 has no IPv4 address"  # group start: no trigger
    assert g.next_deadline() is None


def test_link_reasons_default_and_given() -> None:
    g = SyncGroup("G1", [params()])
    g.start(T0)
    assert reasons(g.link("VI_1", False, T0 + 1))[0] == "VI_1: link down"
    assert reasons(g.link("VI_1", True, T0 + 2))[0] == "VI_1: link up"
    down = g.link("VI_1", False, T0 + 3, "its source 192.0.2.2 was removed")
    assert reasons(down)[0] == "VI_1: its source 192.0.2.2 was removed"
    up = g.link("VI_1", True, T0 + 4, "sending from 192.0.2.2")
    assert reasons(up)[0] == "VI_1: sending from 192.0.2.2" and g.state is B


def test_set_primary_only_while_down() -> None:
    g = SyncGroup("G1", [params(primary=PLACEHOLDER)])
    with pytest.raises(ValueError, match="only while it is down"):
        g.set_primary("VI_1", ME)
    g.link("VI_1", False, T0, "no address")
    g.start(T0)
    with pytest.raises(ValueError, match="IPv4"):
        g.set_primary("VI_1", bytes(16))
    g.set_primary("VI_1", ME)
    g.link("VI_1", True, T0 + 1)
    with pytest.raises(ValueError):
        g.set_primary("VI_1", LOWER)  # running: fixed


def test_learned_primary_is_the_one_advertised_and_compared() -> None:
    """The tie-break and the master address use the source set while down, not the
    placeholder the group was built with."""
    g = SyncGroup("G1", [params(primary=PLACEHOLDER)])
    g.link("VI_1", False, T0, "no address")
    g.start(T0)
    g.set_primary("VI_1", ME)
    g.link("VI_1", True, T0 + 1)
    g.tick(T0 + 10)
    assert g.state is M and g.instance("VI_1").master == ME
    # Equal priority from a lower address: we stay, and answer (with the placeholder,
    # 0.0.0.0, every peer would have been "higher" and we would have stepped down).
    assert SendAdvert("VI_1", 100) in g.receive("VI_1", adv(100), LOWER, T0 + 11)
    assert g.state is M
    g.receive("VI_1", adv(100), HIGHER, T0 + 12)
    assert g.state is B and g.instance("VI_1").master == HIGHER


def test_source_changes_across_a_fault() -> None:
    g = SyncGroup("G1", [params()])
    g.start(T0)
    g.tick(T0 + 10)
    assert g.instance("VI_1").master == ME
    g.link("VI_1", False, T0 + 11, "its source was removed")
    g.set_primary("VI_1", VIP)  # any other address
    g.link("VI_1", True, T0 + 12)
    g.tick(T0 + 20)
    assert g.state is M and g.instance("VI_1").master == VIP
