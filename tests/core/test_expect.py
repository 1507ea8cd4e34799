"""Expectation records (ctsync.core.expect), the helper filter, and their place in caches."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace

import pytest

from ctsync.core import ctnetlink as nl
from ctsync.core import expect, record
from ctsync.core.cache import Cache, Change, bucket_of
from ctsync.core.ctnetlink import CtnetlinkError
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    Expectation,
    ExpectNat,
    Status,
    TcpInfo,
)
from ctsync.core.filter import ALL_EXPECTATIONS, NO_EXPECTATIONS, HelperFilter
from tests.core import strategies as s


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def v4_ftp(**over: object) -> Expectation:
    """An active-mode FTP expectation behind SNAT, every optional field set."""
    exp = Expectation(
        master=CtTuple(AF_INET, IPPROTO_TCP, ip("192.0.2.100"), ip("198.51.100.100"), 40000, 21),
        tuple=CtTuple(AF_INET, IPPROTO_TCP, ip("198.51.100.100"), ip("198.51.100.1"), 0, 50001),
        mask=CtTuple(AF_INET, IPPROTO_TCP, ip("255.255.255.255"), ip("255.255.255.255"), 0, 0xFFFF),
        timeout=297,
        id=12345,
        helper="ftp",
        flags=expect.NF_CT_EXPECT_PERMANENT,
        klass=0,
        nat=ExpectNat(1, CtTuple(AF_INET, IPPROTO_TCP, ip("192.0.2.100"), ip("0.0.0.0"), 50001)),
        function="nat-follow-master",
    )
    return replace(exp, **over)  # type: ignore[arg-type]


def v6_sip() -> Expectation:
    return Expectation(
        master=CtTuple(AF_INET6, IPPROTO_UDP, ip("2001:db8::1"), ip("2001:db8:1::1"), 5060, 5060),
        tuple=CtTuple(AF_INET6, IPPROTO_UDP, ip("2001:db8:1::1"), ip("2001:db8::1"), 0, 40000),
        mask=CtTuple(AF_INET6, IPPROTO_UDP, bytes(16), b"\xff" * 16, 0, 0xFFFF),
        timeout=180,
        helper="sip",
        zone=7,
        flags=expect.NF_CT_EXPECT_INACTIVE,
        klass=2,
    )


def without_id(exp: Expectation) -> Expectation:
    return replace(exp, id=None)


# --- records --------------------------------------------------------------------------------


@pytest.mark.parametrize("exp", [v4_ftp(), v6_sip(), v4_ftp(nat=None, function=None, zone=3)])
def test_record_round_trip(exp: Expectation) -> None:
    key, value = expect.from_expectation(exp)
    assert expect.is_expectation_key(key)
    assert key[0] & ~record.KEY_ZONE == record.KEY_EXPECT
    assert bool(key[0] & record.KEY_ZONE) == bool(exp.zone)
    back = expect.to_expectation(key, value)
    assert back == without_id(exp)  # the id is per kernel: not synced
    assert expect.from_expectation(back) == (key, value)
    assert expect.helper_of(value) == exp.helper
    assert expect.value_fields(value) == (expect.VALUE_VERSION, exp.timeout)
    assert expect.master_key(exp) == record.key_from_tuple(exp.master, exp.zone)


def test_key_is_the_tuple_and_zone_only() -> None:
    a = expect.from_expectation(v4_ftp())
    b = expect.from_expectation(v4_ftp(timeout=5, id=99, flags=0))
    assert a[0] == b[0] and a[1] != b[1]
    assert expect.from_expectation(v4_ftp(zone=2))[0] != a[0]
    other = v4_ftp(tuple=replace(v4_ftp().tuple, dport=50002))
    assert expect.from_expectation(other)[0] != a[0]


def test_values_that_only_count_down_compare_equal() -> None:
    _, v1 = expect.from_expectation(v4_ftp(timeout=300))
    _, v2 = expect.from_expectation(v4_ftp(timeout=12))
    _, v3 = expect.from_expectation(v4_ftp(timeout=12, klass=1))
    assert v1 != v2 and expect.same_but_timeout(v1, v2)
    assert not expect.same_but_timeout(v2, v3)


def test_records_parsed_from_the_kernel_capture() -> None:
    msgs = s.kernel_exp_messages()
    assert msgs, "tests/core/data/kernel_exp_dump.bin is missing"
    for m in msgs:
        parsed = expect.parse_expectation(m.buf, m.start, m.end)
        decoded = nl.decode_expectation(m.buf, m.start, m.end)
        assert parsed.helper == decoded.helper == "ftp"
        assert expect.to_expectation(parsed.key, parsed.value) == without_id(decoded)
        assert parsed.master_key == record.key_from_tuple(decoded.master)
        # Our encoder writes the kernel's canonical layout: same record either way.
        assert expect.from_expectation(decoded) == (parsed.key, parsed.value)


def test_conntrack_keys_never_look_like_expectations() -> None:
    msgs = s.kernel_ct_messages()
    assert msgs
    for m in msgs:
        key = record.parse_ct(m.buf, m.start, m.end)[0]
        assert not expect.is_expectation_key(key)
    exp_key, exp_value = expect.from_expectation(v4_ftp())
    with pytest.raises(CtnetlinkError):
        record.decode_key(exp_key)
    with pytest.raises(CtnetlinkError):
        record.to_entry(exp_key, exp_value)
    ct_key, _ = record.from_entry(Entry(v4_ftp().master, timeout=5, status=8))
    with pytest.raises(CtnetlinkError):
        expect.decode_key(ct_key)


@pytest.mark.parametrize(
    "key, value",
    [
        (b"\x40", b"\x01\0\0\0\x05"),  # tuple missing
        (b"\xc0\x01", b"\x01\0\0\0\x05"),  # zone flag, too short
        (expect.from_expectation(v4_ftp())[0], b"\x01\0"),  # value too short
        (expect.from_expectation(v4_ftp())[0], b"\x09\0\0\0\x05"),  # unknown version
        (expect.from_expectation(v4_ftp())[0], b"\x01\0\0\0\x05\x30\0\x01"),  # bad TLV
        (expect.from_expectation(v4_ftp())[0], b"\x01\0\0\0\x05"),  # no master, no mask
    ],
)
def test_malformed_records_raise_the_codec_error(key: bytes, value: bytes) -> None:
    with pytest.raises(CtnetlinkError):
        expect.to_expectation(key, value)
    with pytest.raises(CtnetlinkError):
        expect.commit_message(key, value, 1)


# --- kernel messages --------------------------------------------------------------------------


def message_body(message: bytes) -> tuple[int, int, int, bytes]:
    """(type, flags, family, attributes) of one netlink message."""
    length, mtype, flags, _seq, _pid = struct.unpack_from("=IHHII", message)
    assert length == len(message)
    return mtype, flags, message[16], message[nl.PAYLOAD_OFFSET :]


@pytest.mark.parametrize("exp", [v4_ftp(), v6_sip()])
def test_commit_message_recreates_the_expectation(exp: Expectation) -> None:
    key, value = expect.from_expectation(exp)
    mtype, flags, family, attrs = message_body(expect.commit_message(key, value, 7))
    assert mtype == nl.EXP_NEW
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_CREATE  # create-or-update, no EXCL
    assert family == exp.master.family
    assert nl.decode_expectation(attrs, 0, len(attrs)) == without_id(exp)


def test_commit_message_always_sends_a_timeout() -> None:
    key, value = expect.from_expectation(v4_ftp(timeout=0))
    _, _, _, attrs = message_body(expect.commit_message(key, value, 7))
    assert nl.decode_expectation(attrs, 0, len(attrs)).timeout == 1


def test_delete_message_names_exactly_one_expectation() -> None:
    for exp in (v4_ftp(), v6_sip()):
        key, _ = expect.from_expectation(exp)
        mtype, _, family, attrs = message_body(expect.delete_message(key, 3))
        assert mtype == nl.EXP_DELETE and family == exp.master.family
        types = [t for t, _, _ in expect._walk(attrs, 0, len(attrs))]
        # Without CTA_EXPECT_TUPLE the kernel would flush every expectation.
        assert nl.CTA_EXPECT_TUPLE in types
        assert (nl.CTA_EXPECT_ZONE in types) == bool(exp.zone)


def test_split_records_keeps_order_within_each_kind() -> None:
    ct = [
        record.from_entry(Entry(replace(v4_ftp().master, sport=p), timeout=5, status=8))
        for p in (1, 2, 3)
    ]
    ex = [expect.from_expectation(v4_ftp()), expect.from_expectation(v6_sip())]
    mixed = [ex[0], ct[0], ct[1], ex[1], ct[2]]
    assert expect.split_records(mixed) == (ct, ex)


def test_json_is_marked_as_an_expectation() -> None:
    out = expect.expectation_to_json(v4_ftp())
    assert out["type"] == "expectation" and "original" not in out
    assert out["helper"] == "ftp" and out["class"] == 0
    assert out["tuple"]["dport"] == 50001 and out["master"]["dport"] == 21
    assert out["nat"]["direction"] == 1 and out["function"] == "nat-follow-master"


# --- the helper filter ---------------------------------------------------------------------------


def test_helper_filter_matches_names_as_case_insensitive_prefixes() -> None:
    f = HelperFilter.build(["ftp", "SIP", "q.931"])
    assert f.enabled
    assert f.accepts("ftp") and f.accepts("FTP") and f.accepts("ftp-2121")
    assert f.accepts("sip") and f.accepts("sip-5060") and f.accepts("Q.931")
    assert not f.accepts("tftp") and not f.accepts("h.245") and not f.accepts("ras")
    assert not f.accepts(None) and not f.accepts("")


def test_helper_filter_all_and_none() -> None:
    assert ALL_EXPECTATIONS.enabled and ALL_EXPECTATIONS.accepts("anything")
    assert ALL_EXPECTATIONS.accepts(None)
    assert HelperFilter.build(None) == ALL_EXPECTATIONS
    assert not NO_EXPECTATIONS.enabled and not NO_EXPECTATIONS.accepts("ftp")
    assert HelperFilter.build([]) == NO_EXPECTATIONS


# --- caches ----------------------------------------------------------------------------------


def ct_record(sport: int = 40000) -> record.Parsed:
    entry = Entry(
        replace(v4_ftp().master, sport=sport),
        status=int(Status.CONFIRMED | Status.ASSURED | Status.SEEN_REPLY),
        timeout=300,
        mark=0,
        id=1,
        protoinfo=TcpInfo(3, 7, 7, 0, 0, 0, 0),
        helper="ftp",
    )
    key, value = record.from_entry(entry)
    body = nl.encode_entry_attrs(entry)
    parts = record.parse_ct(body, 0, len(body))
    assert parts[0] == key and record.value_from_parts(parts) == value
    return parts


def test_cache_keeps_expectations_next_to_conntrack_entries() -> None:
    cache = Cache("internal", digest=True)
    assert cache.update(ct_record()) is Change.NEW
    key, value = expect.from_expectation(v4_ftp(timeout=300))
    digest_before = list(cache.digest or [])
    assert cache.update_expectation(key, value) is Change.NEW
    assert cache.digest != digest_before, "the anti-entropy digest covers expectations"
    assert (
        cache.digest is not None and cache.digest[bucket_of(key)] != digest_before[bucket_of(key)]
    )
    assert len(cache) == 2 and cache.count_expectations() == 1
    assert cache.expectation_items() == [(key, value)]
    assert [e.orig for e in cache.entries()] == [v4_ftp().master]  # conntrack entries only

    _, counted_down = expect.from_expectation(v4_ftp(timeout=200))
    assert cache.update_expectation(key, counted_down) is Change.UNCHANGED
    assert cache.get(key) == value
    _, changed = expect.from_expectation(v4_ftp(timeout=200, klass=1))
    assert cache.update_expectation(key, changed) is Change.UPDATED
    assert cache.destroy(key) is Change.DESTROYED
    assert cache.count_expectations() == 0
    assert cache.counters.created == 2 and cache.counters.updated == 1
    assert cache.counters.destroyed == 1


def test_cache_expectations_honour_exclude_limit_and_reconcile() -> None:
    key, value = expect.from_expectation(v4_ftp())
    cache = Cache("internal", limit=1)
    cache.exclude.add(key)
    assert cache.update_expectation(key, value) is Change.IGNORED
    cache.exclude.clear()
    cache.update(ct_record())
    assert cache.update_expectation(key, value) is Change.FAILED
    assert cache.counters.created_failed == 1

    cache = Cache("internal")
    other_key, other_value = expect.from_expectation(v6_sip())
    cache.update_expectation(key, value)
    cache.update_expectation(other_key, other_value)
    cache.begin_reconcile()
    cache.update_expectation(key, value)  # dumped again; the other one was not
    assert cache.end_reconcile() == [other_key]
    assert cache.expectation_items() == [(key, value)]


def test_external_caches_take_expectation_records_as_they_come() -> None:
    key, value = expect.from_expectation(v6_sip())
    external = Cache("external:1", digest=True)
    assert external.put(key, value) is Change.NEW
    assert external.bucket_items([bucket_of(key)]) == [(key, value)]
    assert list(external.entries()) == []
