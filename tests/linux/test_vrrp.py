"""ctsync's VRRP speaker against real keepalived (Debian 2.2.7), in network namespaces.

Each test runs keepalived in ``ka`` and ctsync's speaker in ``ct`` on one bridge (see
:mod:`tests.linux.keepalived`) and checks what an operator would: the higher priority
becomes master whichever implementation it is; a killed master is replaced within the
backup's Master_Down interval, a stopped one (priority-0 advert) within its Skew; preempt
and nopreempt behave as keepalived's; exactly one router holds the VIP once settled; the
client's neighbour cache follows ctsync when it takes over (gratuitous ARP / NA); and
keepalived never logs a rejection of what ctsync sent.

Timings are measured from the signal to the new master's address event (rtnetlink, one
clock) and bounded by the formulas of reference §5.1 plus :data:`MARGIN` (2 shared CPUs).
A killed master's last advert left at most one interval before the signal, so its
replacement cannot come before Master_Down minus one interval: the lower bound catches a
timer that fires early.

v3 runs at advert_int 0.1 s to keep the file short; v2 needs whole seconds, so its cases
are few.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from ctsync.core.vrrp.packet import (
    MCAST_V4,
    VRRP_PROTO,
    Advert,
    build_ipv4_header,
    encode_advert,
)
from tests.linux.agents import wait_until
from tests.linux.keepalived import (
    CT_ADDR,
    KA_ADDR,
    VRRP_IF,
    CtsyncNode,
    KeepalivedNode,
    VrrpParams,
    VrrpSite,
    build_vrrp_site,
)
from tests.linux.netns import NamespaceFactory, add_addr, in_netns, veth

#: Allowance beyond a formula: scheduling on 2 shared CPUs, process wake-ups, netlink.
MARGIN = 0.5
#: Keepalived needs 5-40 ms from SIGTERM to its priority-0 advert (reference §7.3).
KA_STOP_DELAY = 0.05


@pytest.fixture
def site(netns_factory: NamespaceFactory) -> Iterator[VrrpSite]:
    s = build_vrrp_site(netns_factory)
    try:
        yield s
    finally:
        s.close()


class Pair:
    """keepalived and ctsync on one site, addressed by role ("ka" / "ct")."""

    def __init__(self, site: VrrpSite, tmp: Path, ka: VrrpParams, ct: VrrpParams) -> None:
        (tmp / "ka").mkdir()
        (tmp / "ct").mkdir()
        self.site = site
        self.ka = KeepalivedNode(site.ka_ns, tmp / "ka", [ka])
        self.ct = CtsyncNode(site.ct_ns, tmp / "ct", [ct])
        self.vip = ka.vip
        self.params = {"ka": ka, "ct": ct}
        self.macs = site.macs()
        self.ct_final: dict[str, object] | None = None  # status at ctsync's last stop

    def ct_master_ka_backup(self) -> None:
        """ctsync starts and takes the VIP; then keepalived joins as its backup."""
        self.ct.start()
        self.wait_holder("ct", self.params["ct"].down() + 3)
        self.ka.start()
        time.sleep(2 * self.params["ka"].down())

    def node(self, role: str) -> KeepalivedNode | CtsyncNode:
        return self.ka if role == "ka" else self.ct

    def describe(self) -> str:
        return f"holders={self.site.holders(self.vip)}\n{self.ka.output()}\n{self.ct.output()}"

    def wait_holder(self, role: str, timeout: float) -> None:
        """Until exactly *role* holds the VIP."""
        wait_until(
            lambda: self.site.holders(self.vip) == [role],
            timeout,
            f"{role} alone to hold {self.vip}",
            interval=0.05,
            describe=self.describe,
        )

    def state(self, role: str) -> str | None:
        states = self.ka.states() if role == "ka" else self.ct.group_states()
        return states[-1] if states else None

    def takeover(self, new: str, action: str, low: float, high: float) -> float:
        """Kill or stop the other router; return how long until *new* added the VIP."""
        old = "ct" if new == "ka" else "ka"
        node = self.node(old)
        start = time.monotonic()
        if action == "kill":
            node.kill()
        elif isinstance(node, CtsyncNode):
            self.ct_final = node.terminate()
        else:
            node.terminate()
        added = self.site.watches[new].wait("add", self.vip, start, high + 5)
        took = added - start
        print(f"TIMING {action} {old}->{new}: {took:.3f}s (bounds {low:.3f}..{high:.3f})")
        assert low <= took <= high, (
            f"{new} took over {took:.3f}s after the {action} of {old}, expected"
            f" {low:.3f}..{high:.3f}s\n{self.describe()}"
        )
        return took

    def check_client_follows(self, role: str) -> None:
        """The client's neighbour entry for the VIP moved to *role*'s MAC (GARP / NA)."""
        mac = self.macs[role]
        wait_until(
            lambda: self.site.client_neighbour(self.vip) == mac,
            3.0,
            f"the client to resolve {self.vip} to {role}'s MAC {mac}",
            interval=0.05,
            describe=lambda: (
                f"client has {self.site.client_neighbour(self.vip)}\n" + self.describe()
            ),
        )

    def check_logs(self) -> None:
        bad = self.ka.bad_lines()
        assert not bad, "keepalived rejected something:\n" + "\n".join(bad)

    def check_status(self, status: dict[str, object]) -> None:
        inst = status["instances"][0]  # type: ignore[index]
        assert inst["rejected"] == {}, f"ctsync rejected adverts: {inst}"
        assert inst["adverts_received"] > 0, inst
        assert inst["adverts_sent"] > 0, inst
        assert status["unknown_vrid"] == 0, status


def other(role: str) -> str:
    return "ct" if role == "ka" else "ka"


# --------------------------------------------------------------------------- v3


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("high", ["ct", "ka"], ids=["ctsync-high", "keepalived-high"])
def test_v3_higher_priority_wins_and_fails_over(
    site: VrrpSite, tmp_path: Path, family: int, high: str
) -> None:
    """Preemption both ways, kill -> Master_Down, restart -> preempt again, stop -> Skew."""
    low = other(high)
    params = {high: VrrpParams(3, family, 200, 0.1), low: VrrpParams(3, family, 100, 0.1)}
    pair = Pair(site, tmp_path, params["ka"], params["ct"])
    lp, hp = params[low], params[high]

    pair.node(low).start()
    pair.wait_holder(low, lp.down() + 3)
    site.ping_vip(pair.vip)
    pair.node(high).start()
    pair.wait_holder(high, hp.down() + 3)
    assert pair.state(low) == "BACKUP"
    if high == "ct":
        pair.check_client_follows("ct")

    # A crash: the backup waits for Master_Down after the last advert it heard.
    if low == "ct":
        site.ping_vip(pair.vip)
    pair.takeover(low, "kill", lp.down() - lp.advert_int - 0.02, lp.down() + MARGIN)
    assert low in site.holders(pair.vip)  # the dead one may keep it, as keepalived's does
    if low == "ct":
        pair.check_client_follows("ct")

    # Restarted, the higher priority clears its stale VIP and preempts again.
    pair.node(high).start()
    pair.wait_holder(high, hp.down() + 3)
    assert pair.state(low) == "BACKUP"

    # A graceful stop: one priority-0 advert, the backup takes over after its Skew.
    if low == "ct":
        site.ping_vip(pair.vip)
    extra = KA_STOP_DELAY if high == "ka" else 0.0
    pair.takeover(low, "stop", 0.0, lp.skew() + extra + MARGIN)
    pair.wait_holder(low, 2)
    if low == "ct":
        pair.check_client_follows("ct")
        pair.check_status(pair.ct.status())
    else:
        assert pair.ct_final is not None
        pair.check_status(pair.ct_final)
    pair.check_logs()


# --------------------------------------------------------------------------- v2


@pytest.mark.parametrize("high", ["ct", "ka"], ids=["ctsync-high", "keepalived-high"])
def test_v2_with_password(site: VrrpSite, tmp_path: Path, high: str) -> None:
    """v2 (whole seconds, PASS auth): the backup keeps accepting, then takes over."""
    low = other(high)
    base = VrrpParams(2, 4, 100, 1.0, auth_pass="s3cret")
    params = {high: replace(base, priority=200), low: base}
    pair = Pair(site, tmp_path, params["ka"], params["ct"])
    lp, hp = params[low], params[high]

    pair.node(high).start()
    pair.wait_holder(high, hp.down() + 3)
    pair.node(low).start()
    # Longer than the backup's Master_Down: it stays BACKUP only if it accepts the adverts.
    time.sleep(lp.down() + 0.5)
    assert pair.site.holders(pair.vip) == [high], pair.describe()
    assert pair.state(low) == "BACKUP", pair.describe()
    if low == "ka":
        assert pair.ka.states() == ["BACKUP"], pair.describe()
        pair.takeover("ka", "stop", 0.0, lp.skew() + MARGIN)
    else:
        assert pair.ct.group_states() == ["BACKUP"], pair.describe()
        site.ping_vip(pair.vip)
        pair.takeover("ct", "kill", lp.down() - lp.advert_int - 0.02, lp.down() + MARGIN)
        pair.check_client_follows("ct")
        pair.check_status(pair.ct.status())
    pair.check_logs()


# --------------------------------------------------------------------------- nopreempt


@pytest.mark.parametrize("who", ["ct", "ka"], ids=["ctsync-nopreempt", "keepalived-nopreempt"])
def test_nopreempt(site: VrrpSite, tmp_path: Path, who: str) -> None:
    """A higher priority with nopreempt stays BACKUP under a lower master, as keepalived."""
    low = other(who)
    params = {
        who: VrrpParams(3, 4, 200, 0.1, preempt=False),
        low: VrrpParams(3, 4, 100, 0.1),
    }
    pair = Pair(site, tmp_path, params["ka"], params["ct"])
    hp = params[who]

    pair.node(low).start()
    pair.wait_holder(low, params[low].down() + 3)
    pair.node(who).start()
    time.sleep(5 * hp.down())
    assert pair.site.holders(pair.vip) == [low], pair.describe()
    assert pair.state(who) == "BACKUP", pair.describe()
    pair.takeover(who, "stop", 0.0, hp.skew() + MARGIN)
    pair.wait_holder(who, 2)
    if who == "ct":
        pair.check_status(pair.ct.status())
    pair.check_logs()


# --------------------------------------------------------------------------- unicast


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_unicast_peers(site: VrrpSite, tmp_path: Path, family: int) -> None:
    """unicast_peer on both sides: ctsync preempts keepalived, then hands back on stop."""
    ka = VrrpParams(
        3, family, 100, 0.1, unicast_src=KA_ADDR[family], unicast_peers=[CT_ADDR[family]]
    )
    ct = VrrpParams(
        3, family, 200, 0.1, unicast_src=CT_ADDR[family], unicast_peers=[KA_ADDR[family]]
    )
    pair = Pair(site, tmp_path, ka, ct)
    pair.ka.start()
    pair.wait_holder("ka", ka.down() + 3)
    pair.ct.start()
    pair.wait_holder("ct", ct.down() + 3)
    time.sleep(5 * ka.down())  # keepalived keeps accepting our unicast adverts
    assert pair.site.holders(pair.vip) == ["ct"], pair.describe()
    assert pair.ka.states()[-1] == "BACKUP", pair.describe()
    status = pair.ct.status()
    inst = status["instances"][0]
    assert inst["mode"] == "unicast" and not inst["old_unicast_checksum"], inst
    assert inst["master"] == CT_ADDR[family], inst
    pair.takeover("ka", "stop", 0.0, ka.skew() + MARGIN)
    pair.wait_holder("ka", 2)
    pair.check_status(status)
    pair.check_logs()


# --------------------------------------------------------------------------- link state


def test_link_down_faults_and_recovers(site: VrrpSite, tmp_path: Path) -> None:
    """ctsync's interface down: FAULT, addresses gone, keepalived takes over; up: back."""
    ka = VrrpParams(3, 4, 100, 0.1)
    ct = VrrpParams(3, 4, 200, 0.1)
    pair = Pair(site, tmp_path, ka, ct)
    pair.ct_master_ka_backup()
    assert site.holders(pair.vip) == ["ct"], pair.describe()

    start = time.monotonic()
    site.ct_ns.ip("link", "set", "vr0", "down")
    removed = site.watches["ct"].wait("del", pair.vip, start, 3)
    took = site.watches["ka"].wait("add", pair.vip, start, ka.down() + 3) - start
    print(f"TIMING link down ct->ka: {took:.3f}s, ct removed its VIP after {removed - start:.3f}s")
    assert took <= ka.down() + MARGIN, pair.describe()
    assert pair.state("ct") == "FAULT", pair.describe()
    pair.wait_holder("ka", 2)

    site.ct_ns.ip("link", "set", "vr0", "up")
    pair.wait_holder("ct", ct.down() + 3)  # BACKUP on link up, then preempts
    assert pair.ct.group_states()[-3:] == ["FAULT", "BACKUP", "MASTER"], pair.describe()
    assert pair.state("ka") == "BACKUP"
    pair.check_status(pair.ct.status())
    pair.check_logs()


def test_recreated_interface_gets_new_sockets(site: VrrpSite, tmp_path: Path) -> None:
    """ctsync's interface deleted and created again under the same name (as a container
    network reconnect does): the old sockets are bound to a device that is gone. ctsync
    must reopen them on the new one; a backup left deaf would become a second master."""
    ka = VrrpParams(3, 4, 100, 0.1)
    ct = VrrpParams(3, 4, 200, 0.1)
    pair = Pair(site, tmp_path, ka, ct)
    pair.ct_master_ka_backup()

    start = time.monotonic()
    site.ct_ns.ip("link", "del", VRRP_IF)  # the switch's end goes with it
    site.watches["ka"].wait("add", pair.vip, start, ka.down() + 3)
    wait_until(lambda: pair.state("ct") == "FAULT", 3, "ctsync in FAULT")

    veth(site.ct_ns, VRRP_IF, site.sw, "pct")
    site.sw.ip("link", "set", "pct", "master", "br0")
    add_addr(site.ct_ns, VRRP_IF, "192.0.2.2/24")
    add_addr(site.ct_ns, VRRP_IF, "2001:db8::2/64")
    # Preempts again through the new device, and keepalived hears it: one holder only.
    pair.wait_holder("ct", ct.down() + 5)
    time.sleep(3 * ka.down())
    assert site.holders(pair.vip) == ["ct"], pair.describe()
    assert pair.state("ka") == "BACKUP", pair.describe()
    assert "sockets reopened on the new vr0" in pair.ct.output()
    pair.check_logs()


# --------------------------------------------------------------------------- bad adverts


def _send_adverts(site: VrrpSite, packets: list[bytes]) -> None:
    """Raw IPv4 packets (header included) from the client to 224.0.0.18 on its eth0."""
    with in_netns(site.client.name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)
    with sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
        for packet in packets:
            sock.sendto(packet, ("224.0.0.18", 0))


def test_rejected_adverts_are_counted(site: VrrpSite, tmp_path: Path) -> None:
    """What keepalived rejects, ctsync rejects too: counted per reason, logged once."""
    ct = VrrpParams(3, 4, 100, 0.1)
    pair = Pair(site, tmp_path, replace(ct, priority=50), ct)
    pair.ct.start()
    pair.wait_holder("ct", ct.down() + 3)
    src = socket.inet_aton("192.0.2.3")
    vip = socket.inet_aton(pair.vip)

    def packet(adv: Advert, *, ttl: int = 255, corrupt: bool = False) -> bytes:
        msg = encode_advert(adv, src=src, dst=MCAST_V4)
        if corrupt:
            msg = msg[:6] + bytes([msg[6] ^ 0xFF]) + msg[7:]
        return (
            build_ipv4_header(src=src, dst=MCAST_V4, payload_len=len(msg), ident=1, ttl=ttl) + msg
        )

    good = Advert(3, 51, 200, 10, (vip,))
    bad = [
        *[packet(good, ttl=254)] * 5,
        packet(replace(good, addresses=(socket.inet_aton("192.0.2.99"),))),
        packet(replace(good, addresses=(vip, socket.inet_aton("192.0.2.99")))),
        packet(Advert(2, 51, 200, 100, (vip,))),
        packet(good, corrupt=True),
        packet(replace(good, vrid=52)),
    ]
    for _ in range(3):  # for 3 Master_Down intervals of the peer these would have made
        _send_adverts(site, bad)
        time.sleep(ct.down())
    status = pair.ct.status()
    inst = status["instances"][0]
    assert inst["state"] == "MASTER", pair.describe()
    assert inst["rejected"] == {
        "ttl": 15,
        "addresses": 3,
        "count": 3,
        "version": 3,
        "checksum": 3,
    }, inst
    assert status["unknown_vrid"] == 3, status
    assert site.holders(pair.vip) == ["ct"]
    # Logged once per reason, not once per packet.
    assert pair.ct.output().count("rejected (ttl)") == 1, pair.ct.output()

    # The same advert, well formed, is obeyed: ctsync steps down and drops the VIP.
    start = time.monotonic()
    _send_adverts(site, [packet(good)])
    site.watches["ct"].wait("del", pair.vip, start, 2)
    assert pair.ct.group_states()[-1] == "BACKUP"


# --------------------------------------------------------------------------- sync group


def test_sync_group_moves_together(site: VrrpSite, tmp_path: Path) -> None:
    """An IPv4 and an IPv6 instance in one group on each side: both VIPs move as one."""
    (tmp_path / "ka").mkdir()
    (tmp_path / "ct").mkdir()
    ka_params = [VrrpParams(3, 4, 200, 0.1), VrrpParams(3, 6, 200, 0.1, vrid=52)]
    ct_params = [replace(p, priority=100) for p in ka_params]
    ka = KeepalivedNode(site.ka_ns, tmp_path / "ka", ka_params)
    ct = CtsyncNode(site.ct_ns, tmp_path / "ct", ct_params)
    vips = [p.vip for p in ka_params]

    def holders() -> list[list[str]]:
        return [site.holders(vip) for vip in vips]

    def describe() -> str:
        return f"holders={holders()}\n{ka.output()}\n{ct.output()}"

    ct.start()
    wait_until(lambda: holders() == [["ct"], ["ct"]], 3, "ct to hold both", describe=describe)
    ka.start()
    wait_until(lambda: holders() == [["ka"], ["ka"]], 3, "ka to hold both", describe=describe)
    assert ct.group_states()[-1] == "BACKUP", describe()

    start = time.monotonic()
    ka.kill()
    down = max(p.down() for p in ct_params)  # the group waits for every member's timer
    for vip in vips:
        took = site.watches["ct"].wait("add", vip, start, down + 5) - start
        print(f"TIMING sync group kill ka->ct {vip}: {took:.3f}s")
        assert took <= down + MARGIN, describe()
    status = ct.status()
    assert status["state"] == "MASTER", status
    assert [i["state"] for i in status["instances"]] == ["MASTER", "MASTER"], status
    for inst in status["instances"]:
        assert inst["rejected"] == {} and inst["adverts_received"] > 0, inst
    assert status["unknown_vrid"] == 0, status
    bad = ka.bad_lines()
    assert not bad, "keepalived rejected something:\n" + "\n".join(bad)
