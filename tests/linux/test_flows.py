"""``ctsync flows`` against real traffic through the router topology (client -- fw -- server).

Three observers run in the fw namespace at once while the client sends TCP, UDP and ICMP
(IPv4 and IPv6, DNAT and masquerade included): with the table, without it, and one that
writes the nftables draft. The summaries must list exactly the flows that were sent; the
draft must pass ``nft -c`` and, loaded with policy drop, let those flows through and block
flows that were never seen.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.linux.netns import (
    CLIENT_V4,
    CLIENT_V6,
    DNAT_PORT,
    DNAT_TARGET_PORT,
    DNAT_VIP_V4,
    FW_CLIENT_V4,
    FW_SERVER_V4,
    FW_SERVER_V6,
    SERVER_V4,
    SERVER_V6,
    Namespace,
    Process,
    Topology,
    traffic_cmd,
)

CTSYNC = (sys.executable, "-m", "ctsync")
HIGH = "1025-65535"
TCP_PORT = 5000
IDLE_PORT = 5001
UDP_PORT = 5300
DEAD_UDP_PORT = 5999

# One UDP exchange from privileged source port 123 (not collapsed), echoed by the server.
UDP_FROM_123 = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 123))
s.settimeout(2)
for _ in range(4):
    s.sendto(b"ntp-ish", ("{SERVER_V4}", {UDP_PORT}))
    try:
        if s.recv(100) == b"ntp-ish":
            print("DONE")
            break
    except TimeoutError:
        pass
"""
# One datagram to a port nobody listens on: the connection never sees a reply.
UDP_ONE_WAY = f"""
import socket
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("{SERVER_V4}", {DEAD_UDP_PORT}))
print("DONE")
"""


def observer(fw: Namespace, out: Path, *args: str) -> Process:
    proc = fw.popen([*CTSYNC, "flows", "-o", str(out), *args])
    proc.wait_line("observing", timeout=30)
    return proc


def interrupt(proc: Process) -> None:
    os.kill(proc.pid, signal.SIGINT)
    rc = proc.finish(timeout=30)
    assert rc == 0, proc.output()


def client_ok(ns: Namespace, *args: str) -> None:
    proc = ns.run(traffic_cmd(*args), check=False, timeout=30)
    assert proc.returncode == 0 and "DONE" in proc.stdout, (args, proc.stdout, proc.stderr)


def client_blocked(ns: Namespace, *args: str) -> None:
    proc = ns.run(traffic_cmd(*args, "--timeout", "2"), check=False, timeout=30)
    assert proc.returncode != 0 and "ERROR" in proc.stdout, (args, proc.stdout)


def python_ok(ns: Namespace, script: str) -> None:
    proc = ns.run([sys.executable, "-c", script], check=False, timeout=30)
    assert proc.returncode == 0 and "DONE" in proc.stdout, (proc.stdout, proc.stderr)


def ping(ns: Namespace, host: str, count: int = 1) -> int:
    cmd = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", host]
    return ns.run(cmd, check=False, timeout=30).returncode


def send_traffic(client: Namespace) -> None:
    client_ok(client, "tcp-client", "--host", SERVER_V4, "--port", str(TCP_PORT), "--count", "3")
    client_ok(client, "tcp-client", "--host", DNAT_VIP_V4, "--port", str(DNAT_PORT))
    client_ok(client, "udp-client", "--host", SERVER_V4, "--port", str(UDP_PORT), "--count", "2")
    python_ok(client, UDP_FROM_123)
    python_ok(client, UDP_ONE_WAY)
    assert ping(client, SERVER_V4, count=2) == 0
    assert ping(client, FW_CLIENT_V4) == 0
    client_ok(client, "tcp-client", "--host", SERVER_V6, "--port", str(TCP_PORT), "--count", "2")
    assert ping(client, SERVER_V6) == 0


def flow_rows(data: dict[str, Any]) -> set[tuple[Any, ...]]:
    """(hook, proto, src, sport, dst, dport or icmp type/code, connections, both ways)."""
    rows = set()
    for f in data["flows"]:
        service = (f["icmp_type"], f["icmp_code"]) if "icmp_type" in f else f.get("dport")
        rows.add(
            (
                f["hook"],
                f["protocol"],
                f["src"],
                f.get("sport"),
                f["dst"],
                service,
                f["connections"],
                f["both_directions"],
            )
        )
    return rows


EXPECTED = {
    ("forward", "tcp", CLIENT_V4, HIGH, SERVER_V4, TCP_PORT, 3, True),
    ("forward", "tcp", CLIENT_V4, HIGH, DNAT_VIP_V4, DNAT_PORT, 1, True),
    ("forward", "udp", CLIENT_V4, HIGH, SERVER_V4, UDP_PORT, 2, True),
    ("forward", "udp", CLIENT_V4, 123, SERVER_V4, UDP_PORT, 1, True),
    ("forward", "udp", CLIENT_V4, HIGH, SERVER_V4, DEAD_UDP_PORT, 1, False),
    ("forward", "icmp", CLIENT_V4, None, SERVER_V4, (8, 0), 1, True),
    ("input", "icmp", CLIENT_V4, None, FW_CLIENT_V4, (8, 0), 1, True),
    ("forward", "tcp", CLIENT_V6, HIGH, SERVER_V6, TCP_PORT, 2, True),
    ("forward", "icmpv6", CLIENT_V6, None, SERVER_V6, (128, 0), 1, True),
}
IDLE_FLOW = ("forward", "tcp", CLIENT_V4, HIGH, SERVER_V4, IDLE_PORT, 1, True)


def test_flows_summary_and_nft_draft_with_real_traffic(
    router_topology: Topology, tmp_path: Path
) -> None:
    topo = router_topology
    client, fw, server = topo.client, topo.fw, topo.server
    ports = [TCP_PORT, IDLE_PORT, DNAT_TARGET_PORT]
    server.start(traffic_cmd("tcp-echo-server", *(f"--port={p}" for p in ports)))
    server.start(traffic_cmd("udp-echo-server", "--port", str(UDP_PORT)))
    # Opened before observing, then silent: only the table knows about it.
    idle = client.popen(
        traffic_cmd(
            "tcp-client", "--host", SERVER_V4, "--port", str(IDLE_PORT), "--wait-stdin",
            "--interval", "600",
        )
    )  # fmt: skip
    idle.wait_line("CONNECTED", timeout=15)
    time.sleep(0.5)  # let the last ACKs pass before the event-only observer subscribes

    with_table, events_only, draft = (tmp_path / n for n in ("a.json", "b.json", "d.nft"))
    observers = [
        observer(fw, with_table, "--json"),
        observer(fw, events_only, "--json", "--no-table"),
        observer(fw, draft, "--nft", "--nft-table", "flows_draft"),
    ]
    send_traffic(client)
    time.sleep(0.5)  # the last events (ping replies, FINs) reach the observers
    for proc in observers:
        interrupt(proc)

    a = json.loads(with_table.read_text())
    b = json.loads(events_only.read_text())
    assert a["observed"]["interrupted"] is True
    assert flow_rows(a) == EXPECTED | {IDLE_FLOW}
    assert flow_rows(b) == EXPECTED
    assert b["observed"]["include_table"] is False and b["observed"]["events"] > 0

    by_dst = {(f["protocol"], f["dst"], f.get("dport")): f for f in a["flows"]}
    vip = by_dst["tcp", DNAT_VIP_V4, DNAT_PORT]
    assert vip["nat"] == {
        "dnat": {"dst": SERVER_V4, "dport": DNAT_TARGET_PORT},
        "snat": [FW_SERVER_V4],
    }
    assert by_dst["tcp", SERVER_V4, TCP_PORT]["nat"] == {"snat": [FW_SERVER_V4]}
    assert by_dst["tcp", SERVER_V6, TCP_PORT]["nat"] == {"snat": [FW_SERVER_V6]}
    assert by_dst["tcp", SERVER_V4, TCP_PORT]["assured"] == 3
    services = {(s["protocol"], s["dst"], s.get("dport")): s for s in a["services"]}
    dnat_service = services["tcp", SERVER_V4, DNAT_TARGET_PORT]
    assert dnat_service["dnat_from"] == {"dst": DNAT_VIP_V4, "dport": DNAT_PORT}
    assert services["udp", SERVER_V4, UDP_PORT]["sports"] == [123, HIGH]
    assert services["udp", SERVER_V4, UDP_PORT]["prefixes"] == [f"{CLIENT_V4}/32"]

    # The draft: valid, then loaded with policy drop next to the fw's own ruleset.
    text = draft.read_text()
    assert "policy drop;" in text
    assert (
        f"ip saddr {CLIENT_V4} ip daddr {SERVER_V4} tcp dport {DNAT_TARGET_PORT}"
        f" ct original ip daddr {DNAT_VIP_V4} ct original proto-dst {DNAT_PORT}"
    ) in text
    fw.run(["nft", "-c", "-f", str(draft)])
    fw.run(["nft", "-f", str(draft)])
    assert "flows_draft" in fw.run(["nft", "list", "tables"]).stdout
    idle.send_line("go")  # established: still passes
    assert idle.wait_line("DONE", timeout=15)

    client_ok(client, "tcp-client", "--host", SERVER_V4, "--port", str(TCP_PORT))
    client_ok(client, "tcp-client", "--host", DNAT_VIP_V4, "--port", str(DNAT_PORT))
    client_ok(client, "udp-client", "--host", SERVER_V4, "--port", str(UDP_PORT))
    client_ok(client, "tcp-client", "--host", SERVER_V6, "--port", str(TCP_PORT))
    assert ping(client, SERVER_V4) == 0
    assert ping(client, SERVER_V6) == 0
    assert ping(client, FW_CLIENT_V4) == 0
    # Never seen: the DNAT target directly, and the idle port over IPv6.
    client_blocked(client, "tcp-client", "--host", SERVER_V4, "--port", str(DNAT_TARGET_PORT))
    client_blocked(client, "tcp-client", "--host", SERVER_V6, "--port", str(IDLE_PORT))
    # ... which the server would accept without the draft.
    fw.run(["nft", "delete", "table", "inet", "flows_draft"])
    client_ok(client, "tcp-client", "--host", SERVER_V4, "--port", str(DNAT_TARGET_PORT))


def test_flows_duration_ends_by_itself(ct_netns: Namespace, tmp_path: Path) -> None:
    out = tmp_path / "flows.txt"
    started = time.monotonic()
    proc = observer(ct_netns, out, "--duration", "2s", "--no-collapse")
    assert ping(ct_netns, "127.0.0.1", count=2) == 0
    assert proc.finish(timeout=30) == 0, proc.output()
    assert time.monotonic() - started >= 2.0
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# 1 flows, 1 connections, 1 services observed in 2.")
    assert lines[0].endswith("(table and events)")
    assert lines[2].split()[:7] == [
        "icmp",
        "127.0.0.1",
        "-",
        "127.0.0.1",
        "echo-request",
        "8/0",
        "1",
    ]
    assert any(line.split()[:2] == ["local", "icmp"] for line in lines)


def test_every_kind_of_rule_passes_nft_check(ct_netns: Namespace, tmp_path: Path) -> None:
    """Rules the traffic test does not produce: zones, loose covers, other protocols, output."""
    from ctsync.core.entry import (
        IPPROTO_GRE,
        IPPROTO_ICMP,
        IPPROTO_SCTP,
        IPPROTO_TCP,
        IPPROTO_UDPLITE,
        Entry,
        Status,
        addr,
        make_tuple,
    )
    from ctsync.core.flows import FlowCollector, ObservationInfo, render_nft, summarize

    seen = int(Status.SEEN_REPLY | Status.CONFIRMED)
    tuples = [
        make_tuple("192.0.2.2", "198.51.100.2", IPPROTO_GRE, 1, 2),
        make_tuple("192.0.2.2", "198.51.100.2", IPPROTO_SCTP, 40000, 9),
        make_tuple("2001:db8:1::2", "2001:db8:2::2", IPPROTO_UDPLITE, 53, 9),
        make_tuple("192.0.2.2", "198.51.100.2", IPPROTO_ICMP, icmp_type=13, icmp_code=1),
        make_tuple("192.0.2.1", "203.0.113.5", IPPROTO_TCP, 40000, 443),  # output
        make_tuple("2001:db8:1::1", "2001:db8:9::9", IPPROTO_TCP, 40000, 22),  # output, v6
        *(make_tuple(f"192.0.2.{h}", "192.0.2.1", IPPROTO_TCP, 40000, 22) for h in (5, 9, 77)),
    ]
    collector = FlowCollector()
    for i, t in enumerate(tuples):
        entry = Entry(t, reply=t.inverted(), status=seen, zone=7 if i == 0 else None)
        collector.observe(str(i).encode(), entry)
    local = frozenset({addr("192.0.2.1"), addr("2001:db8:1::1")})
    summary = summarize(collector.flows(), ObservationInfo(1.0), local=local, max_prefixes=2)
    for policy in ("drop", "accept"):
        draft = tmp_path / f"{policy}.nft"
        draft.write_text(render_nft(summary, policy=policy))
        text = draft.read_text()
        assert "ct zone 7" in text and "meta l4proto 47" in text and "chain output" in text
        assert "ip saddr { 192.0.2.0/28, 192.0.2.77 }" in text
        ct_netns.run(["nft", "-c", "-f", str(draft)])
