"""CLI tests: click's CliRunner with a fake conntrack dump (no root, no kernel)."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import subprocess
import sys
from collections.abc import Sequence

import pytest
from click.testing import CliRunner, Result

from ctsync import __version__
from ctsync.cli import main as cli_main
from ctsync.cli.errors import EXIT_AGENT_UNREACHABLE, AgentUnreachableError, CliError
from ctsync.cli.render import render_conntrack_table
from ctsync.core.entry import IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Entry, make_tuple
from ctsync.core.select import (
    EntryFilter,
    parse_mark,
    parse_network,
    parse_port,
    parse_proto,
    parse_state,
    parse_zone,
)
from tests.core.test_render import (
    GOLDEN,
    GRE,
    ICMP6,
    ICMP_ECHO,
    IPV4_TABLE,
    IPV6_TABLE,
    SCTP,
    TCP6,
    TCP_DNAT,
    TCP_OFFLOADED,
    TCP_PLAIN,
    TCP_SNAT,
    UDP6,
    UDP_NO_MARK,
    UDP_OFFLOADED_WITH_TIMEOUT,
)

AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)


class FakeDump:
    """Stands in for ctsync.io.netlink.dump_table; records the families asked for."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls: list[int] = []
        self.error = error

    def __call__(self, family: int) -> Sequence[Entry]:
        self.calls.append(family)
        if self.error is not None:
            raise self.error
        return IPV4_TABLE if family == AF_INET else IPV6_TABLE


@pytest.fixture
def fake_dump(monkeypatch: pytest.MonkeyPatch) -> FakeDump:
    fake = FakeDump()
    monkeypatch.setattr(cli_main, "_dump_table", fake)
    return fake


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main.cli, list(args), prog_name="ctsync")


def table(*args: str) -> Result:
    return run("show", "conntrack", "table", *args)


def ids(result: Result) -> list[int]:
    """The Id column of a rendered table."""
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    if lines == ["Entries not found"]:
        return []
    return [int(line.split()[0]) for line in lines[2:]]


# --- the command ---------------------------------------------------------------------------


def test_table_ipv4_prints_vyos_layout(fake_dump: FakeDump) -> None:
    result = table("ipv4")
    assert result.exit_code == 0
    assert fake_dump.calls == [AF_INET]
    assert result.stdout == (GOLDEN / "conntrack_table_ipv4.txt").read_text(encoding="utf-8")
    assert result.stderr == ""


def test_table_ipv6(fake_dump: FakeDump) -> None:
    result = table("ipv6")
    assert result.exit_code == 0
    assert fake_dump.calls == [AF_INET6]
    assert result.stdout == (GOLDEN / "conntrack_table_ipv6.txt").read_text(encoding="utf-8")


def test_table_drops_entries_of_the_other_family(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_main, "_dump_table", lambda family: [TCP_PLAIN, TCP6])
    assert ids(table("ipv4")) == [TCP_PLAIN.id]
    assert ids(table("ipv6")) == [TCP6.id]


def test_empty_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_main, "_dump_table", lambda family: [])
    result = table("ipv4")
    assert result.exit_code == 0
    assert result.stdout == "Entries not found\n"
    assert table("ipv4", "--count").stdout == "0\n"
    assert table("ipv4", "--json").stdout == "[]\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), IPV4_TABLE),
        (("-p", "tcp"), [TCP_PLAIN, TCP_SNAT, TCP_DNAT, TCP_OFFLOADED]),
        (("--proto", "TCP"), [TCP_PLAIN, TCP_SNAT, TCP_DNAT, TCP_OFFLOADED]),
        (("-p", "17"), [UDP_NO_MARK, UDP_OFFLOADED_WITH_TIMEOUT]),
        (("-p", "icmp"), [ICMP_ECHO]),
        (("-p", "gre"), [GRE]),
        (("-s", "192.0.2.10"), [TCP_PLAIN]),
        (("--src", "198.51.100.0/24"), [TCP_DNAT]),
        (("--orig-src", "192.0.2.0/28"), [TCP_PLAIN, TCP_SNAT, ICMP_ECHO]),
        (("-d", "203.0.113.0/24"), [TCP_DNAT, TCP_OFFLOADED, UDP_OFFLOADED_WITH_TIMEOUT, GRE]),
        (("-s", "192.0.2.0/24", "-d", "198.51.100.80"), [TCP_PLAIN, TCP_SNAT]),
        (("--sport", "54321"), [TCP_PLAIN]),
        (("--dport", "4500"), [UDP_OFFLOADED_WITH_TIMEOUT]),
        (("--dport", "443", "-p", "udp"), []),
        (("--dport", "16"), []),  # GRE keys are not ports
        (("-m", "16"), [TCP_SNAT]),
        (("--mark", "0x10/0xf0"), [TCP_SNAT]),
        (("-m", "7/0x3"), []),  # MARK has bits outside MASK: matches nothing, like conntrack
        (("-m", "3/0x3"), [UDP_OFFLOADED_WITH_TIMEOUT, SCTP]),
        (
            ("-m", "0"),  # no mark attribute counts as mark 0
            [TCP_PLAIN, TCP_DNAT, UDP_NO_MARK, ICMP_ECHO, TCP_OFFLOADED, GRE],
        ),
        (("-w", "5"), [TCP_DNAT]),
        (("--zone", "65535"), [SCTP]),
        (
            ("-w", "0"),  # no zone attribute is the default zone 0
            [
                TCP_PLAIN,
                TCP_SNAT,
                UDP_NO_MARK,
                ICMP_ECHO,
                TCP_OFFLOADED,
                UDP_OFFLOADED_WITH_TIMEOUT,
                GRE,
            ],
        ),
        (("--state", "ESTABLISHED"), [TCP_PLAIN, TCP_DNAT, TCP_OFFLOADED, SCTP]),
        (("--state", "established", "-p", "tcp"), [TCP_PLAIN, TCP_DNAT, TCP_OFFLOADED]),
        (("--state", "time-wait"), [TCP_SNAT]),
        (("--state", "SYN_SENT"), []),
        (("-p", "tcp", "--state", "ESTABLISHED", "-w", "5", "--dport", "8080"), [TCP_DNAT]),
    ],
)
def test_filters(fake_dump: FakeDump, args: tuple[str, ...], expected: list[Entry]) -> None:
    result = table("ipv4", *args)
    assert ids(result) == [e.id for e in expected]
    count = table("ipv4", *args, "--count")
    assert count.exit_code == 0
    assert count.stdout == f"{len(expected)}\n"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("-p", "icmpv6"), [ICMP6]),
        (("-p", "icmp6"), [ICMP6]),
        (("-s", "2001:db8::/64"), [TCP6, UDP6, ICMP6]),
        (("-d", "2001:db8:1::53"), [UDP6]),
        (("-d", "2001:db8:1::/48", "--sport", "34567"), [TCP6]),
        (("-w", "2"), [UDP6]),
    ],
)
def test_filters_ipv6(fake_dump: FakeDump, args: tuple[str, ...], expected: list[Entry]) -> None:
    assert ids(table("ipv6", *args)) == [e.id for e in expected]


def test_count_is_a_bare_integer(fake_dump: FakeDump) -> None:
    result = table("ipv4", "--count")
    assert result.exit_code == 0
    assert result.stdout == f"{len(IPV4_TABLE)}\n"
    both = table("ipv4", "--count", "--json")
    assert json.loads(both.stdout) == len(IPV4_TABLE)


def test_json(fake_dump: FakeDump) -> None:
    result = table("ipv4", "--json", "-p", "tcp")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert [d["id"] for d in data] == [TCP_PLAIN.id, TCP_SNAT.id, TCP_DNAT.id, TCP_OFFLOADED.id]
    assert data[0]["original"]["src"] == "192.0.2.10"
    assert data[0]["tcp"]["state"] == "ESTABLISHED"
    assert data[2]["zone"] == 5


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (PermissionError(errno.EPERM, "Operation not permitted"), "permission denied"),
        (OSError(errno.ENOBUFS, "No buffer space available"), "no buffer space available"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused"),
        (OSError("netlink said no"), "netlink said no"),
        (OSError(), "OSError"),
        (ModuleNotFoundError("No module named 'ctsync.io.netlink'"), "netlink support"),
    ],
)
def test_dump_errors_are_one_line_exit_1(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, needle: str
) -> None:
    monkeypatch.setattr(cli_main, "_dump_table", FakeDump(error))
    result = table("ipv4")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_enobufs_names_the_errno(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        cli_main, "_dump_table", FakeDump(OSError(errno.ENOBUFS, "No buffer space available"))
    )
    assert table("ipv4").stderr == (
        "error: cannot read the ipv4 conntrack table: no buffer space available (ENOBUFS)\n"
    )


def test_default_dump_goes_through_io_netlink(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a monkeypatched indirection the command imports ctsync.io.netlink lazily."""
    import types

    fake_module = types.ModuleType("ctsync.io.netlink")
    seen: list[int] = []

    def dump_table(family: int) -> list[Entry]:
        seen.append(family)
        return [TCP6]

    fake_module.__dict__["dump_table"] = dump_table
    monkeypatch.setitem(sys.modules, "ctsync.io.netlink", fake_module)
    assert cli_main._dump_table is cli_main._netlink_dump_table
    result = table("ipv6")
    assert result.exit_code == 0
    assert seen == [AF_INET6]
    assert result.stdout == render_conntrack_table([TCP6]) + "\n"


@pytest.mark.parametrize(
    "args",
    [
        ("ipv5",),
        (),
        ("ipv4", "--mark", "notanumber"),
        ("ipv4", "--mark", "1/zz"),
        ("ipv4", "--mark", "0x100000000"),
        ("ipv4", "--src", "300.1.1.1"),
        ("ipv4", "-d", "192.0.2.0/33"),
        ("ipv4", "-s", "2001:db8::1"),  # IPv6 address on the IPv4 table
        ("ipv6", "-d", "192.0.2.1"),
        ("ipv4", "-p", "nosuchproto"),
        ("ipv4", "-p", "256"),
        ("ipv4", "--sport", "70000"),
        ("ipv4", "--dport", "http"),
        ("ipv4", "-w", "-1"),
        ("ipv4", "--state", "DANCING"),
        ("ipv4", "--no-such-option"),
    ],
)
def test_usage_errors_exit_2(fake_dump: FakeDump, args: tuple[str, ...]) -> None:
    result = table(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fake_dump.calls == []


def test_usage_error_messages_name_the_problem(fake_dump: FakeDump) -> None:
    assert "mark 'notanumber' is not a number" in table("ipv4", "-m", "notanumber").stderr
    assert "'300.1.1.1' is not an IPv4/IPv6 address" in table("ipv4", "-s", "300.1.1.1").stderr
    assert (
        "2001:db8::1 is an IPv6 address but the table is ipv4"
        in table("ipv4", "-s", "2001:db8::1").stderr
    )


def test_version() -> None:
    result = run("version")
    assert result.exit_code == 0
    assert result.stdout == f"ctsync {__version__}\n"
    assert run("--version").stdout == f"ctsync, version {__version__}\n"


def test_help_documents_exit_codes() -> None:
    for args in ((), ("show", "conntrack", "table")):
        result = run(*args, "--help")
        assert result.exit_code == 0
        assert "3 agent not running" in result.stdout
    assert "table" in run("show", "conntrack", "--help").stdout


def test_agent_unreachable_exits_3() -> None:
    error = AgentUnreachableError("control socket /run/ctsync/ctsync.sock: connection refused")
    assert error.exit_code == EXIT_AGENT_UNREACHABLE == 3
    assert isinstance(error, CliError)


def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ctsync", "version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"ctsync {__version__}\n"


# --- the pure filter predicate and its parsers ---------------------------------------------


def test_empty_filter_matches_everything() -> None:
    assert EntryFilter().is_empty
    assert all(EntryFilter().matches(e) for e in [*IPV4_TABLE, *IPV6_TABLE])


def test_filter_by_network_respects_family() -> None:
    v4 = EntryFilter(src=ipaddress.ip_network("0.0.0.0/0"))
    v6 = EntryFilter(src=ipaddress.ip_network("::/0"))
    assert v4.matches(TCP_PLAIN)
    assert not v4.matches(TCP6)
    assert v6.matches(TCP6)
    assert not v6.matches(TCP_PLAIN)


def test_filter_ports_need_a_port_protocol() -> None:
    icmp = Entry(orig=make_tuple("192.0.2.1", "198.51.100.1", 1, icmp_id=80))
    assert not EntryFilter(sport=0).matches(icmp)
    assert not EntryFilter(dport=0).matches(icmp)
    udp = Entry(orig=make_tuple("192.0.2.1", "198.51.100.1", IPPROTO_UDP, 0, 0))
    assert EntryFilter(sport=0, dport=0).matches(udp)


def test_filter_uses_original_direction_only() -> None:
    # TCP_SNAT's reply destination is the VIP; -d/--dst looks at the original only.
    assert not EntryFilter(dst=ipaddress.ip_network("203.0.113.5/32")).matches(TCP_SNAT)
    assert EntryFilter(dst=ipaddress.ip_network("203.0.113.5/32")).matches(TCP_DNAT)


def test_filter_state_without_protoinfo() -> None:
    assert not EntryFilter(state="ESTABLISHED").matches(Entry(orig=TCP_PLAIN.orig))


def test_parse_proto() -> None:
    assert parse_proto("tcp") == IPPROTO_TCP
    assert parse_proto("UDP") == IPPROTO_UDP
    assert parse_proto("icmp6") == parse_proto("icmpv6") == IPPROTO_ICMPV6
    assert parse_proto("0") == 0
    assert parse_proto("255") == 255
    for bad in ("256", "-1", "tcpx", ""):
        with pytest.raises(ValueError):
            parse_proto(bad)


def test_parse_network() -> None:
    assert parse_network("192.0.2.7/24") == ipaddress.ip_network("192.0.2.0/24")
    assert parse_network("2001:db8::1") == ipaddress.ip_network("2001:db8::1/128")
    for bad in ("300.1.1.1", "192.0.2.0/33", "host.example", "2001:db8::/129"):
        with pytest.raises(ValueError):
            parse_network(bad)


def test_parse_mark() -> None:
    assert parse_mark("16") == (16, 0xFFFFFFFF)
    assert parse_mark("0x10/0xf0") == (0x10, 0xF0)
    assert parse_mark("4294967295") == (0xFFFFFFFF, 0xFFFFFFFF)
    for bad in ("notanumber", "1/", "/1", "4294967296", "-1", "1/0x1ffffffff"):
        with pytest.raises(ValueError):
            parse_mark(bad)


def test_parse_port_zone_state() -> None:
    assert parse_port("0") == 0
    assert parse_port("65535") == 65535
    assert parse_zone("0x10") == 16
    for bad in ("65536", "-1", "ssh"):
        with pytest.raises(ValueError):
            parse_port(bad)
    for bad in ("65536", "-1", "zone"):
        with pytest.raises(ValueError):
            parse_zone(bad)
    assert parse_state("established") == "ESTABLISHED"
    assert parse_state("time-wait") == "TIME_WAIT"
    assert parse_state("LISTEN") == "SYN_SENT2"
    assert parse_state("cookie_echoed") == "COOKIE_ECHOED"
    with pytest.raises(ValueError):
        parse_state("DANCING")
