"""ctsync's netlink layer against the real kernel conntrack table, in fresh namespaces.

Covers what the issue asks of the foundation: create/dump/update/delete/flush for IPv4 and
IPv6, NATed entries from real SNAT/DNAT traffic (and committing them elsewhere with NAT
intact), zones, marks, labels, expectations from a real FTP helper flow, events for real
traffic, recovery from an event overrun (ENOBUFS) to an exact copy of the kernel table, and
agreement with pyroute2's decoder on the same dump.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pyroute2
import pytest

from ctsync.core import record
from ctsync.core.cache import Cache
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    SctpInfo,
    Status,
    TcpInfo,
    TcpState,
    make_tuple,
)
from ctsync.io import netlink
from ctsync.io.commit_pool import MIN_SPLIT, CommitPool
from ctsync.io.netlink import Committer, KernelTable
from tests.linux.netns import (
    CLIENT_V4,
    CLIENT_V6,
    CT_ENABLE_RULESET,
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
    Namespace,
    NamespaceFactory,
    Topology,
    in_netns,
    traffic_cmd,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

PLAIN_PORT = 5000
LABELS_IN_USE_RULESET = """\
table inet labels_in_use {
    chain prerouting {
        type filter hook prerouting priority filter; policy accept;
        ct label 127 counter
    }
}
"""


def synthetic(i: int, family: int = AF_INET, proto: int = IPPROTO_TCP, mark: int = 0) -> Entry:
    """A committed-style entry with documentation addresses, distinct per ``i``."""
    if family == AF_INET:
        src, dst = f"192.0.2.{1 + i % 250}", f"203.0.113.{1 + (i // 250) % 250}"
    else:
        src, dst = f"2001:db8:1::{i % 65536:x}", f"2001:db8:2::{(i // 65536) + 1:x}"
    sport = 1024 + (i // 62500) % 60000
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        orig = make_tuple(src, dst, proto, icmp_id=i % 65536, icmp_type=8 if proto == 1 else 128)
        return Entry(orig, status=int(Status.CONFIRMED), timeout=30, mark=mark)
    orig = make_tuple(src, dst, proto, sport, 80 + i // 3_906_250)
    info = TcpInfo(TcpState.ESTABLISHED, 7, 7, 0x23, 0, 0x23, 0) if proto == IPPROTO_TCP else None
    if proto == IPPROTO_SCTP:
        info = SctpInfo(4, 0x11, 0x22)  # ESTABLISHED
    status = int(Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED)
    return Entry(orig, status=status, timeout=3600, mark=mark, protoinfo=info)


def by_orig(entries: list[Entry]) -> dict[tuple[CtTuple, int | None], Entry]:
    return {(e.orig, e.zone): e for e in entries}


def kernel_records() -> dict[bytes, bytes]:
    """The current namespace's table as cache records, via a fresh dump."""
    out: dict[bytes, bytes] = {}
    with netlink.open_socket() as sock:
        for buf, _t, start, end in netlink.iter_dump(sock):
            parts = record.parse_ct(buf, start, end)
            out[parts[0]] = record.value_from_parts(parts)
    return out


def comparable(value: bytes) -> tuple[int, int, int, bytes]:
    """A record value without its timeout (which counts down between two reads)."""
    flags, status, _timeout, mark, ct_id = record.value_fields(value)
    return flags, status, mark, ct_id.to_bytes(4, "big") + value[record.FIXED_SIZE :]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture
def empty_ns(netns_factory: NamespaceFactory) -> Iterator[Namespace]:
    """A namespace with conntrack hooks active and nothing in its table."""
    ns = netns_factory.create("bk")
    ns.nft(CT_ENABLE_RULESET)
    ns.sysctl("net.netfilter.nf_conntrack_events", 1)
    yield ns


# --- create / dump / update / delete / flush -----------------------------------------------


def test_create_dump_update_delete_flush_both_families(ct_netns: Namespace) -> None:
    entries = [
        synthetic(1, mark=5),
        synthetic(2, proto=IPPROTO_UDP),
        synthetic(3, proto=IPPROTO_ICMP),
        synthetic(4, proto=IPPROTO_SCTP),
        synthetic(5, proto=IPPROTO_GRE),
        synthetic(6, AF_INET6, mark=0xFFFFFFFF),
        synthetic(7, AF_INET6, IPPROTO_UDP),
        synthetic(8, AF_INET6, IPPROTO_ICMPV6),
    ]
    with in_netns(ct_netns.name), Committer() as com:
        result = com.commit_entries(entries)
        assert (result.committed, result.failed) == (len(entries), 0), result.errors

        dumped = by_orig(netlink.dump_table())
        assert set(dumped) == set(by_orig(entries))
        for entry in entries:
            got = dumped[entry.orig, None]
            assert got.reply == entry.orig.inverted()
            assert got.mark == entry.mark
            assert got.status is not None and got.status & Status.CONFIRMED
            assert got.timeout is not None and 0 < got.timeout <= (entry.timeout or 0)
            if isinstance(entry.protoinfo, TcpInfo):
                assert isinstance(got.protoinfo, TcpInfo)
                assert got.protoinfo.state == TcpState.ESTABLISHED
                assert (got.protoinfo.wscale_orig, got.protoinfo.wscale_reply) == (7, 7)
            if isinstance(entry.protoinfo, SctpInfo):
                assert isinstance(got.protoinfo, SctpInfo) and got.protoinfo.state == 4
        assert {e.family for e in netlink.dump_table(AF_INET6)} == {AF_INET6}
        assert len(netlink.dump_table(AF_INET)) == 5

        # The CLI sees the same table.
        cli = ct_netns.ct_list("-f", "ipv4") + ct_netns.ct_list("-f", "ipv6")
        assert len(cli) == len(entries)

        # Create-or-update: committing again with another mark updates in place.
        again = com.commit_entries([replace(entries[0], mark=99)])
        assert again.failed == 0
        assert by_orig(netlink.dump_table())[entries[0].orig, None].mark == 99
        assert netlink.count_entries() == len(entries)

        assert com.delete(entries[0].orig)
        assert not com.delete(entries[0].orig)  # already gone
        assert (entries[0].orig, None) not in by_orig(netlink.dump_table())

        com.flush(AF_INET)  # IPv4 only: the IPv6 entries stay
        assert {e.family for e in netlink.dump_table()} == {AF_INET6}
        com.flush()
        assert netlink.dump_table() == []


def test_commit_reports_each_failure(ct_netns: Namespace) -> None:
    good = synthetic(1)
    bad_family = Entry(make_tuple("192.0.2.9", "203.0.113.9", IPPROTO_TCP, 1, 2), timeout=10,
                       status=8, protoinfo=TcpInfo(99))  # fmt: skip
    with in_netns(ct_netns.name), Committer() as com:
        result = com.commit_entries([good, bad_family])
    assert result.attempted == 2
    assert (result.committed, result.failed) == (1, 1)
    assert sum(result.errors.values()) == 1


def test_delete_by_filter_and_flush_by_mark(ct_netns: Namespace) -> None:
    entries = [synthetic(i, mark=i % 3) for i in range(30)]
    entries += [synthetic(100 + i, AF_INET6, IPPROTO_UDP, mark=1) for i in range(10)]
    with in_netns(ct_netns.name), Committer() as com:
        assert com.commit_entries(entries).failed == 0
        removed = com.delete_matching(lambda e: e.mark == 1 and e.proto == IPPROTO_TCP)
        assert removed == 10
        left = netlink.dump_table()
        assert len(left) == 30
        assert not [e for e in left if e.mark == 1 and e.proto == IPPROTO_TCP]
        v6 = com.delete_matching(lambda e: e.orig.src.startswith(bytes.fromhex("20010db8")))
        assert v6 == 10
        com.flush(mark=2)  # filtered in the kernel
        assert sorted({e.mark for e in netlink.dump_table()}) == [0]


# --- NAT from real traffic -----------------------------------------------------------------


def test_nat_entries_from_real_traffic_commit_elsewhere_intact(
    router_topology: Topology, empty_ns: Namespace
) -> None:
    topo = router_topology
    topo.server.start(traffic_cmd("tcp-echo-server", f"--port={DNAT_TARGET_PORT}",
                                  f"--port={PLAIN_PORT}"))  # fmt: skip
    clients = [
        topo.client.popen(traffic_cmd("tcp-client", "--host", DNAT_VIP_V4,
                                      f"--port={DNAT_PORT}", "--count=2", "--wait-stdin")),
        topo.client.popen(traffic_cmd("tcp-client", "--host", SERVER_V4,
                                      f"--port={PLAIN_PORT}", "--count=2", "--wait-stdin")),
        topo.client.popen(traffic_cmd("tcp-client", "--host", SERVER_V6,
                                      f"--port={PLAIN_PORT}", "--count=2", "--wait-stdin")),
    ]  # fmt: skip
    for client in clients:
        client.wait_line("CONNECTED")

    with in_netns(topo.fw.name):
        table = [e for e in netlink.dump_table() if e.proto == IPPROTO_TCP]
        records = kernel_records()
    assert len(table) == 6

    # Decoded reply tuples agree with conntrack(8).
    cli = {(c.orig["src"], int(c.orig["sport"])): c for c in
           topo.fw.ct_list("-p", "tcp") + topo.fw.ct_list("-p", "tcp", "-f", "ipv6")}  # fmt: skip
    for entry in table:
        assert entry.reply is not None
        c = cli[entry.orig.src_text, entry.orig.sport]
        assert (entry.reply.src_text, str(entry.reply.sport)) == (c.reply["src"], c.reply["sport"])
        assert (entry.reply.dst_text, str(entry.reply.dport)) == (c.reply["dst"], c.reply["dport"])
        assert entry.status is not None and entry.status & Status.SRC_NAT
        if entry.orig.dport == DNAT_PORT:
            assert entry.status & Status.DST_NAT
            assert (entry.reply.src_text, entry.reply.sport) == (SERVER_V4, DNAT_TARGET_PORT)
        assert entry.reply.dst_text in (FW_SERVER_V4, FW_SERVER_V6)  # masqueraded

    # Committed into another, empty table, the NAT bindings are rebuilt exactly.
    with in_netns(empty_ns.name), Committer() as com:
        result = com.commit_records(records.items())
        assert result.failed == 0, result.errors
        restored = by_orig(netlink.dump_table())
    for entry in table:
        got = restored[entry.orig, None]
        assert got.reply == entry.reply
        assert got.status is not None and entry.status is not None
        assert got.status & (Status.SRC_NAT | Status.DST_NAT) == entry.status & (
            Status.SRC_NAT | Status.DST_NAT
        )
        assert isinstance(got.protoinfo, TcpInfo) and got.protoinfo.state == TcpState.ESTABLISHED
    for client in clients:
        client.send_line("done")
        assert client.finish() == 0, client.output()


def test_zone_mark_and_labels_from_real_traffic(
    router_topology: Topology, empty_ns: Namespace
) -> None:
    topo = router_topology
    ports = [MARK_PORT, LABEL_PORT, ZONE_PORT]
    topo.server.start(traffic_cmd("tcp-echo-server", *[f"--port={p}" for p in ports]))
    for port in ports:
        topo.client.run(traffic_cmd("tcp-client", "--host", SERVER_V4, f"--port={port}"))
    with in_netns(topo.fw.name):
        table = {e.orig.dport: e for e in netlink.dump_table() if e.proto == IPPROTO_TCP}
        records = kernel_records()
    assert table[MARK_PORT].mark == MARK_VALUE
    assert table[LABEL_PORT].label_bits() == [LABEL_BIT]
    assert table[ZONE_PORT].zone == ZONE_ID
    assert table[MARK_PORT].zone is None

    # The compact records keep them, and a commit restores them.
    for entry in table.values():
        key, value = record.from_entry(entry)
        assert records[key][1:5] == value[1:5]  # same status
    # The kernel only stores labels in a namespace whose ruleset uses them, as a backup
    # firewall's does (it loads the master's ruleset).
    empty_ns.nft(LABELS_IN_USE_RULESET)
    with in_netns(empty_ns.name), Committer() as com:
        assert com.commit_records(records.items()).failed == 0
        restored = {e.orig.dport: e for e in netlink.dump_table() if e.proto == IPPROTO_TCP}
    assert restored[MARK_PORT].mark == MARK_VALUE
    assert restored[LABEL_PORT].label_bits() == [LABEL_BIT]
    assert restored[ZONE_PORT].zone == ZONE_ID


# --- expectations --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_expectations_from_a_real_ftp_flow(router_topology: Topology, family: str) -> None:
    topo = router_topology
    server = SERVER_V4 if family == "ipv4" else SERVER_V6
    client_addr = CLIENT_V4 if family == "ipv4" else CLIENT_V6
    topo.server.start(traffic_cmd("ftp-server"))
    cli = topo.client.popen(
        traffic_cmd("ftp-client", "--host", server, "--mode", "pasv", "--wait-stdin")
    )
    pending_port = int(cli.wait_line("PENDING").split()[3])

    with in_netns(topo.fw.name):
        (exp,) = netlink.dump_expectations()
        control = [e for e in netlink.dump_table() if e.orig.dport == FTP_HELPER_PORT]
    assert exp.helper == "ftp"
    assert exp.master.src_text == client_addr and exp.master.dport == FTP_HELPER_PORT
    assert (exp.tuple.src_text, exp.tuple.dst_text) == (client_addr, server)
    assert exp.tuple.dport == pending_port
    assert exp.timeout is not None and 0 < exp.timeout <= 300
    (cli_exp,) = topo.fw.ct_expect_list()
    assert cli_exp.tuple["dport"] == str(pending_port)
    assert [e.helper for e in control] == ["ftp"]

    # Remove it, then re-create it from our own decode: the transfer then still works,
    # which proves the expectation encoder writes what the kernel needs.
    with in_netns(topo.fw.name), Committer() as com:
        com.flush_expectations()
        assert netlink.dump_expectations() == []
        com.create_expectation(replace(exp, id=None, timeout=120, flags=None, klass=None,
                                       nat=None, function=None))  # fmt: skip
        (again,) = netlink.dump_expectations()
    assert (again.master, again.tuple) == (exp.master, exp.tuple)
    cli.send_line("go")
    cli.wait_line("DONE")
    assert cli.finish() == 0, cli.output()


# --- events --------------------------------------------------------------------------------


def test_events_follow_real_traffic(router_topology: Topology) -> None:
    topo = router_topology
    topo.server.start(traffic_cmd("tcp-echo-server", f"--port={PLAIN_PORT}"))
    cache = Cache("internal")

    async def scenario() -> None:
        table = KernelTable(cache, rcvbuf=8 << 20)
        try:
            await table.start()
            assert len(cache) == 0
            client = topo.client.popen(traffic_cmd(
                "tcp-client", "--host", SERVER_V4, f"--port={PLAIN_PORT}", "--count=3",
                "--wait-stdin"))  # fmt: skip
            await asyncio.to_thread(client.wait_line, "CONNECTED")
            await until(lambda: established(cache) == 3, "3 ESTABLISHED entries from events")
            assert table.stats.events_received >= 3
            assert set(cache.keys()) == set(kernel_records())

            client.send_line("done")
            await asyncio.to_thread(client.finish)
            await until(lambda: established(cache) == 0, "the closes to arrive as events")
            topo.fw.conntrack("-F")
            await until(lambda: len(cache) == 0, "DESTROY events of the flush")
            assert table.stats.netlink_overrun == 0
            assert cache.counters.destroyed >= 3
        finally:
            table.close()

    with in_netns(topo.fw.name):
        asyncio.run(scenario())


def established(cache: Cache) -> int:
    return sum(1 for _, v in cache.items() if record.tcp_state(v) == TcpState.ESTABLISHED)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_event_overrun_is_detected_and_reconciled_exactly(empty_ns: Namespace) -> None:
    """A tiny buffer and a burst: ENOBUFS is counted, the buffer grows, and mark-and-sweep
    leaves the cache equal to the kernel table, destroyed entries included."""
    cache = Cache("internal")

    async def scenario() -> None:
        # 4 KiB asked (the kernel doubles it), allowed to grow to 64 KiB only.
        table = KernelTable(cache, rcvbuf=4096, rcvbuf_max=64 << 10)
        try:
            await table.start()
            first = [synthetic(i) for i in range(20_000)]
            with Committer() as com:
                # The loop does not run while we write: events pile up and overflow.
                assert com.commit_entries(first).failed == 0
                deleted, _ = com.delete_many((e.orig, None) for e in first[:5_000])
                assert deleted == 5_000
                changed = [replace(e, mark=7) for e in first[5_000:8_000]]
                assert com.commit_entries(changed).failed == 0
            await until(lambda: table.stats.netlink_overrun > 0, "an overrun")
            await until(lambda: table.stats.resync_with_kernel_table >= 2, "a reconcile")
            await until(lambda: not cache.reconciling and len(cache) == 15_000, "15k entries")
            kernel = kernel_records()
            assert set(cache.keys()) == set(kernel)
            for key, value in cache.items():
                assert comparable(value) == comparable(kernel[key])
            assert sum(1 for _, v in cache.items() if record.value_fields(v)[3] == 7) == 3_000
            assert table.stats.buffer_size > 4096  # it grew (from the 4 KiB asked)
        finally:
            table.close()

    with in_netns(empty_ns.name):
        asyncio.run(scenario())


def test_events_paused_during_our_own_commit_then_reconciled(empty_ns: Namespace) -> None:
    cache = Cache("internal")

    async def scenario() -> None:
        table = KernelTable(cache, rcvbuf=8 << 20)
        try:
            await table.start()
            with Committer() as com, table.events_paused():
                assert com.commit_entries([synthetic(i) for i in range(2_000)]).failed == 0
            await until(lambda: len(cache) == 2_000 and not cache.reconciling, "reconcile")
            assert table.stats.events_received < 2_000  # the commit made no events for us
            assert set(cache.keys()) == set(kernel_records())
            # Events flow again afterwards.
            with Committer() as com:
                com.flush()
            await until(lambda: len(cache) == 0, "DESTROY events after resuming")
        finally:
            table.close()

    with in_netns(empty_ns.name):
        asyncio.run(scenario())


# --- cross-check with pyroute2 --------------------------------------------------------------


def test_decoder_agrees_with_pyroute2(router_topology: Topology) -> None:
    topo = router_topology
    ports = [PLAIN_PORT, MARK_PORT, LABEL_PORT, ZONE_PORT, DNAT_TARGET_PORT]
    topo.server.start(traffic_cmd("tcp-echo-server", *[f"--port={p}" for p in ports]))
    for port in (PLAIN_PORT, MARK_PORT, LABEL_PORT, ZONE_PORT):
        topo.client.run(traffic_cmd("tcp-client", "--host", SERVER_V4, f"--port={port}"))
    topo.client.run(traffic_cmd("tcp-client", "--host", DNAT_VIP_V4, f"--port={DNAT_PORT}"))
    topo.client.run(traffic_cmd("tcp-client", "--host", SERVER_V6, f"--port={PLAIN_PORT}"))
    topo.client.run(["ping", "-c", "1", "-W", "2", SERVER_V4])

    with in_netns(topo.fw.name):
        ours = {e.id: e for e in netlink.dump_table()}
        theirs = list(pyroute2.NFCTSocket(nfgen_family=0).dump())
    assert len(ours) == len(theirs) >= 7
    for msg in theirs:
        entry = ours[msg.get_attr("CTA_ID")]
        for name, tup in (("CTA_TUPLE_ORIG", entry.orig), ("CTA_TUPLE_REPLY", entry.reply)):
            assert tup is not None
            nest = msg.get_attr(name)
            ip, proto = nest.get_attr("CTA_TUPLE_IP"), nest.get_attr("CTA_TUPLE_PROTO")
            v = "V4" if tup.family == AF_INET else "V6"
            assert ip.get_attr(f"CTA_IP_{v}_SRC") == tup.src_text
            assert ip.get_attr(f"CTA_IP_{v}_DST") == tup.dst_text
            assert proto.get_attr("CTA_PROTO_NUM") == tup.proto
            if tup.proto == IPPROTO_TCP:
                assert proto.get_attr("CTA_PROTO_SRC_PORT") == tup.sport
                assert proto.get_attr("CTA_PROTO_DST_PORT") == tup.dport
            if tup.proto == IPPROTO_ICMP:
                assert proto.get_attr("CTA_PROTO_ICMP_ID") == tup.icmp_id
                assert proto.get_attr("CTA_PROTO_ICMP_TYPE") == tup.icmp_type
        assert msg.get_attr("CTA_STATUS") == entry.status
        assert (msg.get_attr("CTA_MARK") or 0) == (entry.mark or 0)
        assert msg.get_attr("CTA_ZONE") == entry.zone
        # Two dumps a moment apart: the kernel may have counted the timeout down by one.
        assert entry.timeout is not None
        assert 0 <= entry.timeout - msg.get_attr("CTA_TIMEOUT") <= 1
        labels = msg.get_attr("CTA_LABELS")
        assert (labels or 0) == int.from_bytes(entry.labels or b"", "little")
        info = msg.get_attr("CTA_PROTOINFO")
        if info is not None:
            tcp = info.get_attr("CTA_PROTOINFO_TCP")
            assert isinstance(entry.protoinfo, TcpInfo)
            assert tcp.get_attr("CTA_PROTOINFO_TCP_STATE") == entry.protoinfo.state
            assert tcp.get_attr("CTA_PROTOINFO_TCP_WSCALE_ORIGINAL") == entry.protoinfo.wscale_orig
            flags = tcp.get_attr("CTA_PROTOINFO_TCP_FLAGS_ORIGINAL")
            assert tuple(flags) == (entry.protoinfo.flags_orig, entry.protoinfo.mask_orig)


def test_sockets_stay_in_their_namespace(ct_netns: Namespace, empty_ns: Namespace) -> None:
    """The CLI reads the table of the namespace it runs in, and only that one."""
    with in_netns(ct_netns.name), Committer() as com:
        com.commit_entries([synthetic(1)])
    ctsync = [sys.executable, "-m", "ctsync", "show", "conntrack", "table", "ipv4"]
    out = empty_ns.run([*ctsync, "--count"], check=False)
    assert out.returncode == 0 and out.stdout.strip() == "0", out
    out = ct_netns.run(ctsync)
    assert "192.0.2.2:1024" in out.stdout and "203.0.113.1:80" in out.stdout


# --- two-process commit ------------------------------------------------------------------


def test_commit_pool_pipelines_batches_through_its_worker(empty_ns: Namespace) -> None:
    """Many batches built here and sent by the worker: every record in, counted once;
    with the worker gone mid-way, everything is committed here (again: an update)."""
    entries = [synthetic(i, mark=i % 7) for i in range(8 * MIN_SPLIT + 123)]
    records = [record.from_entry(e) for e in entries]
    with in_netns(empty_ns.name), CommitPool() as pool:
        result = pool.commit_records(records)
        assert (result.attempted, result.committed, result.failed) == (
            len(records),
            len(records),
            0,
        )
        assert set(kernel_records()) == {k for k, _ in records}
        pool.local.flush()
        assert pool.worker_pid is not None
        # Stop the worker, let our batches fill the pipe, then kill it.
        os.kill(pool.worker_pid, signal.SIGSTOP)
        threading.Timer(0.05, os.kill, (pool.worker_pid, signal.SIGKILL)).start()
        again = pool.commit_records(records)
        assert (again.committed, again.failed) == (len(records), 0)
        assert pool.worker_pid is None
        assert netlink.count_entries() == len(records)


def test_commit_pool_splits_across_a_worker_and_survives_its_death(empty_ns: Namespace) -> None:
    entries = [synthetic(i, mark=i % 5) for i in range(3 * MIN_SPLIT)]
    records = [record.from_entry(e) for e in entries]
    with in_netns(empty_ns.name), CommitPool() as pool:
        assert pool.worker_pid is not None
        result = pool.commit_records(records)
        assert (result.attempted, result.committed, result.failed) == (
            len(entries),
            len(entries),
            0,
        )
        assert set(kernel_records()) == {k for k, _ in records}
        assert sorted(e.mark for e in netlink.dump_table()) == sorted(e.mark or 0 for e in entries)
        pool.local.flush()
        os.kill(pool.worker_pid, signal.SIGKILL)
        again = pool.commit_records(records)  # falls back to one process
        assert (again.committed, again.failed) == (len(entries), 0)
        assert pool.worker_pid is None
        assert netlink.count_entries() == len(entries)


NAT_ADDR = bytes([198, 51, 100, 1])


def test_commit_pool_maps_the_workers_refusals_back_to_records(empty_ns: Namespace) -> None:
    """The worker reports refusals by seq; this side maps them to records: NAT creates
    of entries that exist go in again as updates, anything else counts as failed."""
    plain = [record.from_entry(synthetic(i)) for i in range(MIN_SPLIT)]
    natted = []
    for i in range(MIN_SPLIT):
        e = synthetic(MIN_SPLIT + i)
        reply = replace(e.orig.inverted(), dst=NAT_ADDR, dport=20000 + i % 40000)
        natted.append(record.from_entry(replace(e, reply=reply, status=e.status | Status.SRC_NAT)))
    unknown_helper = record.from_entry(replace(synthetic(3 * MIN_SPLIT), helper="ctsync-none"))
    records = [*plain, *natted, unknown_helper]
    with in_netns(empty_ns.name), CommitPool() as pool:
        assert pool.worker_pid is not None, "this test needs the forked worker (2 CPUs)"
        first = pool.commit_records(records)
        assert (first.attempted, first.committed, first.failed) == (
            len(records),
            len(records) - 1,
            1,
        )
        assert first.retried_as_update == 0
        again = pool.commit_records(records)
        assert pool.worker_pid is not None  # refusals are answers, not a dead worker
        assert (again.committed, again.failed, again.retried_as_update) == (
            len(records) - 1,
            1,
            MIN_SPLIT,
        )
        assert sum(again.errors.values()) == 1
        dumped = {e.orig: e for e in netlink.dump_table()}
    for key, value in natted:  # the NAT binding from the first commit is in place
        reply = dumped[record.to_entry(key, value).orig].reply
        assert reply is not None and reply.dst == NAT_ADDR
