"""Committing expectation records: after every conntrack record, counted apart.

The Committer talks to a fake netlink socket that behaves like the kernel where it matters
here: an expectation is refused (ENOENT) unless its master is already in the table.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from dataclasses import replace

from ctsync.core import ctnetlink as nl
from ctsync.core import expect, record
from ctsync.core.entry import Entry, Status, TcpInfo
from ctsync.io.netlink import Committer
from tests.core.test_expect import v4_ftp, v6_sip

_HDR = struct.Struct("=IHHII")


class FakeKernel:
    """Enough of a NETLINK_NETFILTER socket for Committer: CT_NEW and EXP_NEW/DELETE."""

    def __init__(self) -> None:
        self.table: set[bytes] = set()
        self.expectations: set[bytes] = set()
        self.sent: list[int] = []  # message types, in order
        self._replies: deque[bytes] = deque()

    def getsockname(self) -> tuple[int, int]:
        return (4242, 0)

    def close(self) -> None:
        pass

    def send(self, message: bytes) -> int:
        self.sendmsg([message])
        return len(message)

    def sendmsg(self, parts: list[bytes]) -> int:
        for message in parts:
            length, mtype, flags, seq, _pid = _HDR.unpack_from(message)
            self.sent.append(mtype)
            err = self._apply(mtype, message[nl.PAYLOAD_OFFSET : length])
            if err or flags & nl.NLM_F_ACK:
                body = struct.pack("=i", -err) + message[:16]
                self._replies.append(_HDR.pack(16 + len(body), nl.NLMSG_ERROR, 0, seq, 0) + body)
        return sum(len(p) for p in parts)

    def _apply(self, mtype: int, attrs: bytes) -> int:
        if mtype == nl.CT_NEW:
            entry = nl.decode_entry(attrs, 0, len(attrs))
            self.table.add(record.key_from_tuple(entry.orig, entry.zone))
            return 0
        if mtype == nl.EXP_NEW:
            exp = nl.decode_expectation(attrs, 0, len(attrs))
            if expect.master_key(exp) not in self.table:
                return errno.ENOENT
            self.expectations.add(expect.make_key(exp))
            return 0
        if mtype == nl.EXP_DELETE:
            exp_tuple = None
            for atype, s, e in expect._walk(attrs, 0, len(attrs)):
                if atype == nl.CTA_EXPECT_TUPLE:
                    exp_tuple = nl.decode_tuple(attrs, s, e)
            assert exp_tuple is not None, "an EXP_DELETE without a tuple flushes everything"
            for candidate in list(self.expectations):
                if expect.decode_key(candidate)[0] == exp_tuple:
                    self.expectations.discard(candidate)
                    return 0
            return errno.ENOENT
        return errno.EOPNOTSUPP

    def recv_into(self, buf: bytearray) -> int:
        data = self._replies.popleft()
        buf[: len(data)] = data
        return len(data)


def masters_and_expectations() -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    status = int(Status.CONFIRMED | Status.ASSURED | Status.SEEN_REPLY)
    exps = [v4_ftp(), v6_sip()]
    masters = [
        record.from_entry(
            Entry(
                e.master,
                status=status,
                timeout=300,
                zone=e.zone,
                helper=e.helper,
                protoinfo=TcpInfo(3) if e.master.proto == 6 else None,
            )
        )
        for e in exps
    ]
    fillers = [
        record.from_entry(Entry(replace(exps[0].master, sport=1000 + i), status=status, timeout=9))
        for i in range(600)
    ]
    return masters + fillers, [expect.from_expectation(e) for e in exps]


def test_expectations_go_in_after_every_master_whatever_the_order() -> None:
    conntrack, expectations = masters_and_expectations()
    # Expectations first, masters last, across several batches: the worst order.
    records = expectations + list(reversed(conntrack))
    kernel = FakeKernel()
    with Committer(sock=kernel, batch=64) as committer:  # type: ignore[arg-type]
        result = committer.commit_records(records, timeout=None)
    assert result.failed == 0, result.errors
    assert result.attempted == result.committed == len(records)
    assert (result.expect_attempted, result.expect_committed, result.expect_failed) == (2, 2, 0)
    assert len(kernel.expectations) == 2
    first_exp = kernel.sent.index(nl.EXP_NEW)
    assert nl.CT_NEW not in kernel.sent[first_exp:]
    assert result.deferred == []


def test_failed_expectations_are_counted_apart_and_in_the_totals() -> None:
    conntrack, expectations = masters_and_expectations()
    kernel = FakeKernel()
    with Committer(sock=kernel) as committer:  # type: ignore[arg-type]
        # The v6 master is missing: its expectation is refused, as the kernel does.
        result = committer.commit_records([conntrack[0], *expectations, *conntrack[2:]])
    assert (result.expect_attempted, result.expect_committed, result.expect_failed) == (2, 1, 1)
    assert result.failed == 1 and result.errors == {"ENOENT": 1}
    assert result.committed == result.attempted - 1 == len(conntrack) - 1 + 1


def test_expectations_can_be_deferred_for_the_pool() -> None:
    conntrack, expectations = masters_and_expectations()
    kernel = FakeKernel()
    with Committer(sock=kernel) as committer:  # type: ignore[arg-type]
        result = committer.commit_records(expectations + conntrack, expectations=False)
        assert result.deferred == expectations
        assert nl.EXP_NEW not in kernel.sent and result.expect_attempted == 0
        assert result.attempted == result.committed == len(conntrack)
        later = committer.commit_expectations(result.deferred)
    assert later.attempted == later.committed == 2 and len(kernel.expectations) == 2


def test_malformed_expectation_records_count_as_invalid() -> None:
    conntrack, expectations = masters_and_expectations()
    key, _ = expectations[0]
    with Committer(sock=FakeKernel()) as committer:  # type: ignore[arg-type]
        result = committer.commit_records([*conntrack, (key, b"\x01\0\0\0\x05")])
    assert result.expect_failed == 1 and result.errors == {"EINVAL": 1}


def test_delete_expectations() -> None:
    conntrack, expectations = masters_and_expectations()
    kernel = FakeKernel()
    with Committer(sock=kernel) as committer:  # type: ignore[arg-type]
        committer.commit_records(conntrack + expectations)
        assert committer.delete_expectations([expectations[0][0]]) == (1, 0)
        assert committer.delete_expectations([expectations[0][0], b"\x40"]) == (0, 2)
    assert len(kernel.expectations) == 1
