"""Self-tests of the namespace infrastructure against the real kernel.

They check, with the ``conntrack`` CLI run inside the firewall namespace (and
a tiny raw ctnetlink dump where the CLI cannot show a field), that the router
topology does what ``netns.build_fw_ruleset`` promises, and that cleanup
leaves nothing behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.linux.conftest import require_capability
from tests.linux.netns import (
    CLIENT_V4,
    CLIENT_V6,
    CT_ENABLE_RULESET,
    CTA_LABELS,
    CTA_MARK,
    CTA_TUPLE_MASTER,
    DNAT_PORT,
    DNAT_TARGET_PORT,
    DNAT_VIP_V4,
    FTP_HELPER_PORT,
    FW_SERVER_V4,
    FW_SERVER_V6,
    LABEL_BIT,
    LABEL_PORT,
    MARK_PORT,
    MARK_VALUE,
    SERVER_V4,
    SERVER_V6,
    ZONE_ID,
    ZONE_PORT,
    CtEntry,
    Namespace,
    NamespaceFactory,
    Topology,
    build_router_topology,
    in_netns,
    list_netns,
    nfct_dump,
    nfct_ports,
    nfct_socket,
    parse_conntrack,
    parse_expect,
    traffic_cmd,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

PLAIN_PORT = 5000
UDP_PORT = 5300
FTP_FILE_SIZE = 4096

V4 = {"family": "ipv4", "client": CLIENT_V4, "server": SERVER_V4, "fw": FW_SERVER_V4}
V6 = {"family": "ipv6", "client": CLIENT_V6, "server": SERVER_V6, "fw": FW_SERVER_V6}


def netns_inode(path: str = "/proc/thread-self/ns/net") -> int:
    return os.stat(path).st_ino


def client_ports(lines: list[str], prefix: str) -> list[int]:
    """Local ports from traffic.py's ``CONN <ip> <port>`` / ``FLOW <ip> <port>`` lines."""
    return sorted(int(line.split()[2]) for line in lines if line.startswith(prefix + " "))


def labels_bits(raw: bytes) -> int:
    """CTA_LABELS is an array of host-order unsigned longs; return it as one integer."""
    word = 8 if len(raw) % 8 == 0 else 4
    return sum(
        int.from_bytes(raw[i : i + word], sys.byteorder) << (8 * i)
        for i in range(0, len(raw), word)
    )


def tcp_entries(fw: Namespace, dport: int) -> list[CtEntry]:
    return [e for e in fw.ct_list("-p", "tcp") if e.matches(dport=dport)]


# --------------------------------------------------------------------------- pure parsers


def test_parse_conntrack_and_expect_lines() -> None:
    ct = parse_conntrack(
        "ipv4     2 tcp      6 431999 ESTABLISHED src=192.0.2.2 dst=203.0.113.10 sport=40000 "
        "dport=80 src=198.51.100.2 dst=198.51.100.1 sport=8080 dport=40000 [ASSURED] "
        "mark=66 zone=5 helper=ftp use=1\n"
        "ipv6     10 udp      17 29 src=2001:db8:1::2 dst=2001:db8:2::2 sport=1 dport=2 "
        "[UNREPLIED] src=2001:db8:2::2 dst=2001:db8:2::1 sport=2 dport=1 mark=0 use=1\n"
    )
    assert [e.proto for e in ct] == ["tcp", "udp"]
    assert ct[0].state == "ESTABLISHED" and ct[0].timeout == 431999
    assert ct[0].orig == {
        "src": "192.0.2.2",
        "dst": "203.0.113.10",
        "sport": "40000",
        "dport": "80",
    }
    assert ct[0].reply["src"] == "198.51.100.2" and ct[0].reply["sport"] == "8080"
    assert (ct[0].mark, ct[0].zone, ct[0].fields["helper"]) == (0x42, 5, "ftp")
    assert ct[1].state is None and ct[1].flags == {"UNREPLIED"}
    assert ct[1].reply["dst"] == "2001:db8:2::1"

    (exp,) = parse_expect(
        "299 proto=6 src=192.0.2.2 dst=198.51.100.2 sport=0 dport=34509 "
        "mask-src=255.255.255.255 mask-dst=255.255.255.255 sport=0 dport=65535 "
        "master-src=192.0.2.2 master-dst=198.51.100.2 sport=33154 dport=21 class=0 helper=ftp\n"
    )
    assert exp.timeout == 299
    assert exp.tuple == {"src": "192.0.2.2", "dst": "198.51.100.2", "sport": "0", "dport": "34509"}
    assert exp.mask["dport"] == "65535"
    assert exp.master == {
        "src": "192.0.2.2",
        "dst": "198.51.100.2",
        "sport": "33154",
        "dport": "21",
    }
    assert exp.fields == {"proto": "6", "class": "0", "helper": "ftp"}


def test_require_capability_skips_locally_and_fails_on_ci() -> None:
    require_capability(None, ci=True)  # nothing missing: no-op
    with pytest.raises(pytest.skip.Exception, match="needs root and network namespaces: x"):
        require_capability("x", ci=False)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_capability("x", ci=True)


# --------------------------------------------------------------------------- namespaces


def test_in_netns_netlink_socket_sees_that_namespace(
    netns_factory: NamespaceFactory, ct_netns: Namespace
) -> None:
    other = netns_factory.create("other")
    other.nft(CT_ENABLE_RULESET)
    before = netns_inode()
    with in_netns(ct_netns.name):
        assert netns_inode() == netns_inode(f"/run/netns/{ct_netns.name}")
        sock_ct = nfct_socket()
    assert netns_inode() == before
    with in_netns(other.name):
        sock_other = nfct_socket()
    with pytest.raises(RuntimeError), in_netns(other.name):
        raise RuntimeError("boom")
    assert netns_inode() == before

    ct_netns.conntrack(
        *("-I", "-p", "tcp", "-s", "192.0.2.77", "-d", "198.51.100.77"),
        *("--sport", "4242", "--dport", "80", "--state", "ESTABLISHED"),
        *("-u", "SEEN_REPLY,ASSURED", "-t", "60", "-m", "7"),
    )
    with sock_ct, sock_other:
        seen_ct = nfct_dump(sock_ct)
        seen_other = nfct_dump(sock_other)
    assert [nfct_ports(e) for e in seen_ct] == [(4242, 80)]
    assert int.from_bytes(seen_ct[0][CTA_MARK], "big") == 7
    assert seen_other == []
    (entry,) = ct_netns.ct_list()
    assert entry.orig["sport"] == "4242" and entry.mark == 7 and "ASSURED" in entry.flags
    assert ct_netns.read_sysctl("net.netfilter.nf_conntrack_events") == "1"


def test_topology_names_and_sysctls(router_topology: Topology) -> None:
    topo = router_topology
    names = [ns.name for ns in topo.namespaces()]
    tag = names[0][:9]
    assert tag.startswith("cts") and all(n.startswith(tag) and len(n) <= 15 for n in names)
    assert set(names) <= set(list_netns())
    assert topo.fw.read_sysctl("net.ipv4.ip_forward") == "1"
    assert topo.fw.read_sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert topo.fw.read_sysctl("net.netfilter.nf_conntrack_tcp_be_liberal") == "0"
    assert "default via 192.0.2.1" in topo.client.ip("-4", "route").stdout
    assert "default via 2001:db8:2::1" in topo.server.ip("-6", "route").stdout


# --------------------------------------------------------------------------- (a)-(e)


def test_dnat_reaches_server_port_8080(router_topology: Topology) -> None:
    topo = router_topology
    srv = topo.server.start(traffic_cmd("tcp-echo-server", "--port", str(DNAT_TARGET_PORT)))
    cli = topo.client.popen(
        traffic_cmd(
            "tcp-client", "--host", DNAT_VIP_V4, f"--port={DNAT_PORT}", "--count=2", "--wait-stdin"
        )
    )
    cli.wait_line("CONNECTED")
    entries = tcp_entries(topo.fw, DNAT_PORT)
    assert sorted(int(e.orig["sport"]) for e in entries) == client_ports(cli.lines, "CONN")
    for e in entries:
        assert e.orig["src"] == CLIENT_V4 and e.orig["dst"] == DNAT_VIP_V4
        assert e.state == "ESTABLISHED" and "ASSURED" in e.flags
        assert e.reply["src"] == SERVER_V4 and e.reply["sport"] == str(DNAT_TARGET_PORT)
        assert e.reply["dst"] == FW_SERVER_V4  # also masqueraded on the way out
    srv.wait_line(f"ACCEPT {DNAT_TARGET_PORT} {FW_SERVER_V4} ")
    cli.send_line("done")
    assert cli.finish() == 0, cli.output()


@pytest.mark.parametrize("af", [V4, V6], ids=["ipv4", "ipv6"])
def test_masquerade_toward_server(router_topology: Topology, af: dict[str, str]) -> None:
    topo = router_topology
    srv = topo.server.start(traffic_cmd("tcp-echo-server", "--port", str(PLAIN_PORT)))
    cli = topo.client.run(traffic_cmd("tcp-client", "--host", af["server"], "--port", "5000"))
    (lport,) = client_ports(cli.stdout.splitlines(), "CONN")
    (entry,) = [e for e in tcp_entries(topo.fw, PLAIN_PORT) if e.family == af["family"]]
    assert entry.orig == {
        "src": af["client"],
        "dst": af["server"],
        "sport": str(lport),
        "dport": str(PLAIN_PORT),
    }
    assert entry.reply["src"] == af["server"] and entry.reply["dst"] == af["fw"]
    assert "ASSURED" in entry.flags
    srv.wait_line(f"ACCEPT {PLAIN_PORT} {af['fw']} ")


def test_mark_label_and_zone(router_topology: Topology) -> None:
    topo = router_topology
    ports = [PLAIN_PORT, MARK_PORT, LABEL_PORT, ZONE_PORT]
    topo.server.start(traffic_cmd("tcp-echo-server", *[f"--port={p}" for p in ports]))
    lports: dict[int, int] = {}
    for port in ports:
        out = topo.client.run(traffic_cmd("tcp-client", "--host", SERVER_V4, "--port", str(port)))
        (lports[port],) = client_ports(out.stdout.splitlines(), "CONN")

    def entry(port: int) -> CtEntry:
        (e,) = tcp_entries(topo.fw, port)
        assert e.orig["sport"] == str(lports[port])
        return e

    assert entry(MARK_PORT).mark == MARK_VALUE == 66
    assert entry(PLAIN_PORT).mark == 0
    assert entry(ZONE_PORT).zone == ZONE_ID
    assert entry(ZONE_PORT).reply["dst"] == FW_SERVER_V4  # NAT works inside zone 5
    assert entry(PLAIN_PORT).zone == 0 and "zone" not in entry(PLAIN_PORT).fields
    assert "ASSURED" in entry(ZONE_PORT).flags  # both directions were found in zone 5

    # The conntrack CLI prints labels only with /etc/xtables/connlabel.conf (not
    # created here: host file), so read CTA_LABELS from a raw dump instead.
    with in_netns(topo.fw.name):
        sock = nfct_socket()
    with sock:
        dumped = {nfct_ports(e)[1]: e for e in nfct_dump(sock)}
    assert labels_bits(dumped[LABEL_PORT][CTA_LABELS]) == 1 << LABEL_BIT
    assert labels_bits(dumped[PLAIN_PORT].get(CTA_LABELS, b"")) == 0


FTP_CASES = [
    pytest.param(V4, "pasv", id="ipv4-pasv"),
    pytest.param(V4, "port", id="ipv4-port"),
    pytest.param(V6, "pasv", id="ipv6-epsv"),
    pytest.param(V6, "port", id="ipv6-eprt"),
]


@pytest.mark.parametrize(("af", "mode"), FTP_CASES)
def test_ftp_helper_creates_expectation_and_related_flow(
    router_topology: Topology, af: dict[str, str], mode: str
) -> None:
    topo, fw = router_topology, router_topology.fw
    topo.server.start(traffic_cmd("ftp-server", "--size", str(FTP_FILE_SIZE)))
    cli = topo.client.popen(
        traffic_cmd("ftp-client", "--host", af["server"], "--mode", mode, "--wait-stdin")
    )
    pending_port = int(cli.wait_line("PENDING").split()[3])

    # The client is paused after PASV/PORT: the expectation stays until it goes on.
    (exp,) = fw.ct_expect_list()
    assert exp.fields["helper"] == "ftp" and 0 < exp.timeout <= 300
    assert exp.master["src"] == af["client"] and exp.master["dport"] == str(FTP_HELPER_PORT)
    if mode == "pasv":  # client -> server:<port from 227/229>
        assert (exp.tuple["src"], exp.tuple["dst"]) == (af["client"], af["server"])
        assert exp.tuple["dport"] == str(pending_port)
    else:  # server -> fw's masquerade address:<port nf_nat_ftp put in PORT/EPRT>
        assert (exp.tuple["src"], exp.tuple["dst"]) == (af["server"], af["fw"])
    data_dport = exp.tuple["dport"]

    cli.send_line("go")
    cli.wait_line(f"DONE {FTP_FILE_SIZE}")
    assert cli.finish() == 0, cli.output()
    assert fw.ct_expect_list() == []  # consumed by the data connection

    (control,) = [e for e in tcp_entries(fw, FTP_HELPER_PORT) if e.family == af["family"]]
    assert control.fields.get("helper") == "ftp"
    (data,) = fw.ct_list("-p", "tcp", "-f", af["family"], "--status", "EXPECTED")
    assert data.orig["dport"] == data_dport and data.orig["src"] == exp.tuple["src"]
    assert "helper" not in data.fields

    with in_netns(fw.name):
        sock = nfct_socket()
    with sock:
        related = [e for e in nfct_dump(sock) if CTA_TUPLE_MASTER in e]
    assert [nfct_ports(e)[1] for e in related] == [int(data_dport)]
    assert nfct_ports(related[0], CTA_TUPLE_MASTER) == (
        int(control.orig["sport"]),
        FTP_HELPER_PORT,
    )


@pytest.mark.parametrize("af", [V4, V6], ids=["ipv4", "ipv6"])
def test_udp_flows_create_entries(router_topology: Topology, af: dict[str, str]) -> None:
    topo = router_topology
    topo.server.start(traffic_cmd("udp-echo-server", "--port", str(UDP_PORT)))
    out = topo.client.run(
        traffic_cmd(
            "udp-client", "--host", af["server"], f"--port={UDP_PORT}", "--count=3", "--rounds=2"
        )
    )
    entries = [
        e for e in topo.fw.ct_list("-p", "udp", "-f", af["family"]) if e.matches(dport=UDP_PORT)
    ]
    assert sorted(int(e.orig["sport"]) for e in entries) == client_ports(
        out.stdout.splitlines(), "FLOW"
    )
    for e in entries:
        assert e.orig["src"] == af["client"] and e.reply["dst"] == af["fw"]
        assert "UNREPLIED" not in e.flags


# --------------------------------------------------------------------------- (f) cleanup


def pid_gone(pid: int) -> bool:
    """True if no process *pid* exists (zombies of our own children count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


# Ignores SIGTERM (forces the SIGKILL path) and leaves a daemon in its own
# session (only the namespace sweep can find it).
STUBBORN = (
    "import os, signal, subprocess, sys, time\n"
    "d = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('READY', os.getpid(), d.pid, flush=True)\n"
    "time.sleep(300)\n"
)


def start_stubborn(ns: Namespace) -> list[int]:
    proc = ns.popen([sys.executable, "-c", STUBBORN])
    _, leader, daemon = proc.wait_line("READY").split()
    assert int(leader) == proc.pid  # ip netns exec execs the command: same pid
    return [proc.pid, int(daemon)]


def assert_all_gone(tag: str, pids: list[int]) -> None:
    assert [n for n in list_netns() if n.startswith(tag)] == []
    assert [pid for pid in pids if not pid_gone(pid)] == []


def test_factory_close_deletes_namespaces_and_stops_processes() -> None:
    factory = NamespaceFactory()
    pids: list[int] = []
    try:
        topo = build_router_topology(factory)
        pids += [topo.server.start(traffic_cmd("tcp-echo-server", "--port", "5000")).pid]
        pids += [topo.server.start(traffic_cmd("udp-echo-server", "--port", "5300")).pid]
        pids += start_stubborn(topo.fw)
        assert {ns.name for ns in topo.namespaces()} <= set(list_netns())
        assert all(not pid_gone(pid) for pid in pids)
    finally:
        factory.close()
    assert_all_gone(factory.tag, pids)
    factory.close()  # idempotent


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_cleanup_on_exception(exc_type: type[BaseException]) -> None:
    pids: list[int] = []
    with pytest.raises(exc_type), NamespaceFactory() as factory:
        ns = factory.create("x")
        pids += [ns.start(traffic_cmd("tcp-echo-server", "--port", "5000")).pid]
        raise exc_type("simulated failure")
    assert_all_gone(factory.tag, pids)
