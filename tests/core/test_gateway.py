"""Gateway watch, pure parts: the up/down state machine (fake clock), its flush decisions,
the ``[[gateway-watch]]`` configuration, the status lines, the metric families built from
snapshots and the ICMP echo codec. No sockets (tests/linux/test_gateway.py has those)."""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_network

import pytest
from prometheus_client.core import Metric

from ctsync.config import ConfigError, GatewayWatch, loads_config
from ctsync.core.entry import IPPROTO_TCP, IPPROTO_UDP, Entry, make_tuple
from ctsync.core.gateway import (
    FlushReport,
    GatewayMachine,
    GatewaySnapshot,
    GatewayState,
    Transition,
    WatchRules,
    describe_match,
    status_lines,
)
from ctsync.core.select import U32_MAX, EntryFilter
from ctsync.core.stats import CacheStats, NetlinkStats, Snapshot
from ctsync.io.metrics import CATALOG, CommitTotals, MetricsInput, build_families
from ctsync.io.probe import echo_request, icmp_checksum, parse_echo_reply

UP, DOWN, UNKNOWN = GatewayState.UP, GatewayState.DOWN, GatewayState.UNKNOWN


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


def machine(
    down_after: int = 3, up_after: int = 2, flush_on: Sequence[str] = ("down",)
) -> tuple[GatewayMachine, Clock]:
    clock = Clock()
    return GatewayMachine(WatchRules(down_after, up_after, frozenset(flush_on)), clock.now), clock


def feed(m: GatewayMachine, clock: Clock, outcomes: str) -> list[Transition]:
    """One probe per character, one second apart: ``.`` answered, ``x`` timeout, ``e`` error."""
    names = {".": "ok", "x": "timeout", "e": "error"}
    out = []
    for char in outcomes:
        result = names[char]
        change = m.observe(
            clock.tick(),
            result,
            rtt=0.002 if result == "ok" else None,
            error="ENETUNREACH (Network is unreachable)" if result == "error" else None,
        )
        if change is not None:
            out.append(change)
    return out


# --------------------------------------------------------------------------- state machine


def test_starts_unknown_and_takes_up_after_answers() -> None:
    m, clock = machine(up_after=2)
    assert m.state == UNKNOWN
    assert feed(m, clock, ".") == []
    assert m.state == UNKNOWN
    (change,) = feed(m, clock, ".")
    assert (change.old, change.new, change.at) == (UNKNOWN, UP, 1002.0)
    assert change.reason == "2 probes answered, rtt 2.0 ms"
    assert not change.flush  # nothing to move back at start
    assert m.since == 1002.0
    assert m.transitions == {"up": 1, "down": 0}


def test_goes_down_after_consecutive_losses_only() -> None:
    m, clock = machine(down_after=3)
    feed(m, clock, "..")
    assert feed(m, clock, "xx.xx.xx.") == []  # never three in a row
    assert m.state == UP
    (change,) = feed(m, clock, "xxx")
    assert (change.old, change.new) == (UP, DOWN)
    assert change.flush
    assert change.event == "down"
    assert change.reason == "3 probes lost in a row (timeout)"
    assert m.probes == {"ok": 5, "timeout": 9, "error": 0}
    assert (m.probes_sent, m.probes_lost) == (14, 9)


def test_errors_and_timeouts_both_count_as_lost_and_the_reason_names_the_last() -> None:
    m, clock = machine(down_after=3)
    feed(m, clock, "..")
    (change,) = feed(m, clock, "xxe")
    assert change.reason == "3 probes lost in a row (error: ENETUNREACH (Network is unreachable))"
    assert m.last_error == "ENETUNREACH (Network is unreachable)"
    assert m.probes["error"] == 1


def test_down_from_unknown_flushes_too() -> None:
    """A node that starts while its uplink is dead removes what still points there."""
    m, clock = machine(down_after=2)
    (change,) = feed(m, clock, "xx")
    assert (change.old, change.new, change.flush) == (UNKNOWN, DOWN, True)


def test_staying_down_or_up_gives_no_new_transition() -> None:
    m, clock = machine(down_after=2, up_after=2)
    assert len(feed(m, clock, "xxxxxxxx")) == 1
    assert len(feed(m, clock, "........")) == 1
    assert m.transitions == {"up": 1, "down": 1}


@pytest.mark.parametrize(
    ("flush_on", "down_flush", "up_flush"),
    [
        (("down",), True, False),
        (("down", "up"), True, True),
        (("up",), False, True),
        ((), False, False),
    ],
)
def test_flush_decisions(flush_on: tuple[str, ...], down_flush: bool, up_flush: bool) -> None:
    m, clock = machine(down_after=2, up_after=2, flush_on=flush_on)
    assert [c.flush for c in feed(m, clock, "..")] == [False]  # unknown -> up: never
    (down,) = feed(m, clock, "xx")
    (up,) = feed(m, clock, "..")
    assert (down.new, down.flush) == (DOWN, down_flush)
    assert (up.old, up.new, up.flush) == (DOWN, UP, up_flush)


def test_flapping_within_thresholds_is_ignored_and_hysteresis_holds() -> None:
    m, clock = machine(down_after=3, up_after=3, flush_on=("down", "up"))
    feed(m, clock, "...")
    # A lossy uplink: every third probe answered. Down once, then no flapping back up.
    changes = feed(m, clock, "xx.xx.xxx.x.xx.xx.")
    assert [(c.old, c.new) for c in changes] == [(UP, DOWN)]
    # Back: needs three answers in a row; two, then a loss, then three.
    changes = feed(m, clock, "..x...")
    assert [(c.old, c.new) for c in changes] == [(DOWN, UP)]
    assert m.transitions == {"up": 2, "down": 1}


def test_threshold_of_one_follows_every_probe() -> None:
    m, clock = machine(down_after=1, up_after=1, flush_on=("down", "up"))
    changes = feed(m, clock, ".x.x")
    assert [c.new for c in changes] == [UP, DOWN, UP, DOWN]
    assert [c.flush for c in changes] == [False, True, True, True]


def test_flush_bookkeeping() -> None:
    m, clock = machine()
    m.flush_started()
    assert m.flushing
    m.flush_done(FlushReport("down", 12, 1, 0.004, clock.tick()))
    m.flush_done(FlushReport("up", 3, 0, 0.001, clock.tick()))
    assert not m.flushing
    assert (m.flushes, m.removed_total, m.failed_total) == (2, 15, 1)
    assert m.last_flush is not None and m.last_flush.event == "up"


def test_bad_rules_and_results_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WatchRules(0, 1)
    with pytest.raises(ValueError, match="sideways"):
        WatchRules(1, 1, frozenset({"sideways"}))
    m, clock = machine()
    with pytest.raises(ValueError, match="unknown probe result"):
        m.observe(clock.tick(), "maybe")


# --------------------------------------------------------------------------- snapshot, status


def make_snapshot(state: str = "down", rtt: float | None = 0.0015) -> GatewaySnapshot:
    m, clock = machine(down_after=2, up_after=1)
    feed(m, clock, ".")
    if state == "down":
        feed(m, clock, "xe")
        m.flush_done(FlushReport("down", 7, 2, 0.25, clock.now))
    m.last_rtt = rtt
    return GatewaySnapshot.of(
        "isp-a",
        "icmp 198.51.100.1",
        m,
        {"mark": "0x1/0xff"},
        now=clock.now + 10,
        wall=1_700_000_000.0,
    )


def test_snapshot_dict_is_what_status_shows() -> None:
    data = make_snapshot().to_dict()
    assert data["state"] == "down"
    assert data["since_seconds"] == 10.0
    assert data["since"] == 1_700_000_000.0 - 10
    assert (data["probes_sent"], data["probes_lost"]) == (3, 2)
    assert data["probes"] == {"ok": 1, "timeout": 1, "error": 1}
    assert data["transitions"] == {"up": 1, "down": 1}
    assert data["flush_on"] == ["down"]
    assert data["match"] == {"mark": "0x1/0xff"}
    assert data["last_flush"] == {
        "event": "down",
        "removed": 7,
        "failed": 2,
        "seconds": 0.25,
        "at": 1_700_000_000.0 - 10,
        "error": None,
    }
    assert (data["flushed_total"], data["flush_failed_total"], data["flushes"]) == (7, 2, 1)
    assert data["last_error"] == "ENETUNREACH (Network is unreachable)"


def test_status_lines() -> None:
    down = make_snapshot().to_dict()
    up = make_snapshot("up", rtt=None).to_dict()
    assert status_lines([down, up]) == [
        "gateway isp-a          : down for 10.0s, icmp 198.51.100.1, rtt 1.5 ms, 3 probes"
        " (2 lost), last flush (down): 7 removed, 2 failed",
        "gateway isp-a          : up for 10.0s, icmp 198.51.100.1, rtt -, 1 probes (0 lost)",
    ]
    assert describe_match({"mark": "0x1/0xff", "dport": "443"}) == "mark=0x1/0xff dport=443"
    assert describe_match({}) == "everything"


# --------------------------------------------------------------------------- metrics


def _families(gateways: tuple[GatewaySnapshot, ...]) -> dict[str, Metric]:
    snapshot = Snapshot(
        node_id=1,
        epoch=1,
        uptime_seconds=1.0,
        internal=CacheStats(),
        external=CacheStats(),
        external_inject=False,
        traffic_bytes=0,
        traffic_packets=0,
        links=(),
        netlink=NetlinkStats(),
        sync={},
        queue_entries=0,
        queue_bytes=0,
        peers=(),
    )
    data = MetricsInput(snapshot, gateways=gateways)
    return {m.name: m for m in build_families(data, CommitTotals())}


def _values(family: Metric) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}


def test_gateway_metric_families() -> None:
    down = make_snapshot()
    up = dataclasses.replace(make_snapshot("up"), name="isp-b")
    families = _families((down, up))
    gateway_families = [name for name in CATALOG if name.startswith("ctsync_gateway_")]
    for name in gateway_families:
        family = families[name.removesuffix("_total") if CATALOG[name].kind == "counter" else name]
        assert family.samples, name
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = set(sample.labels)
            assert labels == set(CATALOG[name].labels), (name, sample)
    up_values = _values(families["ctsync_gateway_up"])
    assert up_values == {(("gateway", "isp-a"),): 0.0, (("gateway", "isp-b"),): 1.0}
    state = _values(families["ctsync_gateway_state"])
    assert state[(("gateway", "isp-a"), ("state", "down"))] == 1.0
    assert state[(("gateway", "isp-a"), ("state", "unknown"))] == 0.0
    assert len(state) == 6
    probes = _values(families["ctsync_gateway_probes"])
    assert probes[(("gateway", "isp-a"), ("result", "timeout"))] == 1.0
    assert probes[(("gateway", "isp-a"), ("result", "error"))] == 1.0
    assert probes[(("gateway", "isp-b"), ("result", "ok"))] == 1.0
    assert _values(families["ctsync_gateway_flushed_connections"])[(("gateway", "isp-a"),)] == 7
    failed = _values(families["ctsync_gateway_flush_failed_connections"])
    assert failed[(("gateway", "isp-a"),)] == 2
    moves = _values(families["ctsync_gateway_transitions"])
    assert moves[(("gateway", "isp-a"), ("to", "down"))] == 1.0
    assert _values(families["ctsync_gateway_probe_rtt_seconds"])[(("gateway", "isp-a"),)] == 0.0015


def test_no_rtt_no_sample_and_no_watch_no_series() -> None:
    families = _families((make_snapshot("up", rtt=None),))
    assert families["ctsync_gateway_probe_rtt_seconds"].samples == []
    assert families["ctsync_gateway_up"].samples
    empty = _families(())
    assert [name for name, f in empty.items() if "gateway" in name and f.samples] == []


# --------------------------------------------------------------------------- configuration

BASE = 'node-id = 1\n[sync]\ninterface = "eth1"\n'
WATCH = '[[gateway-watch]]\nname = "isp-a"\naddress = "198.51.100.1"\n'


def errors_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        loads_config(BASE + text)
    return dict(info.value.errors)


def test_config_defaults_and_selector() -> None:
    config = loads_config(BASE + WATCH + 'match = { mark = "0x1/0xff", dst = "203.0.113.7/24" }\n')
    (watch,) = config.gateway_watch
    assert watch.address == IPv4Address("198.51.100.1")
    assert (watch.probe, watch.port, watch.source_address, watch.interface) == (
        "icmp",
        None,
        None,
        None,
    )
    assert (watch.interval, watch.timeout, watch.down_after, watch.up_after) == (1.0, 0.5, 3, 3)
    assert watch.flush_on == ["down"]
    assert watch.target() == "icmp 198.51.100.1"
    assert watch.match.describe() == {"mark": "0x1/0xff", "dst": "203.0.113.0/24"}
    assert watch.match.selector() == EntryFilter(
        dst=ip_network("203.0.113.0/24"), mark=1, mark_mask=0xFF
    )
    assert loads_config(BASE).gateway_watch == []


def test_config_ipv6_tcp_and_every_key() -> None:
    text = (
        '[[gateway-watch]]\nname = "isp-b.v6"\naddress = "fe80::1"\nprobe = "tcp"\nport = 443\n'
        'source-address = "fe80::2"\ninterface = "wan2"\ninterval = 0.2\ntimeout = 0.1\n'
        'down-after = 5\nup-after = 10\nflush-on = ["up", "down"]\n'
        '[gateway-watch.match]\nmark = 2\nsrc = "2001:db8:1::/48"\ndst = "2001:db8:2::1"\n'
        'proto = "TCP"\ndport = 443\n'
    )
    config = loads_config(BASE + text)
    (watch,) = config.gateway_watch
    assert watch.address == IPv6Address("fe80::1")
    assert watch.target() == "tcp [fe80::1]:443"
    assert watch.match.selector() == EntryFilter(
        proto=IPPROTO_TCP,
        src=ip_network("2001:db8:1::/48"),
        dst=ip_network("2001:db8:2::1/128"),
        dport=443,
        mark=2,
        mark_mask=U32_MAX,
    )
    assert watch.match.describe()["mark"] == "0x2/0xffffffff"
    # `config show` output loads again, to the same configuration.
    assert loads_config(config.to_toml()) == config
    assert "[[gateway-watch]]" in config.to_toml()
    assert "[gateway-watch.match]" in config.to_toml()


def test_selector_matches_like_conntrack() -> None:
    config = loads_config(BASE + WATCH + 'match = { mark = "0x1/0xf", proto = "tcp" }\n')
    selector = config.gateway_watch[0].match.selector()

    def entry(mark: int | None, proto: int = IPPROTO_TCP) -> Entry:
        return Entry(make_tuple("192.0.2.9", "203.0.113.5", proto, 40000, 443), mark=mark)

    assert selector.matches(entry(0x1))
    assert selector.matches(entry(0x71))  # bits outside the mask do not matter
    assert not selector.matches(entry(0x2))
    assert not selector.matches(entry(None))  # no mark is mark 0
    assert not selector.matches(entry(0x1, IPPROTO_UDP))


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("match = {}\n", "gateway-watch[0].match", "give at least one of mark"),
        ("", "gateway-watch[0].match", "required table is missing"),
        ('match = { mark = "3/1" }\n', "gateway-watch[0].match.mark", "bits outside mask 0x1"),
        ('match = { mark = "x" }\n', "gateway-watch[0].match.mark", "mark 'x' is not a number"),
        ("match = { mark = true }\n", "gateway-watch[0].match.mark", "got a boolean"),
        (
            'match = { src = "192.0.2.0/24", dst = "2001:db8::/32" }\n',
            "gateway-watch[0].match.dst",
            "is IPv6 but src is IPv4",
        ),
        (
            'match = { proto = "icmp", dport = 80 }\n',
            "gateway-watch[0].match.dport",
            "protocol icmp has no ports",
        ),
        ('match = { proto = "tpc" }\n', "gateway-watch[0].match.proto", "did you mean 'tcp'"),
        ('match = { src = "192.0.2.0/33" }\n', "gateway-watch[0].match.src", "not a valid"),
        ("match = { dport = 0 }\n", "gateway-watch[0].match.dport", "greater than or equal to 1"),
        ("match = { sport = 1 }\n", "gateway-watch[0].match.sport", "unknown key"),
        ("timeout = 1.0\nmatch = { mark = 1 }\n", "gateway-watch[0].timeout", "less than interval"),
        (
            "interval = 0.5\nmatch = { mark = 1 }\n",
            "gateway-watch[0].timeout",
            "less than interval (0.5 s)",
        ),
        ('probe = "tcp"\nmatch = { mark = 1 }\n', "gateway-watch[0].port", "required with probe"),
        (
            "port = 80\nmatch = { mark = 1 }\n",
            "gateway-watch[0].port",
            'only applies with probe = "tcp"',
        ),
        ('probe = "udp"\nmatch = { mark = 1 }\n', "gateway-watch[0].probe", "'icmp' or 'tcp'"),
        (
            'source-address = "2001:db8::1"\nmatch = { mark = 1 }\n',
            "gateway-watch[0].source-address",
            "is IPv6 but address is IPv4",
        ),
        (
            'flush-on = ["down", "down"]\nmatch = { mark = 1 }\n',
            "gateway-watch[0].flush-on",
            "listed twice",
        ),
        (
            'flush-on = ["sideways"]\nmatch = { mark = 1 }\n',
            "gateway-watch[0].flush-on[0]",
            "'down' or 'up'",
        ),
        ("down-after = 0\nmatch = { mark = 1 }\n", "gateway-watch[0].down-after", "greater than"),
        ('interface = "a/b"\nmatch = { mark = 1 }\n', "gateway-watch[0].interface", "not a valid"),
        ("retries = 3\nmatch = { mark = 1 }\n", "gateway-watch[0].retries", "unknown key"),
    ],
)
def test_config_errors_name_the_key(text: str, key: str, message: str) -> None:
    errors = errors_of(WATCH + text)
    assert key in errors, errors
    assert message in errors[key], errors


def test_config_address_rules() -> None:
    errors = errors_of(
        '[[gateway-watch]]\nname = "a"\naddress = "224.0.0.1"\nmatch = { mark = 1 }\n'
    )
    assert errors == {"gateway-watch[0].address": "224.0.0.1 is not a unicast address"}
    errors = errors_of('[[gateway-watch]]\nname = "a"\naddress = "fe80::1"\nmatch = { mark = 1 }\n')
    assert errors == {"gateway-watch[0].interface": "required with a link-local address (fe80::1)"}
    errors = errors_of(
        '[[gateway-watch]]\nname = "a b"\naddress = "192.0.2.1"\nmatch = { mark = 1 }\n'
    )
    assert list(errors) == ["gateway-watch[0].name"]


def test_config_names_are_unique() -> None:
    one = WATCH + "match = { mark = 1 }\n"
    other = '[[gateway-watch]]\nname = "isp-b"\naddress = "198.51.100.2"\nmatch = { mark = 2 }\n'
    assert errors_of(one + other + one) == {"gateway-watch[2].name": "'isp-a' is used twice"}


def test_config_typo_gets_a_hint() -> None:
    errors = errors_of(WATCH + "down_after = 3\nmatch = { mark = 1 }\n")
    assert errors == {"gateway-watch[0].down_after": "unknown key; did you mean 'down-after'?"}


def test_watch_model_is_frozen() -> None:
    watch = loads_config(BASE + WATCH + "match = { mark = 1 }\n").gateway_watch[0]
    assert isinstance(watch, GatewayWatch)
    with pytest.raises(Exception, match="frozen"):
        setattr(watch, "interval", 2.0)  # noqa: B010 - the assignment must reach pydantic


# --------------------------------------------------------------------------- ICMP codec


def test_icmp_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the one's complement sum of 0001 f203 f4f5 f6f7 is ddf2.
    assert icmp_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0xFFFF - 0xDDF2
    assert icmp_checksum(b"\x01") == 0xFFFF - 0x0100  # odd length: padded with a zero


def test_echo_request_ipv4_sums_to_zero_and_ipv6_leaves_the_sum_to_the_kernel() -> None:
    v4 = echo_request(socket.AF_INET, 0x1234, 7, b"token123")
    assert v4[:1] == b"\x08" and icmp_checksum(v4) == 0
    assert struct.unpack("!HH", v4[4:8]) == (0x1234, 7)
    v6 = echo_request(socket.AF_INET6, 0x1234, 7, b"token123")
    assert v6[:4] == b"\x80\x00\x00\x00"


def _reply(family: int, ident: int, seq: int, payload: bytes, kind: int | None = None) -> bytes:
    if kind is None:
        kind = 0 if family == socket.AF_INET else 129
    return struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload


def test_parse_echo_reply() -> None:
    body = _reply(socket.AF_INET, 9, 3, b"abc")
    ip_header = bytes([0x45]) + bytes(19)
    assert parse_echo_reply(socket.AF_INET, ip_header + body, True) == (9, 3, b"abc")
    assert parse_echo_reply(socket.AF_INET, body, False) == (9, 3, b"abc")
    assert parse_echo_reply(socket.AF_INET6, _reply(socket.AF_INET6, 1, 2, b"x"), False) == (
        1,
        2,
        b"x",
    )
    # Not a reply: a request, another family's reply, truncated data.
    assert (
        parse_echo_reply(socket.AF_INET, _reply(socket.AF_INET, 9, 3, b"", kind=8), False) is None
    )
    assert parse_echo_reply(socket.AF_INET6, body, False) is None
    assert parse_echo_reply(socket.AF_INET, b"\x45" + bytes(10), True) is None
    assert parse_echo_reply(socket.AF_INET, body[:6], False) is None
