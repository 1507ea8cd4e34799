"""``ctsync connections [delete]`` against the real kernel table of a firewall namespace.

Real TCP flows go client -> fw -> server through the router topology (SNAT by masquerade on
everything, DNAT of 203.0.113.10:80, mark 0x42 on port 5001); ``ctsync`` runs inside the fw
namespace as a subprocess, as an operator would run it there. Synthetic entries (committed
over ctnetlink) exercise the batched delete beyond one batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from ctsync.core.entry import IPPROTO_TCP, Entry, Status, TcpInfo, TcpState, make_tuple
from ctsync.io.netlink import Committer
from tests.linux.netns import (
    CLIENT_V4,
    DNAT_PORT,
    DNAT_TARGET_PORT,
    DNAT_VIP_V4,
    FW_SERVER_V4,
    MARK_PORT,
    MARK_VALUE,
    SERVER_V4,
    SERVER_V6,
    Namespace,
    Process,
    Topology,
    in_netns,
    traffic_cmd,
)

PLAIN_PORT = 5003
IDLE = ("--wait-stdin", "--interval", "600")  # no packet after the first echo


def ctsync(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run([sys.executable, "-m", "ctsync", *args], check=False, timeout=60)


def listing(ns: Namespace, *args: str) -> list[dict[str, Any]]:
    out = ctsync(ns, "connections", "--json", *args)
    assert out.returncode == 0, out
    data: list[dict[str, Any]] = json.loads(out.stdout)
    return data


def connect(site: Topology, host: str, port: int, *extra: str, count: int = 1) -> Process:
    proc = site.client.popen(
        traffic_cmd(
            "tcp-client", "--host", host, "--port", str(port), "--count", str(count), *extra
        )
    )
    proc.wait_line("CONNECTED", timeout=15)
    return proc


@pytest.fixture
def site(router_topology: Topology) -> Iterator[Topology]:
    ports = (DNAT_TARGET_PORT, MARK_PORT, PLAIN_PORT)
    router_topology.server.start(
        traffic_cmd("tcp-echo-server", *(a for p in ports for a in ("--port", str(p))))
    )
    yield router_topology


def fw_count(site: Topology, *args: str) -> int:
    return len(site.fw.ct_list(*args))


def test_flags_marks_and_counters_of_real_nat_flows(site: Topology) -> None:
    fw = site.fw
    # Accounting is off by default: one note, no counter columns.
    assert fw.read_sysctl("net.netfilter.nf_conntrack_acct") == "0"
    early = connect(site, SERVER_V4, PLAIN_PORT, *IDLE)
    out = ctsync(fw, "connections")
    assert out.returncode == 0, out
    assert out.stderr.count("accounting is off") == 1, out.stderr
    assert "ctsync tracking set accounting yes" in out.stderr
    assert "ORIG-BYTES" not in out.stdout and "SAC   s" in out.stdout

    enabled = ctsync(fw, "tracking", "set", "accounting", "yes")
    assert enabled.returncode == 0, enabled
    assert fw.read_sysctl("net.netfilter.nf_conntrack_acct") == "1"
    connect(site, DNAT_VIP_V4, DNAT_PORT, *IDLE)
    connect(site, SERVER_V4, MARK_PORT, *IDLE)
    connect(site, SERVER_V6, PLAIN_PORT, *IDLE)

    data = listing(fw, "-p", "tcp")
    assert len(data) == 4 == fw_count(site, "-p", "tcp")
    by_port = {(d["family"], d["original"]["dport"]): d for d in data}
    dnat = by_port[("ipv4", DNAT_PORT)]
    assert dnat["flags"] == "SACsd" and dnat["srcnat"] and dnat["dstnat"]
    assert dnat["dst_address"] == f"{DNAT_VIP_V4}:{DNAT_PORT}"
    assert dnat["reply_src_address"] == f"{SERVER_V4}:{DNAT_TARGET_PORT}"
    assert dnat["reply_dst_address"].startswith(f"{FW_SERVER_V4}:")
    assert dnat["tcp_state"] == "established"
    # Handshake + one echo each way: at least 3 packets out, 2 back, with payload.
    assert dnat["orig_packets"] >= 3 and dnat["repl_packets"] >= 2
    assert dnat["orig_bytes"] > 150 and dnat["repl_bytes"] > 100
    assert 431_000 < dnat["timeout"] <= 432_000 and dnat["timeout_text"].startswith("4d23h")

    marked = by_port[("ipv4", MARK_PORT)]
    assert marked["flags"] == "SACs" and marked["connection_mark"] == MARK_VALUE
    v6 = by_port[("ipv6", PLAIN_PORT)]
    assert v6["flags"] == "SACs" and v6["src_address"].startswith("[2001:db8:1::2]:")
    # Created before accounting was on: the kernel keeps no counters for it.
    old = by_port[("ipv4", PLAIN_PORT)]
    assert old["flags"] == "SACs" and "orig_bytes" not in old
    assert old["original"]["sport"] == int(early.lines[0].split()[2])

    # The text layout: counters now, the mark in hex, no note.
    out = ctsync(fw, "connections", "-p", "tcp", "--dport", str(MARK_PORT))
    assert out.returncode == 0 and out.stderr == "", out
    header, row = out.stdout.splitlines()[1:3]
    assert "ORIG-BYTES" in header and "CONNECTION-MARK" in header
    assert row.split()[1:5] == ["SAC", "s", "tcp", marked["src_address"]]
    assert row.rstrip().endswith(f"{MARK_VALUE:#x}")

    # Filters against what the kernel holds.
    def count(*args: str) -> int:
        result = ctsync(fw, "connections", "--count", *args)
        assert result.returncode == 0, result
        return int(result.stdout)

    assert count("--dst-nat") == 1
    assert count("--nat") == 4 and count("--no-nat") == 0
    assert count("-m", f"{MARK_VALUE:#x}/0xff") == 1
    assert count("-r", f"{SERVER_V4}/32", "-p", "tcp") == 3
    assert count("-d", "198.51.100.0/24") == 2
    assert count("-f", "ipv6") == 1
    assert count("--state", "established", "-s", f"{CLIENT_V4}/32") == 3
    assert count("--state", "time-wait") == 0
    assert count("-w", "0", "-p", "tcp") == 4


def test_rates_with_an_interval(site: Topology) -> None:
    fw = site.fw
    assert ctsync(fw, "tracking", "set", "accounting", "yes").returncode == 0
    idle = connect(site, SERVER_V4, MARK_PORT, *IDLE)
    busy = connect(site, SERVER_V4, PLAIN_PORT, "--duration", "20", "--interval", "0.05")
    data = listing(fw, "-p", "tcp", "--interval", "1.5", "--sort", "rate")
    assert [d["original"]["dport"] for d in data] == [PLAIN_PORT, MARK_PORT]
    fast, slow = data
    # One echo round every 50 ms: ~20 packets/s each way, with a wide margin for a busy CPU.
    assert fast["orig_packet_rate"] > 3 and fast["repl_packet_rate"] > 3
    assert fast["orig_rate"] > 100 and fast["repl_rate"] > 100
    assert slow["orig_rate"] == slow["repl_rate"] == slow["orig_packet_rate"] == 0
    text = ctsync(fw, "connections", "--interval", "1", "--sort", "rate")
    assert text.returncode == 0, text
    lines = text.stdout.splitlines()
    assert "ORIG-RATE" in lines[1] and "REPL-PPS" in lines[1]
    assert "B/s" in lines[2] and f":{PLAIN_PORT}" in lines[2]
    assert " 0B/s" in lines[3]
    busy.stop()
    idle.stop()


def test_delete_by_mark_removes_exactly_those(site: Topology) -> None:
    fw = site.fw
    connect(site, SERVER_V4, MARK_PORT, *IDLE, count=3)
    connect(site, SERVER_V4, PLAIN_PORT, *IDLE, count=2)
    connect(site, DNAT_VIP_V4, DNAT_PORT, *IDLE)
    assert fw_count(site, "-p", "tcp") == 6
    before = {(e.orig["sport"], e.orig["dport"]) for e in fw.ct_list("-p", "tcp")}

    refused = ctsync(fw, "connections", "delete")
    assert refused.returncode == 2 and "refusing to remove every connection" in refused.stderr

    dry = ctsync(fw, "connections", "delete", "-m", f"{MARK_VALUE:#x}/0xff", "--dry-run")
    assert dry.returncode == 0, dry
    assert dry.stdout.splitlines()[-1] == "would remove 3 connections (dry run: nothing removed)"
    assert dry.stdout.count(f"{MARK_VALUE:#x}") == 3
    assert fw_count(site, "-p", "tcp") == 6
    assert fw_count(site, "-m", str(MARK_VALUE)) == 3

    done = ctsync(fw, "connections", "delete", "-m", f"{MARK_VALUE:#x}/0xff")
    assert done.returncode == 0, done
    assert done.stdout.strip() == "removed 3 connections (0 already gone)"
    assert fw_count(site, "-m", str(MARK_VALUE)) == 0
    # Exactly the others are left, the very same connections.
    left = {(e.orig["sport"], e.orig["dport"]) for e in fw.ct_list("-p", "tcp")}
    assert left == {k for k in before if k[1] != str(MARK_PORT)}
    assert sorted(dport for _, dport in left) == ["5003", "5003", "80"]

    # One destination: the DNAT'ed flow only, as JSON.
    gone = ctsync(fw, "connections", "delete", "-d", DNAT_VIP_V4, "--json")
    assert gone.returncode == 0, gone
    assert json.loads(gone.stdout) == {
        "dry_run": False,
        "matched": 1,
        "removed": 1,
        "already_gone": 0,
        "failed": 0,
    }
    assert sorted(e.orig["dport"] for e in fw.ct_list("-p", "tcp")) == ["5003", "5003"]


def _synthetic(i: int, mark: int) -> Entry:
    orig = make_tuple(
        f"192.0.2.{1 + i % 200}", f"203.0.113.{1 + i // 200}", IPPROTO_TCP, 1024 + i, 443
    )
    return Entry(
        orig,
        status=int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED),
        timeout=3600,
        mark=mark,
        protoinfo=TcpInfo(int(TcpState.ESTABLISHED), 7, 7, 0x23, 0, 0x23, 0),
    )


def test_batched_delete_of_many_synthetic_entries(ct_netns: Namespace) -> None:
    # 700 entries: marks 0x102, 0x202 (match 0x2/0xff) and 0x103 (does not); > 2 batches.
    marks = (0x102, 0x202, 0x103)
    entries = [_synthetic(i, marks[i % 3]) for i in range(700)]
    with in_netns(ct_netns.name), Committer() as committer:
        result = committer.commit_entries(entries)
    assert (result.committed, result.failed) == (700, 0)
    matching = sum(1 for e in entries if (e.mark or 0) & 0xFF == 0x2)
    assert matching == 467

    count = ctsync(ct_netns, "connections", "--count", "-m", "0x2/0xff")
    assert count.stdout.strip() == str(matching)
    done = ctsync(ct_netns, "connections", "delete", "-m", "0x2/0xff", "--json")
    assert done.returncode == 0, done
    report = json.loads(done.stdout)
    assert (report["matched"], report["removed"], report["already_gone"]) == (matching, matching, 0)
    left = ct_netns.ct_list()
    assert len(left) == 700 - matching
    assert {e.mark for e in left} == {0x103}

    # --all empties the table; a second run finds nothing.
    assert ctsync(ct_netns, "connections", "delete", "--all").stdout.strip() == (
        f"removed {700 - matching} connections (0 already gone)"
    )
    assert ct_netns.ct_list() == []
    assert ctsync(ct_netns, "connections").stdout.strip() == "no connections"
