"""``ctsync connections``: flags, durations, filters, rates, sorting, JSON and the commands
(click's CliRunner with a fake dump, a fake delete and a fake clock; no kernel)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from hypothesis import given
from hypothesis import strategies as st

from ctsync.cli import connections_cmd
from ctsync.cli import main as cli_main
from ctsync.core.connections import (
    SORT_KEYS,
    Connection,
    Rate,
    compute_rates,
    connection_to_json,
    endpoint,
    sort_connections,
    tcp_state,
)
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Counters,
    CtTuple,
    Entry,
    Status,
    TcpInfo,
    TcpState,
    make_tuple,
)
from ctsync.core.routeros import (
    FLAGS,
    FLAGS_LEGEND,
    flag_letters,
    flag_names,
    format_duration,
    format_quantity,
    parse_duration,
)
from ctsync.core.select import EntryFilter, nat_status, parse_nat
from ctsync.io.sysctl import Sysctls

LIVE = Status.CONFIRMED | Status.SEEN_REPLY | Status.ASSURED


def tcp(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    *,
    reply: CtTuple | None = None,
    status: int = int(LIVE),
    timeout: int = 431998,
    mark: int | None = 0,
    zone: int | None = None,
    ct_id: int | None = 1,
    counters: tuple[int, int, int, int] | None = None,
    state: TcpState = TcpState.ESTABLISHED,
) -> Entry:
    orig = make_tuple(src, dst, IPPROTO_TCP, sport, dport)
    return Entry(
        orig=orig,
        reply=reply if reply is not None else orig.inverted(),
        status=status,
        timeout=timeout,
        mark=mark,
        zone=zone,
        id=ct_id,
        protoinfo=TcpInfo(state=int(state)),
        counters_orig=Counters(counters[0], counters[1]) if counters else None,
        counters_reply=Counters(counters[2], counters[3]) if counters else None,
    )


# A small table: plain, SNAT (masquerade), DNAT+SNAT (port forward), marked, IPv6, UDP, ICMP.
PLAIN = tcp("192.0.2.2", "198.51.100.2", 40000, 22, ct_id=1, counters=(10, 1000, 8, 4000))
SNAT = tcp(
    "192.0.2.2",
    "198.51.100.2",
    40001,
    443,
    reply=make_tuple("198.51.100.2", "198.51.100.1", IPPROTO_TCP, 443, 40001),
    status=int(LIVE | Status.SRC_NAT | Status.SRC_NAT_DONE),
    timeout=300,
    ct_id=2,
    counters=(5, 500, 5, 9000),
)
DNAT = tcp(
    "192.0.2.2",
    "203.0.113.10",
    40002,
    80,
    reply=make_tuple("198.51.100.2", "198.51.100.1", IPPROTO_TCP, 8080, 40002),
    status=int(LIVE | Status.SRC_NAT | Status.DST_NAT),
    timeout=120,
    ct_id=3,
    counters=(1, 60, 0, 0),
    state=TcpState.SYN_SENT,
)
MARKED = tcp("192.0.2.3", "198.51.100.2", 40003, 5001, mark=0x42, ct_id=4, zone=5)
V6 = tcp("2001:db8:1::2", "2001:db8:2::2", 40004, 443, ct_id=5)
_udp = make_tuple("192.0.2.2", "198.51.100.53", IPPROTO_UDP, 5353, 53)
UDP = Entry(orig=_udp, reply=_udp.inverted(), status=int(Status.CONFIRMED), timeout=30, id=6)
ICMP = Entry(
    orig=make_tuple("192.0.2.2", "198.51.100.2", IPPROTO_ICMP, icmp_id=7, icmp_type=8),
    reply=make_tuple("198.51.100.2", "192.0.2.2", IPPROTO_ICMP, icmp_id=7, icmp_type=0),
    status=int(Status.CONFIRMED | Status.SEEN_REPLY),
    timeout=29,
    id=7,
)
TABLE = [PLAIN, SNAT, DNAT, MARKED, V6, UDP, ICMP]


# --- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "letters"),
    [
        (0, ""),
        (Status.EXPECTED, "E"),
        (Status.SEEN_REPLY, "S"),
        (Status.ASSURED, "A"),
        (Status.CONFIRMED, "C"),
        (Status.DYING, "D"),
        (Status.OFFLOAD, "F"),
        (Status.HW_OFFLOAD, "FH"),
        (Status.SRC_NAT, "s"),
        (Status.DST_NAT, "d"),
        (LIVE | Status.SRC_NAT | Status.DST_NAT, "SACsd"),
        # Bits that have no letter stay invisible.
        (Status.SEQ_ADJUST | Status.SRC_NAT_DONE | Status.HELPER | Status.FIXED_TIMEOUT, ""),
    ],
)
def test_flag_letters_follow_status_bits(status: int, letters: str) -> None:
    entry = replace(PLAIN, status=int(status))
    assert flag_letters(entry) == letters


def test_padded_flags_keep_one_column_per_flag() -> None:
    assert flag_letters(replace(PLAIN, status=int(LIVE | Status.SRC_NAT)), padded=True) == (
        " SAC   s "
    )
    every = 0
    for flag in FLAGS:
        every |= flag.bits
    assert flag_letters(replace(PLAIN, status=every), padded=True) == "ESACDFHsd"
    assert len(flag_letters(replace(PLAIN, status=0), padded=True)) == len(FLAGS)
    assert FLAGS_LEGEND.startswith("Flags: E - EXPECTED; S - SEEN-REPLY; A - ASSURED;")


def test_nat_flags_without_status_come_from_the_tuples() -> None:
    assert flag_names(replace(SNAT, status=None)) == ["srcnat"]
    assert flag_names(replace(DNAT, status=None)) == ["srcnat", "dstnat"]
    assert flag_names(replace(PLAIN, status=None)) == []
    assert flag_names(Entry(orig=PLAIN.orig)) == []
    # With a status, the kernel's bits win (they are set exactly when NAT changed a tuple).
    assert nat_status(replace(SNAT, status=int(LIVE))) == 0


# --- durations and quantities ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (1, "1s"),
        (30, "30s"),
        (60, "1m"),
        (90, "1m30s"),
        (3600, "1h"),
        (86400, "1d"),
        (432000, "5d"),
        (431998, "4d23h59m58s"),
        (604800, "1w"),
        (694861, "1w1d1h1m1s"),
    ],
)
def test_format_duration_routeros(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30),
        (" 10s ", 10),
        ("1D2H3M4S", 93784),
        ("1d2h3m4s", 93784),
        ("2h", 7200),
        ("00:05:00", 300),
        ("1d00:00:10", 86410),
        ("1w2d", 9 * 86400),
        ("0", 0),
    ],
)
def test_parse_duration_forms(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "s", "1x", "1s1d", "1d1d", "-5", "1.5s", "10 m x", "00:60:00", "1h00:00:01", "d1", "1:2"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_duration(-1)


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (12.25, "12.2"), (999, "999"), (1000, "1.0k"), (1234567, "1.2M"), (250e6, "250M")],
)
def test_format_quantity(value: float, text: str) -> None:
    assert format_quantity(value) == text
    assert format_quantity(value, "B/s") == text + "B/s"


# --- filters ---------------------------------------------------------------------------------


def _matching(selector: EntryFilter) -> list[int | None]:
    return [e.id for e in TABLE if selector.matches(e)]


def test_nat_filters() -> None:
    assert _matching(EntryFilter(nat="any")) == [2, 3]
    assert _matching(EntryFilter(nat="src")) == [2, 3]
    assert _matching(EntryFilter(nat="dst")) == [3]
    assert _matching(EntryFilter(nat="none")) == [1, 4, 5, 6, 7]
    assert parse_nat(" SRC ") == "src"
    with pytest.raises(ValueError, match="unknown NAT kind"):
        parse_nat("both")


def test_reply_direction_and_prefix_filters() -> None:
    net = ipaddress.ip_network
    # The DNAT target is the reply source; the SNAT address is the reply destination.
    assert _matching(EntryFilter(reply_src=net("198.51.100.2/32"), dport=80)) == [3]
    assert _matching(EntryFilter(reply_dst=net("198.51.100.1"))) == [2, 3]
    assert _matching(EntryFilter(dst=net("198.51.100.0/24"))) == [1, 2, 4, 6, 7]
    assert _matching(EntryFilter(src=net("2001:db8::/32"))) == [5]
    assert _matching(EntryFilter(reply_dst=net("2001:db8:1::/48"))) == [5]
    assert not EntryFilter(reply_src=net("0.0.0.0/0")).matches(Entry(orig=PLAIN.orig))


def test_mark_zone_state_filters() -> None:
    assert _matching(EntryFilter(mark=0x2, mark_mask=0xFF)) == []
    assert _matching(EntryFilter(mark=0x42, mark_mask=0xFF)) == [4]
    assert _matching(EntryFilter(mark=0x40, mark_mask=0xF0)) == [4]
    assert _matching(EntryFilter(zone=5)) == [4]
    assert _matching(EntryFilter(state="SYN_SENT")) == [3]
    assert _matching(EntryFilter(proto=IPPROTO_UDP)) == [6]


def test_filter_args_round_trip_with_new_keys() -> None:
    selector = EntryFilter(
        proto=IPPROTO_TCP,
        reply_src=ipaddress.ip_network("198.51.100.0/24"),
        reply_dst=ipaddress.ip_network("2001:db8::/32"),
        nat="dst",
        mark=2,
        mark_mask=0xFF,
    )
    args = selector.to_args()
    assert args["nat"] == "dst" and args["reply_src"] == "198.51.100.0/24"
    assert EntryFilter.from_args(args) == selector
    # The keys of older callers still mean the same.
    assert EntryFilter.from_args({"dport": "80"}) == EntryFilter(dport=80)
    assert not selector.is_empty and EntryFilter().is_empty
    with pytest.raises(ValueError, match="unknown filter"):
        EntryFilter.from_args({"nats": "any"})


# --- rates -----------------------------------------------------------------------------------


def test_rates_from_two_dumps() -> None:
    before = [PLAIN, SNAT, replace(DNAT, id=99), MARKED]
    after = [
        replace(PLAIN, counters_orig=Counters(30, 3000), counters_reply=Counters(28, 24000)),
        replace(SNAT, counters_orig=Counters(4, 400)),  # went backwards: clamped to 0
        DNAT,  # same tuple, new id: a new connection, its whole counters are in the interval
        MARKED,  # no counters: no rate
        replace(UDP, counters_orig=Counters(2, 200), counters_reply=Counters(2, 100)),  # new
    ]
    rates = compute_rates(before, after, 2.0)
    assert [c.entry for c in rates] == after
    assert rates[0].rate == Rate(1000.0, 10.0, 10000.0, 10.0)
    assert rates[0].rate.bytes == 11000.0 and rates[0].rate.packets == 20.0
    assert rates[1].rate == Rate(0.0, 0.0, 0.0, 0.0)
    assert rates[2].rate == Rate(30.0, 0.5, 0.0, 0.0)
    assert rates[3].rate is None
    assert rates[4].rate == Rate(100.0, 1.0, 50.0, 1.0)
    with pytest.raises(ValueError):
        compute_rates(before, after, 0)


def test_rates_match_by_zone_too() -> None:
    zoned = replace(PLAIN, zone=7, counters_orig=Counters(100, 10_000))
    rates = compute_rates([zoned], [replace(PLAIN, zone=7), PLAIN], 1.0)
    assert rates[0].rate == Rate(0.0, 0.0, 0.0, 0.0)  # orig went down: clamped; reply same
    assert rates[1].rate == Rate(1000.0, 10.0, 4000.0, 8.0)  # zone 0: new


# --- sorting ---------------------------------------------------------------------------------


def _ids(connections: Sequence[Connection]) -> list[int | None]:
    return [c.entry.id for c in connections]


def test_sort_orders() -> None:
    table = [Connection(e) for e in TABLE]
    assert _ids(sort_connections(table, "repl-bytes"))[:2] == [2, 1]
    # Ascending; ties (PLAIN, MARKED, V6 at 431998 s) by source address.
    assert _ids(sort_connections(table, "timeout")) == [7, 6, 3, 2, 1, 4, 5]
    # Reversed, ties keep their source order.
    assert _ids(sort_connections(table, "timeout", reverse=True)) == [1, 4, 5, 2, 3, 6, 7]
    assert _ids(sort_connections(table, "dport")) == [7, 1, 6, 3, 2, 5, 4]
    assert _ids(sort_connections(table, "mark"))[-1] == 4
    # Source: by family, then address, then port (IPv4 before IPv6).
    assert _ids(sort_connections(table, "src")) == [7, 6, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="unknown sort key"):
        sort_connections(table, "nope")


def test_sort_by_bytes_is_descending_and_exact() -> None:
    table = [Connection(e) for e in TABLE]
    # PLAIN 5000 B, SNAT 9500 B, DNAT 60 B, the rest have no counters (0).
    assert _ids(sort_connections(table, "bytes"))[:3] == [2, 1, 3]
    assert _ids(sort_connections(table, "bytes", reverse=True))[-3:] == [3, 1, 2]


def test_sort_by_rate() -> None:
    rated = [
        Connection(PLAIN, Rate(10, 1, 10, 1)),
        Connection(SNAT, Rate(500, 1, 0, 0)),
        Connection(DNAT, None),
    ]
    assert _ids(sort_connections(rated, "rate")) == [2, 1, 3]
    assert _ids(sort_connections(rated, "packet-rate")) == [1, 2, 3]
    assert _ids(sort_connections(rated, "repl-rate")) == [1, 2, 3]
    assert set(SORT_KEYS) >= {"timeout", "bytes", "rate", "src", "dst"}


# --- derived fields and JSON ----------------------------------------------------------------


def test_endpoints_and_state() -> None:
    assert endpoint(PLAIN.orig, True) == "192.0.2.2:40000"
    assert endpoint(V6.orig, False) == "[2001:db8:2::2]:443"
    assert endpoint(ICMP.orig, True) == "192.0.2.2"
    assert tcp_state(replace(PLAIN, protoinfo=TcpInfo(int(TcpState.TIME_WAIT)))) == "time-wait"
    assert tcp_state(UDP) == ""


def test_connection_json_has_every_field() -> None:
    obj = connection_to_json(Connection(DNAT, Rate(1.5, 0.25, 3.0, 0.5)))
    assert obj["flags"] == "SACsd"
    assert obj["srcnat"] is obj["dstnat"] is obj["seen_reply"] is True
    assert obj["dying"] is obj["expected"] is obj["fasttrack"] is obj["hw_offload"] is False
    assert obj["src_address"] == "192.0.2.2:40002"
    assert obj["dst_address"] == "203.0.113.10:80"
    assert obj["reply_src_address"] == "198.51.100.2:8080"
    assert obj["reply_dst_address"] == "198.51.100.1:40002"
    assert obj["timeout"] == 120 and obj["timeout_text"] == "2m"
    assert obj["tcp_state"] == "syn-sent"
    assert (obj["orig_bytes"], obj["orig_packets"], obj["repl_bytes"]) == (60, 1, 0)
    assert (obj["orig_rate"], obj["orig_packet_rate"], obj["repl_rate"]) == (1.5, 0.25, 3.0)
    assert obj["connection_mark"] == 0 and obj["id"] == 3
    # entry_to_json's fields are all there too.
    assert obj["original"]["dport"] == 80 and obj["status_flags"][0] == "SEEN_REPLY"
    plain = connection_to_json(Connection(MARKED))
    assert "orig_rate" not in plain and "orig_bytes" not in plain
    assert plain["connection_mark"] == 0x42 and plain["zone"] == 5


# --- the commands --------------------------------------------------------------------------


class Fake:
    """Stands in for the dump, the deletes, the clock and the sysctls."""

    def __init__(self, tables: list[list[Entry]]) -> None:
        self.tables = tables
        self.dumps: list[int] = []
        self.deleted: list[list[tuple[CtTuple, int | None]]] = []
        self.now = 100.0
        self.sleeps: list[float] = []
        self.vanish_on_delete = True
        self.missing: set[int] = set()  # ids that are "already gone" when deleted

    def dump(self, family: int) -> Sequence[Entry]:
        self.dumps.append(family)
        table = self.tables[min(len(self.dumps), len(self.tables)) - 1]
        return [e for e in table if family in (0, e.family)]

    def delete(self, targets: list[tuple[CtTuple, int | None]]) -> tuple[int, int]:
        self.deleted.append(targets)
        keys = set(targets)
        current = self.tables[-1]
        gone = [e for e in current if (e.orig, e.zone) in keys and e.id in self.missing]
        if self.vanish_on_delete:
            self.tables.append([e for e in current if (e.orig, e.zone) not in keys])
        return len(targets) - len(gone), len(gone)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + 0.5  # the second dump starts a little late


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Fake:
    state = Fake([list(TABLE)])
    monkeypatch.setattr(connections_cmd, "_dump", state.dump)
    monkeypatch.setattr(connections_cmd, "_delete", state.delete)
    monkeypatch.setattr(connections_cmd, "_sleep", state.sleep)
    monkeypatch.setattr(connections_cmd, "_clock", lambda: state.now)
    (tmp_path / "nf_conntrack_acct").write_text("1\n")
    (tmp_path / "nf_conntrack_max").write_text("65536\n")
    monkeypatch.setattr(connections_cmd, "_sysctls", lambda: Sysctls(tmp_path))
    return state


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main.cli, ["connections", *args], prog_name="ctsync")


def test_list_table_layout(fake: Fake) -> None:
    result = run("-p", "tcp", "-f", "ipv4")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == FLAGS_LEGEND
    assert lines[1].split() == [
        "#",
        "PROTOCOL",
        "SRC-ADDRESS",
        "DST-ADDRESS",
        "TCP-STATE",
        "TIMEOUT",
        "ORIG-PACKETS",
        "REPL-PACKETS",
        "ORIG-BYTES",
        "REPL-BYTES",
        "CONNECTION-MARK",
        "ZONE",
    ]
    assert len(lines) == 2 + 4
    assert lines[2].split() == [
        "0",
        "SAC",
        "tcp",
        "192.0.2.2:40000",
        "198.51.100.2:22",
        "established",
        "4d23h59m58s",
        "10",
        "8",
        "1000",
        "4000",
        "0",
    ]
    dnat = lines[4]
    assert "SACsd" in dnat.replace(" ", "") and "syn-sent" in dnat and " 2m " in dnat
    marked = lines[5]
    assert marked.rstrip().endswith("0x42  5") or marked.split()[-2:] == ["0x42", "5"]
    # The flags keep their columns: S of every row lines up.
    col = lines[2].index("SAC")
    assert all(line[col] == "S" for line in lines[2:])
    assert fake.dumps == [AF_INET]


def test_list_subcommand_is_the_same_listing(fake: Fake) -> None:
    assert run("list", "--nat", "--json").stdout == run("--nat", "--json").stdout
    assert run("list", "-m", "0x42", "--count").stdout.strip() == "1"


def test_list_reply_columns_and_no_counters(fake: Fake) -> None:
    fake.tables = [[MARKED, V6]]
    out = run("--reply").stdout.splitlines()
    assert "REPLY-SRC-ADDRESS" in out[1] and "ORIG-BYTES" not in out[1]
    assert "[2001:db8:2::2]:443" in out[3] and "[2001:db8:1::2]:40004" in out[3]
    assert run("-s", "192.0.2.200").stdout.strip() == "no connections"


def test_list_count_json_and_filters(fake: Fake) -> None:
    assert run("--count").stdout.strip() == "7"
    assert run("--nat", "--count").stdout.strip() == "2"
    assert run("--no-nat", "--count").stdout.strip() == "5"
    assert run("--dst-nat", "--count").stdout.strip() == "1"
    assert run("-m", "0x42/0xff", "--count").stdout.strip() == "1"
    assert run("-r", "198.51.100.2", "--dport", "80", "--count").stdout.strip() == "1"
    assert run("-f", "ipv6", "--count").stdout.strip() == "1"
    assert run("--state", "syn-sent", "--count").stdout.strip() == "1"
    assert run("-w", "5", "--count").stdout.strip() == "1"
    data = json.loads(run("--json", "--sort", "bytes").stdout)
    assert [d["id"] for d in data[:3]] == [2, 1, 3]
    assert data[0]["flags"] == "SACs" and data[0]["repl_bytes"] == 9000
    assert fake.dumps[-1] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sort", "rate"], "needs --interval"),
        (["--nat", "--src-nat"], "use one of"),
        (["-f", "ipv6", "-s", "192.0.2.1"], "does not match --family"),
        (["-s", "192.0.2.1", "-d", "2001:db8::1"], "mix IPv4 and IPv6"),
        (["--interval", "0"], "0.1<=x<=3600"),
        (["--sort", "nope"], "nope"),
        (["-m", "0x1/zz"], "mask"),
    ],
)
def test_list_usage_errors(fake: Fake, args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert fake.dumps == []


def test_group_options_before_a_subcommand_are_refused(fake: Fake) -> None:
    result = run("-m", "0x42", "delete")
    assert result.exit_code == 2
    assert "options go after the sub-command" in result.stderr
    assert fake.deleted == []


def test_interval_gives_rates(fake: Fake) -> None:
    later = [
        replace(PLAIN, counters_orig=Counters(40, 4000), counters_reply=Counters(38, 34000)),
        SNAT,
    ]
    fake.tables = [[PLAIN, SNAT], later]
    result = run("--interval", "2", "--sort", "rate", "--json")
    assert result.exit_code == 0, result.output
    assert fake.sleeps == [2.0]
    data = json.loads(result.stdout)
    # 2.5 s between the two dump starts (the fake clock adds 0.5 s to the sleep).
    assert data[0]["id"] == 1 and data[0]["orig_rate"] == pytest.approx(3000 / 2.5)
    assert data[0]["repl_packet_rate"] == pytest.approx(30 / 2.5)
    assert data[1]["orig_rate"] == 0
    fake.dumps.clear()
    text = run("--interval", "2").stdout.splitlines()
    assert "ORIG-RATE" in text[1] and "REPL-PPS" in text[1]
    assert "1.2kB/s" in text[2] and "12.0kB/s" in text[2]


def test_accounting_note_and_enable(fake: Fake, tmp_path: Path) -> None:
    (tmp_path / "nf_conntrack_acct").write_text("0\n")
    result = run()
    assert result.exit_code == 0
    assert result.stderr.count("accounting is off") == 1
    assert "ctsync tracking set accounting yes" in result.stderr
    assert "accounting is off" not in run("--json").stderr
    result = run("--enable-accounting", "--count")
    assert result.exit_code == 0 and result.stderr == ""
    assert (tmp_path / "nf_conntrack_acct").read_text().strip() == "1"
    assert "accounting is off" not in run().stderr


def test_dump_errors_are_one_line(fake: Fake, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(family: int) -> Sequence[Entry]:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(connections_cmd, "_dump", refuse)
    result = run()
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: cannot read the conntrack table: permission denied (needs root or CAP_NET_ADMIN)"
    )


# --- delete ---------------------------------------------------------------------------------


def test_delete_refuses_an_empty_filter(fake: Fake) -> None:
    result = run("delete")
    assert result.exit_code == 2
    assert "refusing to remove every connection" in result.stderr
    result = run("delete", "--all", "-p", "tcp")
    assert result.exit_code == 2 and "do not combine" in result.stderr
    assert fake.deleted == [] and fake.dumps == []


def test_delete_by_mark(fake: Fake) -> None:
    result = run("delete", "-m", "0x42/0xff")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "removed 1 connection (0 already gone)"
    assert fake.deleted == [[(MARKED.orig, 5)]]


def test_delete_reports_already_gone(fake: Fake) -> None:
    fake.missing = {2}
    result = run("delete", "--nat", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "dry_run": False,
        "matched": 2,
        "removed": 1,
        "already_gone": 1,
        "failed": 0,
    }
    assert [orig for orig, _ in fake.deleted[0]] == [SNAT.orig, DNAT.orig]


def test_delete_failures_exit_1(fake: Fake) -> None:
    fake.missing = {1, 5}
    fake.vanish_on_delete = False  # nothing goes: both "missing" ones are still there
    result = run("delete", "--dport", "22")
    assert result.exit_code == 1
    assert result.stdout.strip() == "removed 0 connections (0 already gone)"
    assert result.stderr.strip() == "error: 1 connection could not be removed"


def test_delete_dry_run_removes_nothing(fake: Fake) -> None:
    result = run("delete", "-d", "198.51.100.0/24", "-p", "tcp", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == FLAGS_LEGEND and len(lines) == 2 + 3 + 1
    assert lines[-1] == "would remove 3 connections (dry run: nothing removed)"
    data = json.loads(run("delete", "--all", "--dry-run", "--json").stdout)
    assert data["dry_run"] is True and data["matched"] == 7 and len(data["connections"]) == 7
    assert fake.deleted == []


def test_delete_all_and_family(fake: Fake) -> None:
    result = run("delete", "-f", "ipv6")
    assert result.exit_code == 0, result.output
    assert fake.deleted == [[(V6.orig, None)]] and fake.dumps == [AF_INET6]
    result = run("delete", "--all")
    assert result.stdout.strip() == "removed 6 connections (0 already gone)"
    assert run("delete", "--all").stdout.strip() == "removed 0 connections (0 already gone)"
