"""``ctsync tracking`` in real network namespaces: set/show round trips, refusals, the effect
on new connections, and isolation (another namespace and the host are never changed).

Every write happens in a ``ctsync`` subprocess started inside a test namespace; the host's
sysctls are only read, to prove they did not change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.linux.netns import (
    MARK_PORT,
    SERVER_V4,
    Namespace,
    NamespaceFactory,
    Topology,
    traffic_cmd,
)

NETFILTER = Path("/proc/sys/net/netfilter")


def ctsync(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run([sys.executable, "-m", "ctsync", *args], check=False, timeout=60)


def snapshot(ns: Namespace) -> dict[str, str]:
    """Every nf_conntrack_* value of a namespace but the live entry count."""
    out = ns.run(["sh", "-c", "cd /proc/sys/net/netfilter && grep -H . nf_conntrack_*"]).stdout
    values = dict(line.split(":", 1) for line in out.splitlines())
    values.pop("nf_conntrack_count", None)
    return values


def host_snapshot() -> dict[str, str]:
    return {
        p.name: p.read_text().strip()
        for p in NETFILTER.glob("nf_conntrack_*")
        if p.name != "nf_conntrack_count"
    }


def shown(ns: Namespace) -> dict[str, Any]:
    out = ctsync(ns, "tracking", "--json")
    assert out.returncode == 0, out
    data = json.loads(out.stdout)
    return {s["name"]: s for s in data["settings"]}


def test_set_and_show_round_trip(ct_netns: Namespace, netns_factory: NamespaceFactory) -> None:
    host_before = host_snapshot()
    other = netns_factory.create("other")
    other_before = snapshot(other)
    out = ctsync(
        ct_netns,
        "tracking",
        "set",
        "tcp-established-timeout",
        "1d2h",
        "udp-timeout",
        "45s",
        "icmp-timeout",
        "00:01:30",
        "loose-tcp-tracking",
        "no",
        "liberal-tcp-tracking",
        "yes",
        "timestamps",
        "yes",
    )
    assert out.returncode == 0, out
    assert out.stdout.splitlines()[0] == "tcp-established-timeout: 1d2h"
    read = ct_netns.read_sysctl
    assert read("net.netfilter.nf_conntrack_tcp_timeout_established") == str(93600)
    assert read("net.netfilter.nf_conntrack_udp_timeout") == "45"
    assert read("net.netfilter.nf_conntrack_icmp_timeout") == "90"
    assert read("net.netfilter.nf_conntrack_tcp_loose") == "0"
    assert read("net.netfilter.nf_conntrack_tcp_be_liberal") == "1"
    assert read("net.netfilter.nf_conntrack_timestamp") == "1"

    settings = shown(ct_netns)
    assert settings["tcp-established-timeout"]["value"] == 93600
    assert settings["tcp-established-timeout"]["text"] == "1d2h"
    assert settings["loose-tcp-tracking"]["value"] is False
    assert settings["liberal-tcp-tracking"]["value"] is True
    # nf_conntrack_max is read-only outside the initial namespace on this kernel line.
    assert settings["max-entries"]["writable"] is False
    assert settings["total-entries"]["writable"] is False
    assert settings["udp-timeout"]["writable"] is True
    text = ctsync(ct_netns, "tracking").stdout
    assert "udp-timeout: 45s" in text and "loose-tcp-tracking: no" in text
    assert text.splitlines()[0].strip() == "enabled: auto"

    # Set back by sysctl name; the other namespace and the host never changed.
    again = ctsync(ct_netns, "tracking", "set", "nf_conntrack_tcp_loose", "yes")
    assert again.returncode == 0 and read("net.netfilter.nf_conntrack_tcp_loose") == "1"
    assert snapshot(other) == other_before
    assert host_snapshot() == host_before


def test_refusals_change_nothing(ct_netns: Namespace) -> None:
    host_before = host_snapshot()
    before = snapshot(ct_netns)
    cases = [
        (["udp-timeout", "10s", "tcp-established-timeout", "1x"], 2, "not a duration"),
        (["udp-timeout", "10s", "tcp-established-timeout", "0"], 2, "out of range"),
        (["udp-timeout", "10s", "loose-tcp-tracking", "maybe"], 2, "not yes or no"),
        (["udp-timeout", "10s", "max-entries", "1000"], 1, "read-only in this network namespace"),
        (["udp-timeout", "10s", "total-entries", "1"], 1, "kernel maintains it"),
        (["udp-timeout", "10s", "buckets", "1024"], 1, "read-only"),
        (["udp-timeout", "10s", "dccp-open-timeout", "1h"], 1, "does not exist"),
    ]
    for args, code, message in cases:
        if args[2] == "dccp-open-timeout" and "nf_conntrack_dccp_timeout_open" in before:
            continue  # a kernel with DCCP tracking: the setting exists there
        out = ctsync(ct_netns, "tracking", "set", *args)
        assert out.returncode == code, (args, out)
        assert message in out.stderr, (args, out.stderr)
        assert out.stderr.startswith(("error: ", "Usage: ")), out.stderr
    assert snapshot(ct_netns) == before
    assert host_snapshot() == host_before


def test_timeout_applies_to_new_connections(router_topology: Topology) -> None:
    site = router_topology
    fw = site.fw
    site.server.start(traffic_cmd("tcp-echo-server", "--port", str(MARK_PORT)))
    out = ctsync(fw, "tracking", "set", "tcp-established-timeout", "1h")
    assert out.returncode == 0, out
    client = site.client.popen(
        traffic_cmd("tcp-client", "--host", SERVER_V4, "--port", str(MARK_PORT), "--wait-stdin")
    )
    client.wait_line("CONNECTED", timeout=15)
    listed = ctsync(fw, "connections", "--json", "--dport", str(MARK_PORT))
    assert listed.returncode == 0, listed
    (conn,) = json.loads(listed.stdout)
    assert conn["tcp_state"] == "established"
    assert 3500 < conn["timeout"] <= 3600
    assert conn["timeout_text"].startswith("59m") or conn["timeout_text"] == "1h"
