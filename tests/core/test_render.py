"""Golden-text tests of the pure CLI renderers (ctsync.cli.render).

Regenerate the golden files after an intended layout change with
``CTSYNC_UPDATE_GOLDEN=1 pytest tests/core/test_render.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ctsync.cli.render import (
    CONNTRACK_TABLE_HEADERS,
    NO_ENTRIES,
    conntrack_row,
    format_endpoint,
    render_conntrack_json,
    render_conntrack_table,
)
from ctsync.core.entry import (
    IPPROTO_GRE,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    SctpInfo,
    SctpState,
    Status,
    TcpInfo,
    TcpState,
    make_tuple,
)

GOLDEN = Path(__file__).parent / "golden"

LIVE = Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED


def _pair(
    src: str, dst: str, proto: int, sport: int = 0, dport: int = 0
) -> tuple[CtTuple, CtTuple]:
    orig = make_tuple(src, dst, proto, sport, dport)
    return orig, orig.inverted()


def _nat_reply(src: str, dst: str, proto: int, sport: int, dport: int) -> CtTuple:
    return make_tuple(src, dst, proto, sport, dport)


def _tcp(state: TcpState) -> TcpInfo:
    return TcpInfo(state=int(state), wscale_orig=7, wscale_reply=7, flags_orig=0x23)


# --- IPv4 sample table: every column variant the layout has to handle -------------------

_o, _r = _pair("192.0.2.10", "198.51.100.80", IPPROTO_TCP, 54321, 443)
TCP_PLAIN = Entry(
    orig=_o,
    reply=_r,
    status=int(LIVE),
    timeout=431999,
    mark=0,
    id=3546358000,
    protoinfo=_tcp(TcpState.ESTABLISHED),
)

# SNAT to a VIP: the reply goes back to the translated address.
TCP_SNAT = Entry(
    orig=make_tuple("192.0.2.11", "198.51.100.80", IPPROTO_TCP, 40000, 80),
    reply=_nat_reply("198.51.100.80", "203.0.113.5", IPPROTO_TCP, 80, 61000),
    status=int(LIVE | Status.SRC_NAT | Status.SRC_NAT_DONE),
    timeout=117,
    mark=16,
    id=17,
    protoinfo=_tcp(TcpState.TIME_WAIT),
)

# DNAT (port forward) in conntrack zone 5.
TCP_DNAT = Entry(
    orig=make_tuple("198.51.100.7", "203.0.113.5", IPPROTO_TCP, 51000, 8080),
    reply=_nat_reply("192.0.2.20", "198.51.100.7", IPPROTO_TCP, 80, 51000),
    status=int(LIVE | Status.DST_NAT | Status.DST_NAT_DONE),
    timeout=300,
    mark=0,
    zone=5,
    id=18,
    protoinfo=_tcp(TcpState.ESTABLISHED),
)

_o, _r = _pair("192.0.2.53", "198.51.100.53", IPPROTO_UDP, 5353, 53)
UDP_NO_MARK = Entry(
    orig=_o, reply=_r, status=int(Status.CONFIRMED), timeout=30, id=19
)  # no mark attribute -> empty cell, no protoinfo -> empty state

ICMP_ECHO = Entry(
    orig=make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_ICMP, icmp_id=1234, icmp_type=8),
    reply=make_tuple("198.51.100.1", "192.0.2.1", IPPROTO_ICMP, icmp_id=1234, icmp_type=0),
    status=int(Status.CONFIRMED | Status.SEEN_REPLY),
    timeout=29,
    mark=0,
    id=20,
)

# Flowtable-offloaded: VyOS prints n/a whatever the kernel says about the timeout.
_o, _r = _pair("192.0.2.30", "203.0.113.30", IPPROTO_TCP, 33000, 22)
TCP_OFFLOADED = Entry(
    orig=_o,
    reply=_r,
    status=int(LIVE | Status.OFFLOAD),
    timeout=None,
    mark=0,
    id=21,
    protoinfo=_tcp(TcpState.ESTABLISHED),
)
_o, _r = _pair("192.0.2.31", "203.0.113.31", IPPROTO_UDP, 4500, 4500)
UDP_OFFLOADED_WITH_TIMEOUT = Entry(
    orig=_o, reply=_r, status=int(LIVE | Status.OFFLOAD), timeout=86400, mark=7, id=22
)

# GRE keys are not ports: VyOS prints bare addresses (conntrack XML has srckey/dstkey).
_o, _r = _pair("192.0.2.40", "203.0.113.40", IPPROTO_GRE, 0x10, 0x20)
GRE = Entry(orig=_o, reply=_r, status=int(LIVE), timeout=179, mark=0, id=23)

_o, _r = _pair("192.0.2.50", "198.51.100.50", IPPROTO_SCTP, 3868, 3868)
SCTP = Entry(
    orig=_o,
    reply=_r,
    status=int(LIVE),
    timeout=210,
    mark=0xFFFFFFFF,
    zone=65535,
    id=24,
    protoinfo=SctpInfo(state=int(SctpState.ESTABLISHED)),
)

IPV4_TABLE = [
    TCP_PLAIN,
    TCP_SNAT,
    TCP_DNAT,
    UDP_NO_MARK,
    ICMP_ECHO,
    TCP_OFFLOADED,
    UDP_OFFLOADED_WITH_TIMEOUT,
    GRE,
    SCTP,
]

# --- IPv6 sample table -----------------------------------------------------------------

_o, _r = _pair("2001:db8::10", "2001:db8:1::80", IPPROTO_TCP, 34567, 443)
TCP6 = Entry(
    orig=_o,
    reply=_r,
    status=int(LIVE),
    timeout=431990,
    mark=0,
    id=4000000001,
    protoinfo=_tcp(TcpState.ESTABLISHED),
)
_o, _r = _pair("2001:db8::53", "2001:db8:1::53", IPPROTO_UDP, 40001, 53)
UDP6 = Entry(orig=_o, reply=_r, status=int(Status.CONFIRMED), timeout=28, mark=3, zone=2, id=31)
ICMP6 = Entry(
    orig=make_tuple("2001:db8::1", "2001:db8:1::1", IPPROTO_ICMPV6, icmp_id=7, icmp_type=128),
    reply=make_tuple("2001:db8:1::1", "2001:db8::1", IPPROTO_ICMPV6, icmp_id=7, icmp_type=129),
    status=int(Status.CONFIRMED | Status.SEEN_REPLY),
    timeout=30,
    mark=0,
    id=32,
)
IPV6_TABLE = [TCP6, UDP6, ICMP6]


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CTSYNC_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    assert text + "\n" == path.read_text(encoding="utf-8")


def test_ipv4_table_golden() -> None:
    _check_golden("conntrack_table_ipv4.txt", render_conntrack_table(IPV4_TABLE))


def test_ipv6_table_golden() -> None:
    _check_golden("conntrack_table_ipv6.txt", render_conntrack_table(IPV6_TABLE))


def test_empty_table() -> None:
    assert render_conntrack_table([]) == "Entries not found" == NO_ENTRIES


def test_header_line_is_vyos() -> None:
    header = render_conntrack_table([TCP_PLAIN]).splitlines()[0]
    assert [h.strip() for h in header.split("  ") if h.strip()] == list(CONNTRACK_TABLE_HEADERS)


def test_rows_keep_given_order() -> None:
    forward = render_conntrack_table([TCP_PLAIN, ICMP_ECHO]).splitlines()[2:]
    backward = render_conntrack_table([ICMP_ECHO, TCP_PLAIN]).splitlines()[2:]
    assert forward == list(reversed(backward))


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            TCP_PLAIN,
            [
                3546358000,
                "192.0.2.10:54321",
                "198.51.100.80:443",
                "198.51.100.80:443",
                "192.0.2.10:54321",
                "tcp",
                "ESTABLISHED",
                431999,
                0,
                "",
            ],
        ),
        (
            TCP_SNAT,
            [
                17,
                "192.0.2.11:40000",
                "198.51.100.80:80",
                "198.51.100.80:80",
                "203.0.113.5:61000",
                "tcp",
                "TIME_WAIT",
                117,
                16,
                "",
            ],
        ),
        (
            ICMP_ECHO,
            [20, "192.0.2.1", "198.51.100.1", "198.51.100.1", "192.0.2.1", "icmp", "", 29, 0, ""],
        ),
    ],
)
def test_rows(entry: Entry, expected: list[object]) -> None:
    assert conntrack_row(entry) == expected


def test_row_udp_without_mark_or_state() -> None:
    row = conntrack_row(UDP_NO_MARK)
    assert row == [
        19,
        "192.0.2.53:5353",
        "198.51.100.53:53",
        "198.51.100.53:53",
        "192.0.2.53:5353",
        "udp",
        "",
        30,
        "",
        "",
    ]


def test_row_offloaded_timeout_is_na() -> None:
    assert conntrack_row(TCP_OFFLOADED)[7] == "n/a"
    assert conntrack_row(UDP_OFFLOADED_WITH_TIMEOUT)[7] == "n/a"
    hw = Entry(orig=TCP_PLAIN.orig, status=int(LIVE | Status.HW_OFFLOAD), timeout=5, protoinfo=None)
    assert conntrack_row(hw)[7] == "n/a"


def test_row_ipv6_is_plain_ip_colon_port_like_vyos() -> None:
    row = conntrack_row(TCP6)
    assert row[1:5] == [
        "2001:db8::10:34567",
        "2001:db8:1::80:443",
        "2001:db8:1::80:443",
        "2001:db8::10:34567",
    ]
    assert row[5] == "tcp"
    assert conntrack_row(ICMP6)[1:6] == [
        "2001:db8::1",
        "2001:db8:1::1",
        "2001:db8:1::1",
        "2001:db8::1",
        "icmpv6",
    ]


def test_row_gre_and_unknown_protocol_have_bare_addresses() -> None:
    assert conntrack_row(GRE)[1:6] == [
        "192.0.2.40",
        "203.0.113.40",
        "203.0.113.40",
        "192.0.2.40",
        "gre",
    ]
    other = Entry(orig=make_tuple("192.0.2.60", "198.51.100.60", 99), timeout=600)
    assert conntrack_row(other) == [
        "",
        "192.0.2.60",
        "198.51.100.60",
        "",
        "",
        "99",
        "",
        600,
        "",
        "",
    ]


def test_row_missing_attributes_print_empty() -> None:
    bare = Entry(orig=make_tuple("192.0.2.2", "198.51.100.2", IPPROTO_UDP, 1000, 2000))
    assert conntrack_row(bare) == [
        "",
        "192.0.2.2:1000",
        "198.51.100.2:2000",
        "",
        "",
        "udp",
        "",
        "n/a",
        "",
        "",
    ]


def test_format_endpoint() -> None:
    assert format_endpoint("192.0.2.1", 80) == "192.0.2.1:80"
    assert format_endpoint("192.0.2.1", 0) == "192.0.2.1:0"
    assert format_endpoint("2001:db8::1", 80) == "2001:db8::1:80"
    assert format_endpoint("2001:db8::1", None) == "2001:db8::1"


# --- JSON --------------------------------------------------------------------------------


def test_json_array_fields() -> None:
    data = json.loads(render_conntrack_json(IPV4_TABLE))
    assert isinstance(data, list)
    assert len(data) == len(IPV4_TABLE)

    tcp = data[0]
    assert tcp["family"] == "ipv4"
    assert tcp["protocol"] == "tcp"
    assert tcp["protocol_number"] == 6
    assert tcp["original"] == {
        "src": "192.0.2.10",
        "dst": "198.51.100.80",
        "sport": 54321,
        "dport": 443,
    }
    assert tcp["reply"] == {
        "src": "198.51.100.80",
        "dst": "192.0.2.10",
        "sport": 443,
        "dport": 54321,
    }
    assert tcp["id"] == 3546358000
    assert tcp["timeout"] == 431999
    assert tcp["mark"] == 0
    assert "zone" not in tcp
    assert tcp["tcp"]["state"] == "ESTABLISHED"
    assert tcp["tcp"]["state_number"] == 3
    assert set(tcp["status_flags"]) == {"SEEN_REPLY", "ASSURED", "CONFIRMED"}

    snat = data[1]
    assert snat["reply"]["dst"] == "203.0.113.5"
    assert "SRC_NAT" in snat["status_flags"]

    dnat = data[2]
    assert dnat["zone"] == 5

    udp = data[3]
    assert "mark" not in udp
    assert "tcp" not in udp

    icmp = data[4]
    assert icmp["original"] == {
        "src": "192.0.2.1",
        "dst": "198.51.100.1",
        "icmp_id": 1234,
        "icmp_type": 8,
        "icmp_code": 0,
    }

    offloaded = data[5]
    assert "OFFLOAD" in offloaded["status_flags"]
    assert "timeout" not in offloaded

    sctp = data[8]
    assert sctp["sctp"]["state"] == "ESTABLISHED"
    assert sctp["mark"] == 0xFFFFFFFF


def test_json_ipv6_addresses_are_plain() -> None:
    data = json.loads(render_conntrack_json(IPV6_TABLE))
    assert data[0]["family"] == "ipv6"
    assert data[0]["original"]["src"] == "2001:db8::10"
    assert data[2]["protocol"] == "icmpv6"


def test_json_empty_and_stable() -> None:
    assert render_conntrack_json([]) == "[]"
    assert render_conntrack_json(IPV4_TABLE) == render_conntrack_json(IPV4_TABLE)
    first_keys = list(json.loads(render_conntrack_json([TCP_PLAIN]))[0])
    assert first_keys[:4] == ["family", "protocol", "protocol_number", "original"]
    assert render_conntrack_json([TCP_PLAIN]).startswith('[\n  {\n    "family": "ipv4",')
