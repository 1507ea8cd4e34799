"""Expectation sync (``sync.expect-sync``) with real agents and a real FTP helper.

Site: client -- fw1/fw2 -- server (:func:`build_failover_site`: strict tracking, WAN->LAN
only ESTABLISHED/RELATED, client traffic SNATed to the VIP), plus the kernel FTP helper on
both firewalls. An active-mode FTP transfer needs the expectation: the server's data
connection to VIP_WAN is only let through (and un-NATed to the client) as RELATED to the
control connection. So a transfer that completes through fw2 after a failover proves fw2's
kernel got the expectation from fw1, committed after its master.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ctsync.core import expect, record
from ctsync.core.cache import Cache
from ctsync.core.entry import (
    AF_INET,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    Expectation,
    Status,
    TcpInfo,
)
from ctsync.core.filter import EntryFilter
from ctsync.io import netlink
from ctsync.io.commit_pool import MIN_SPLIT, CommitPool
from ctsync.io.netlink import KernelTable
from tests.linux.agents import (
    CLIENT_ADDR,
    FAILOVER_RULESET,
    FAST_SYNC,
    SERVER_ADDR,
    VIP_WAN,
    Cluster,
    FailoverSite,
    build_failover_site,
    kernel_entries,
    wait_until,
)
from tests.linux.netns import (
    CT_ENABLE_RULESET,
    SERVER_V4,
    NamespaceFactory,
    Process,
    Topology,
    in_netns,
    traffic_cmd,
)

FTP_PORT = 21

#: FAILOVER_RULESET plus the kernel FTP helper on port-21 connections from the LAN.
FTP_RULESET = FAILOVER_RULESET.replace(
    "table inet fw {\n",
    """table inet fw {
    ct helper ftp-standard {
        type "ftp" protocol tcp
        l3proto inet
    }
    chain helpers {
        type filter hook prerouting priority filter; policy accept;
        iifname "lan0" tcp dport 21 ct helper set "ftp-standard"
    }
""",
    1,
)


#: Conntrack on, and the FTP helper registered (a committed master names it).
HELPER_RULESET = (
    CT_ENABLE_RULESET
    + """
table inet helpers {
    ct helper ftp-standard {
        type "ftp" protocol tcp
        l3proto inet
    }
}
"""
)


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def ftp_site(factory: NamespaceFactory, tmp: Path, helpers: list[str]) -> FailoverSite:
    site = build_failover_site(factory, tmp, sync={**FAST_SYNC, "expect-sync": helpers})
    for node_id in (1, 2):
        site.fw(node_id).nft(FTP_RULESET)
    site.cluster.start()
    site.server.start(traffic_cmd("ftp-server", f"--port={FTP_PORT}"))
    return site


def expectations(cluster: Cluster, node_id: int, which: str) -> list[dict[str, Any]]:
    """The expectation records of a node's internal or external cache(s)."""
    reply = cluster.query(node_id, "cache", {"which": which, "table": "expect"})
    entries: list[dict[str, Any]] = reply["entries"]
    return entries


def ftp_client(site: FailoverSite, mode: str) -> tuple[Process, int]:
    """An FTP client paused after PASV/PORT (its expectation in place); (process, port)."""
    cli = site.client.popen(
        traffic_cmd(
            "ftp-client", "--host", SERVER_ADDR, "--mode", mode, "--wait-stdin", "--timeout=60"
        )
    )
    return cli, int(cli.wait_line("PENDING", 15).split()[3])


def synced_master(
    cluster: Cluster, viewer: int, owner: int, sport: int | None = None
) -> dict[str, Any] | None:
    """An FTP control connection (client -> server:21, from *sport* if given) in
    *viewer*'s external cache of *owner*."""
    for entry in cluster.query(viewer, "cache", {"which": "external"})["entries"]:
        orig = entry["original"]
        control = (orig["dst"], orig["dport"]) == (SERVER_ADDR, FTP_PORT)
        if entry.get("peer") == owner and control and sport in (None, orig["sport"]):
            return entry  # type: ignore[no-any-return]
    return None


def kernel_expectations(site: FailoverSite, node_id: int) -> list[Any]:
    return site.fw(node_id).ct_expect_list(("ipv4",))


def finish(cli: Process) -> None:
    cli.send_line("go")
    cli.wait_line("DONE", 20)
    assert cli.finish(10) == 0, cli.output()


def test_ftp_expectations_sync_commit_and_carry_a_transfer_after_failover(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    site = ftp_site(netns_factory, tmp_path, ["ftp"])
    cluster = site.cluster

    # 1. Passive mode through fw1: the expectation reaches fw2's external cache, and goes
    #    away there once the data connection consumed it on fw1 (destroy propagates).
    cli, port = ftp_client(site, "pasv")
    (on_fw1,) = kernel_expectations(site, 1)
    assert on_fw1.tuple["dport"] == str(port) and on_fw1.fields.get("helper") == "ftp"
    wait_until(
        lambda: len(expectations(cluster, 2, "external")) == 1,
        10,
        "fw1's PASV expectation in fw2's external cache",
    )
    (synced,) = expectations(cluster, 2, "external")
    assert synced["type"] == "expectation" and synced["peer"] == 1
    assert synced["helper"] == "ftp"
    assert synced["master"]["src"] == CLIENT_ADDR and synced["master"]["dport"] == FTP_PORT
    assert synced["tuple"]["dst"] == SERVER_ADDR and synced["tuple"]["dport"] == port
    assert synced["protocol_number"] == IPPROTO_TCP
    # Conntrack listings leave expectation records out (they have their own table).
    assert all("original" in e for e in cluster.query(2, "cache", {"which": "external"})["entries"])
    listing = cluster.cli(2, "show", "cache", "external", "--expect")
    assert listing.returncode == 0, listing.stderr
    assert f"dst={SERVER_ADDR} sport=0 dport={port}" in listing.stdout
    assert "helper=ftp peer=1" in listing.stdout
    assert cluster.cli(2, "show", "cache", "external", "--expect", "--count").stdout == "1\n"
    finish(cli)
    assert kernel_expectations(site, 1) == []
    wait_until(
        lambda: expectations(cluster, 2, "external") == [],
        10,
        "the consumed expectation to leave fw2's external cache",
    )
    assert expectations(cluster, 1, "internal") == []

    # 2. Active mode: PORT through fw1 (SNAT: the expectation is for the server -> VIP_WAN
    #    data connection, NATed back to the client). Then fw1 dies before the transfer.
    cli, port = ftp_client(site, "port")
    wait_until(
        lambda: len(expectations(cluster, 2, "external")) == 1,
        10,
        "fw1's PORT expectation in fw2's external cache",
    )
    (synced,) = expectations(cluster, 2, "external")
    assert synced["tuple"]["src"] == SERVER_ADDR and synced["tuple"]["dst"] == VIP_WAN
    assert synced.get("nat") is not None, synced  # the client's own address and port
    assert kernel_expectations(site, 2) == []
    # nf_nat_ftp rewrote the PORT command (the VIP is longer than the client's address): the
    # master's sequence adjustment must reach fw2 too, though the kernel sends no event for
    # it (the agent re-reads the master of a new expectation), or the control connection
    # breaks after the failover.
    control_port = synced["master"]["sport"]
    wait_until(
        lambda: "seq_adj_orig" in (synced_master(cluster, 2, 1, control_port) or {}),
        10,
        "the master's sequence adjustment in fw2's external cache",
    )

    cluster.kill(1)
    site.links(1, "down")
    site.del_vips(1)
    result = cluster.ctl(2, "commit")
    assert result["failed"] == 0 and result["errors"] == {}, result
    assert result["expectations"] == {"attempted": 1, "committed": 1, "failed": 0}, result
    assert result["committed"] == result["attempted"] >= 2  # the master(s) and the expectation
    site.add_vips(2)
    site.announce_vips(2)
    (on_fw2,) = kernel_expectations(site, 2)
    assert on_fw2.fields.get("helper") == "ftp", on_fw2.raw
    assert on_fw2.tuple["src"] == SERVER_ADDR and on_fw2.tuple["dst"] == VIP_WAN
    assert on_fw2.master["src"] == CLIENT_ADDR and on_fw2.master["dport"] == str(FTP_PORT)

    # The transfer needs the expectation: fw2 lets the server's data connection in as
    # RELATED and un-NATs it to the client, or the client never gets its data.
    cli.send_line("go")
    data_from = cli.wait_line("DATA-FROM", 20).split()
    assert data_from[1] == SERVER_ADDR
    cli.wait_line("DONE", 20)
    assert cli.finish(10) == 0, cli.output()
    assert kernel_expectations(site, 2) == [], "the data connection consumed it"
    data = [k for k in kernel_entries(site.fw(2)) if k[1] == SERVER_ADDR and k[2] == VIP_WAN]
    assert data, "the data connection went through fw2"
    assert site.invalid_drops(2) == 0


def test_helpers_not_in_expect_sync_are_not_synced(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    site = ftp_site(netns_factory, tmp_path, ["sip"])
    cluster = site.cluster
    cli, port = ftp_client(site, "pasv")
    (on_fw1,) = kernel_expectations(site, 1)
    assert on_fw1.tuple["dport"] == str(port)
    wait_until(
        lambda: synced_master(cluster, 2, 1) is not None,
        10,
        "the FTP control connection in fw2's external cache",
    )
    cluster.query(1, "resync", {"kernel": True})  # a dump must not take it either
    cluster.wait_converged([1, 2], timeout=10)
    assert expectations(cluster, 1, "internal") == []
    assert expectations(cluster, 2, "external") == []
    result = cluster.ctl(2, "commit")
    assert result["expectations"]["attempted"] == 0 and result["failed"] == 0, result
    assert kernel_expectations(site, 2) == []
    finish(cli)


def test_commit_pool_commits_expectations_after_both_halves(
    netns_factory: NamespaceFactory,
) -> None:
    """Split across the forked worker, the expectation still goes in after its master,
    even when the master travels in the worker's half and the expectation in ours."""
    ns = netns_factory.create("ct")
    ns.nft(HELPER_RULESET)
    status = int(Status.CONFIRMED | Status.ASSURED | Status.SEEN_REPLY)
    master = CtTuple(AF_INET, IPPROTO_TCP, ip("192.0.2.7"), ip("198.51.100.7"), 40000, 21)
    exp = Expectation(
        master=master,
        tuple=CtTuple(AF_INET, IPPROTO_TCP, ip("198.51.100.7"), ip("192.0.2.7"), 0, 50000),
        mask=CtTuple(AF_INET, IPPROTO_TCP, b"\xff" * 4, b"\xff" * 4, 0, 0xFFFF),
        timeout=100,
        helper="ftp",
        flags=0,
        klass=0,
    )
    fillers = [
        record.from_entry(
            Entry(replace(master, sport=1024 + i, dport=80), status=status, timeout=60)
        )
        for i in range(MIN_SPLIT)
    ]
    master_rec = record.from_entry(
        Entry(master, status=status, timeout=60, protoinfo=TcpInfo(3), helper="ftp")
    )
    records = [expect.from_expectation(exp), *fillers, master_rec]
    with in_netns(ns.name), CommitPool() as pool:
        assert pool.worker_pid is not None, "this test needs the forked worker (2 CPUs)"
        result = pool.commit_records(records)
        (dumped,) = netlink.dump_expectations()
    assert result.failed == 0, result.errors
    assert result.attempted == result.committed == len(records)
    assert (result.expect_attempted, result.expect_committed) == (1, 1)
    assert (dumped.master, dumped.tuple, dumped.helper) == (master, exp.tuple, "ftp")


def test_kernel_table_follows_expectations_by_helper(router_topology: Topology) -> None:
    """Without agents: events and dumps bring FTP expectations into the cache (and take
    them out), a table syncing another helper takes none, a table without the master
    takes none."""
    topo = router_topology
    topo.server.start(traffic_cmd("ftp-server"))

    async def scenario() -> None:
        ftp_cache, sip_cache = Cache("ftp"), Cache("sip")
        ftp = KernelTable(ftp_cache, expect_helpers=["ftp"])
        sip = KernelTable(sip_cache, expect_helpers=["sip"])
        late: KernelTable | None = None
        udp_only: KernelTable | None = None
        try:
            await ftp.start()
            await sip.start()
            cli = topo.client.popen(
                traffic_cmd("ftp-client", "--host", SERVER_V4, "--mode", "pasv", "--wait-stdin")
            )
            port = int((await asyncio.to_thread(cli.wait_line, "PENDING")).split()[3])
            await until(lambda: ftp_cache.count_expectations() == 1, "the EXP_NEW event")
            ((key, value),) = ftp_cache.expectation_items()
            exp = expect.to_expectation(key, value)
            assert exp.helper == "ftp" and exp.tuple.dport == port
            assert record.key_from_tuple(exp.master) in ftp_cache
            assert sip_cache.count_expectations() == 0
            assert sip.stats.expectations_filtered >= 1

            # Tables started now find it in the dump, unless their cache does not hold the
            # master (an accept-protocol that leaves TCP out).
            late_cache = Cache("late")
            udp_cache = Cache("udp", EntryFilter.build(accept_protocols=["udp"]))
            late = KernelTable(late_cache, expect_helpers=None)
            udp_only = KernelTable(udp_cache, expect_helpers=None)
            await late.start()
            await udp_only.start()
            ((late_key, late_value),) = late_cache.expectation_items()
            assert late_key == key and expect.same_but_timeout(late_value, value)
            assert udp_cache.count_expectations() == 0
            assert udp_only.stats.expectations_orphaned == 1

            cli.send_line("go")
            await asyncio.to_thread(cli.wait_line, "DONE")
            assert await asyncio.to_thread(cli.finish) == 0
            await until(lambda: ftp_cache.count_expectations() == 0, "the EXP_DESTROY event")
            assert late_cache.count_expectations() == 0
        finally:
            for table in (ftp, sip, late, udp_only):
                if table is not None:
                    table.close()

    with in_netns(topo.fw.name):
        asyncio.run(scenario())


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
