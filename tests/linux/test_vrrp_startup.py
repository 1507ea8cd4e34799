"""ctsync's VRRP speaker started before its network is ready, against real keepalived.

keepalived 2.2.7, measured in namespaces like these (log lines in docs/failover.md):

* an interface without an IPv4 address, or without an IPv6 link-local address: the
  instance enters FAULT ("entering FAULT state (no IPv4 address for interface)") and
  leaves it for BACKUP when the address is assigned;
* its source address removed while it runs: FAULT;
* an interface that does not exist: refused at start, unless ``dynamic_interfaces`` is
  set; then FAULT, and BACKUP once the interface exists with an address.

ctsync does the same (a missing interface is tolerated as with ``dynamic_interfaces``):
the agent keeps running, its group reports FAULT and says why once, and when the address
or interface appears it opens its sockets with that source, goes BACKUP and takes part in
the election. Each test ends with exactly one holder of the virtual address.

The layout is :func:`tests.linux.keepalived.build_vrrp_site`'s; v3 at 0.1 s adverts keeps
the file short.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.linux.agents import wait_until
from tests.linux.keepalived import (
    CT_ADDR,
    KA_ADDR,
    VRRP_IF,
    VrrpParams,
    VrrpSite,
    build_vrrp_site,
)
from tests.linux.netns import NamespaceFactory, add_addr, veth
from tests.linux.test_vrrp import KA_STOP_DELAY, MARGIN, Pair

#: ctsync's warning when an instance has to wait (logged once per cause).
WAITING = "FAULT until"
#: A link-local address for ctsync's vr0 that the kernel would not pick itself.
CT_LINK_LOCAL = "fe80::ff:fe00:2"


@pytest.fixture
def site(netns_factory: NamespaceFactory) -> Iterator[VrrpSite]:
    s = build_vrrp_site(netns_factory)
    try:
        yield s
    finally:
        s.close()


def instance(pair: Pair) -> dict[str, Any]:
    status = pair.ct.status()
    inst: dict[str, Any] = status["instances"][0]
    inst["group"] = status["state"]
    return inst


def describe(pair: Pair) -> str:
    """Pair.describe, also while ctsync's vr0 does not exist."""
    try:
        return pair.describe()
    except Exception as exc:  # holders() cannot list a missing vr0
        return f"({exc})\n{pair.ka.output()}\n{pair.ct.output()}"


def ka_holds_alone(pair: Pair) -> bool:
    """keepalived holds the VIP and ctsync does not (also while ctsync's vr0 is missing)."""
    site = pair.site
    ct_has = site.ct_ns.ip("-j", "addr", "show", "dev", VRRP_IF, check=False)
    ka_has = site.ka_ns.ip("addr", "show", "dev", VRRP_IF).stdout
    return f" {pair.vip}/" in ka_has and f'"{pair.vip}"' not in ct_has.stdout


def assert_waiting(pair: Pair, why: str) -> None:
    """ctsync runs, in FAULT for *why*, sends and holds nothing; it logged that once."""
    inst = instance(pair)
    assert inst["group"] == "FAULT" and inst["state"] == "FAULT", describe(pair)
    assert why in inst["reason"], inst
    assert inst["adverts_sent"] == 0, inst
    assert ka_holds_alone(pair), describe(pair)
    waits = [line for line in pair.ct.output().splitlines() if WAITING in line]
    assert len(waits) == 1 and why in waits[0], pair.ct.output()


def wait_state(pair: Pair, state: str, timeout: float) -> None:
    wait_until(
        lambda: pair.state("ct") == state,
        timeout,
        f"ctsync in {state}",
        interval=0.05,
        describe=lambda: describe(pair),
    )


# --------------------------------------------------------------------------- IPv4


def test_ipv4_address_assigned_after_start(site: VrrpSite, tmp_path: Path) -> None:
    """No IPv4 address on vr0 at start: FAULT; assigned: BACKUP under keepalived's higher
    priority (so ctsync hears and accepts it), MASTER when keepalived stops."""
    ka = VrrpParams(3, 4, 200, 0.1)
    ct = VrrpParams(3, 4, 100, 0.1)
    pair = Pair(site, tmp_path, ka, ct)
    site.ct_ns.ip("addr", "del", f"{CT_ADDR[4]}/24", "dev", VRRP_IF)
    pair.ka.start()
    pair.wait_holder("ka", ka.down() + 3)

    pair.ct.start()  # today: "vr0 has no IPv4 address to send from" and the agent exits
    time.sleep(3 * ct.down())
    add_addr(site.ct_ns, VRRP_IF, "2001:db8::22/64")  # an address event that changes nothing
    time.sleep(3 * ct.down())
    assert_waiting(pair, "no IPv4 address")

    add_addr(site.ct_ns, VRRP_IF, f"{CT_ADDR[4]}/24")
    wait_state(pair, "BACKUP", 3)
    time.sleep(3 * ct.down())  # longer than its Master_Down: stays BACKUP only if it hears ka
    assert pair.ct.group_states() == ["FAULT", "BACKUP"], describe(pair)
    inst = instance(pair)
    assert inst["source"] == CT_ADDR[4] and inst["master"] == KA_ADDR[4], inst
    assert inst["adverts_received"] > 0 and inst["rejected"] == {}, inst
    assert site.holders(pair.vip) == ["ka"], describe(pair)

    pair.takeover("ct", "stop", 0.0, ct.skew() + KA_STOP_DELAY + MARGIN)
    pair.wait_holder("ct", 2)
    inst = instance(pair)
    assert inst["state"] == "MASTER" and inst["master"] == CT_ADDR[4], inst
    assert inst["adverts_sent"] > 0, inst
    pair.check_logs()


def test_source_address_removed_faults(site: VrrpSite, tmp_path: Path) -> None:
    """The master's source address removed: FAULT (as keepalived), keepalived takes over;
    assigned again: BACKUP, then it preempts with it. Never two holders, never none."""
    ka = VrrpParams(3, 4, 100, 0.1)
    ct = VrrpParams(3, 4, 200, 0.1)
    pair = Pair(site, tmp_path, ka, ct)
    pair.ct_master_ka_backup()
    assert site.holders(pair.vip) == ["ct"], describe(pair)

    start = time.monotonic()
    site.ct_ns.ip("addr", "del", f"{CT_ADDR[4]}/24", "dev", VRRP_IF)
    took = site.watches["ka"].wait("add", pair.vip, start, ka.down() + 3) - start
    print(f"TIMING source removed ct->ka: {took:.3f}s")
    assert took <= ka.down() + MARGIN, describe(pair)
    wait_state(pair, "FAULT", 2)
    pair.wait_holder("ka", 2)
    assert "no IPv4 address" in instance(pair)["reason"], describe(pair)

    add_addr(site.ct_ns, VRRP_IF, f"{CT_ADDR[4]}/24")
    pair.wait_holder("ct", ct.down() + 3)
    assert pair.ct.group_states()[-3:] == ["FAULT", "BACKUP", "MASTER"], describe(pair)
    time.sleep(3 * ka.down())
    assert site.holders(pair.vip) == ["ct"], describe(pair)
    assert pair.state("ka") == "BACKUP", describe(pair)
    pair.check_logs()


# --------------------------------------------------------------------------- IPv6


def test_ipv6_link_local_assigned_after_start(site: VrrpSite, tmp_path: Path) -> None:
    """vr0 with a global IPv6 address but no link-local (addrgenmode none): FAULT, the
    global one is not a source; the link-local assigned: BACKUP, then ctsync's higher
    priority preempts keepalived, which accepts adverts from the new source."""
    ka = VrrpParams(3, 6, 100, 0.1)
    ct = VrrpParams(3, 6, 200, 0.1)
    pair = Pair(site, tmp_path, ka, ct)
    site.ct_ns.ip("link", "set", VRRP_IF, "addrgenmode", "none")
    site.ct_ns.ip("-6", "addr", "flush", "dev", VRRP_IF, "scope", "link")
    assert "fe80" not in site.ct_ns.ip("-6", "addr", "show", "dev", VRRP_IF).stdout
    pair.ka.start()
    pair.wait_holder("ka", ka.down() + 3)

    pair.ct.start()  # today: "vr0 has no link-local IPv6 address" and the agent exits
    time.sleep(3 * ka.down())
    assert_waiting(pair, "no usable IPv6 link-local address")
    assert instance(pair)["source"] is None

    site.ct_ns.ip("-6", "addr", "add", f"{CT_LINK_LOCAL}/64", "dev", VRRP_IF, "nodad")
    pair.wait_holder("ct", ct.down() + 3)
    time.sleep(3 * ka.down())  # keepalived keeps accepting what ctsync sends
    assert site.holders(pair.vip) == ["ct"], describe(pair)
    assert pair.state("ka") == "BACKUP", describe(pair)
    assert pair.ct.group_states() == ["FAULT", "BACKUP", "MASTER"], describe(pair)
    inst = instance(pair)
    assert inst["source"] == CT_LINK_LOCAL and inst["master"] == CT_LINK_LOCAL, inst
    assert inst["adverts_received"] > 0 and inst["rejected"] == {}, inst
    pair.check_logs()


# --------------------------------------------------------------------------- interface


def test_interface_created_after_start(site: VrrpSite, tmp_path: Path) -> None:
    """vr0 missing at start: FAULT; created without an address: still FAULT, for the new
    reason; its address assigned: BACKUP under keepalived, MASTER when keepalived stops."""
    ka = VrrpParams(3, 4, 200, 0.1)
    ct = VrrpParams(3, 4, 100, 0.1)
    pair = Pair(site, tmp_path, ka, ct)
    site.ct_ns.ip("link", "del", VRRP_IF)  # the switch's end goes with it
    pair.ka.start()
    wait_until(lambda: ka_holds_alone(pair), ka.down() + 3, "ka to hold the VIP")

    pair.ct.start()  # today: "no interface 'vr0'" and the agent exits
    time.sleep(3 * ct.down())
    assert_waiting(pair, "does not exist")

    veth(site.ct_ns, VRRP_IF, site.sw, "pct")
    site.sw.ip("link", "set", "pct", "master", "br0")
    wait_until(
        lambda: instance(pair)["problem"] == f"{VRRP_IF} has no IPv4 address",
        3,
        "ctsync to wait for vr0's address",
        interval=0.05,
        describe=lambda: describe(pair),
    )
    assert pair.state("ct") == "FAULT", describe(pair)

    add_addr(site.ct_ns, VRRP_IF, f"{CT_ADDR[4]}/24")
    wait_state(pair, "BACKUP", 3)
    time.sleep(3 * ct.down())
    assert pair.ct.group_states() == ["FAULT", "BACKUP"], describe(pair)
    inst = instance(pair)
    assert inst["source"] == CT_ADDR[4] and inst["master"] == KA_ADDR[4], inst
    assert site.holders(pair.vip) == ["ka"], describe(pair)

    pair.takeover("ct", "stop", 0.0, ct.skew() + KA_STOP_DELAY + MARGIN)
    pair.wait_holder("ct", 2)
    pair.check_logs()


# --------------------------------------------------------------------------- unicast-src


def test_unicast_src_assigned_after_start(site: VrrpSite, tmp_path: Path) -> None:
    """unicast-src not yet an address of the host: FAULT (keepalived 2.2.7 stays in FAULT
    for good there); assigned: ctsync binds to it and preempts keepalived."""
    ka = VrrpParams(3, 4, 100, 0.1, unicast_src=KA_ADDR[4], unicast_peers=[CT_ADDR[4]])
    ct = VrrpParams(3, 4, 200, 0.1, unicast_src=CT_ADDR[4], unicast_peers=[KA_ADDR[4]])
    pair = Pair(site, tmp_path, ka, ct)
    site.ct_ns.ip("addr", "del", f"{CT_ADDR[4]}/24", "dev", VRRP_IF)
    pair.ka.start()
    pair.wait_holder("ka", ka.down() + 3)

    pair.ct.start()  # today: the bind fails (EADDRNOTAVAIL) and the agent exits
    time.sleep(3 * ka.down())
    assert_waiting(pair, f"unicast-src {CT_ADDR[4]}")

    add_addr(site.ct_ns, VRRP_IF, f"{CT_ADDR[4]}/24")
    pair.wait_holder("ct", ct.down() + 3)
    time.sleep(3 * ka.down())
    assert site.holders(pair.vip) == ["ct"], describe(pair)
    assert pair.state("ka") == "BACKUP", describe(pair)
    inst = instance(pair)
    assert inst["mode"] == "unicast" and inst["source"] == CT_ADDR[4], inst
    assert inst["adverts_received"] > 0 and inst["rejected"] == {}, inst
    pair.check_logs()
