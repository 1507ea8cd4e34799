"""``ctsync tracking``: the settings table, value validation and formatting, and the commands
over a fake ``/proc/sys/net/netfilter`` directory (no root, no kernel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ctsync.cli import main as cli_main
from ctsync.cli import tracking_cmd
from ctsync.core import tracking
from ctsync.core.tracking import (
    MAX_TIMEOUT,
    SETTINGS,
    Kind,
    format_value,
    json_value,
    lookup,
    parse_value,
    readings,
    render_text,
    to_json,
)
from ctsync.io.sysctl import Sysctls

# What a non-initial namespace shows on a 6.x kernel (nf_conntrack_max & co. read-only there).
PROC: dict[str, tuple[str, int]] = {
    "nf_conntrack_acct": ("0", 0o644),
    "nf_conntrack_buckets": ("262144", 0o444),
    "nf_conntrack_checksum": ("1", 0o644),
    "nf_conntrack_count": ("12", 0o444),
    "nf_conntrack_events": ("2", 0o644),
    "nf_conntrack_expect_max": ("4096", 0o444),
    "nf_conntrack_generic_timeout": ("600", 0o644),
    "nf_conntrack_icmp_timeout": ("30", 0o644),
    "nf_conntrack_max": ("262144", 0o444),
    "nf_conntrack_tcp_be_liberal": ("0", 0o644),
    "nf_conntrack_tcp_loose": ("1", 0o644),
    "nf_conntrack_tcp_max_retrans": ("3", 0o644),
    "nf_conntrack_tcp_timeout_established": ("432000", 0o644),
    "nf_conntrack_tcp_timeout_syn_recv": ("60", 0o644),
    "nf_conntrack_timestamp": ("0", 0o644),
    "nf_conntrack_udp_timeout": ("30", 0o644),
    "nf_conntrack_udp_timeout_stream": ("120", 0o644),
    "nf_conntrack_frag6_timeout": ("60", 0o644),  # not a tracking setting: not shown
}


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, (value, mode) in PROC.items():
        path = tmp_path / name
        path.write_text(value + "\n")
        path.chmod(mode)
    (tmp_path / "nf_log").mkdir()
    monkeypatch.setattr(tracking_cmd, "_sysctls", lambda: Sysctls(tmp_path))
    return tmp_path


def value_of(proc: Path, name: str) -> str:
    return (proc / name).read_text().strip()


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main.cli, ["tracking", *args], prog_name="ctsync")


# --- the table -----------------------------------------------------------------------------


def test_names_are_unique_and_routeros_like() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    assert len({s.sysctl for s in SETTINGS}) == len(SETTINGS)
    assert all(n == n.lower() and "_" not in n for n in names)
    assert all(s.sysctl.startswith("nf_conntrack_") for s in SETTINGS)
    assert all(s.name.endswith("-timeout") for s in SETTINGS if s.kind is Kind.DURATION)
    assert {
        "tcp-established-timeout",
        "tcp-syn-sent-timeout",
        "tcp-syn-received-timeout",
        "tcp-fin-wait-timeout",
        "tcp-close-wait-timeout",
        "tcp-last-ack-timeout",
        "tcp-time-wait-timeout",
        "tcp-close-timeout",
        "tcp-unacked-timeout",
        "tcp-max-retrans-timeout",
        "udp-timeout",
        "udp-stream-timeout",
        "icmp-timeout",
        "icmpv6-timeout",
        "generic-timeout",
        "loose-tcp-tracking",
        "liberal-tcp-tracking",
        "accounting",
        "timestamps",
        "events",
        "max-entries",
        "total-entries",
        "buckets",
    } <= set(names)


@pytest.mark.parametrize(
    ("name", "sysctl"),
    [
        ("tcp-established-timeout", "nf_conntrack_tcp_timeout_established"),
        ("TCP_ESTABLISHED_TIMEOUT", "nf_conntrack_tcp_timeout_established"),
        ("nf_conntrack_tcp_loose", "nf_conntrack_tcp_loose"),
        ("net.netfilter.nf_conntrack_acct", "nf_conntrack_acct"),
        ("be-liberal", "nf_conntrack_tcp_be_liberal"),
        ("tcp-syn-recv-timeout", "nf_conntrack_tcp_timeout_syn_recv"),
        ("sctp-shutdown-ack-sent-timeout", "nf_conntrack_sctp_timeout_shutdown_ack_sent"),
        ("dccp-request-timeout", "nf_conntrack_dccp_timeout_request"),
    ],
)
def test_lookup(name: str, sysctl: str) -> None:
    assert lookup(name).sysctl == sysctl


def test_lookup_unknown() -> None:
    with pytest.raises(ValueError, match="unknown setting 'tcp-foo'"):
        lookup("tcp-foo")


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "raw"),
    [
        ("tcp-established-timeout", "1d", 86400),
        ("tcp-established-timeout", "1d2h3m4s", 93784),
        ("tcp-established-timeout", "3600", 3600),
        ("udp-timeout", "30s", 30),
        ("udp-timeout", "00:01:00", 60),
        ("udp-timeout", f"{MAX_TIMEOUT}", MAX_TIMEOUT),
        ("loose-tcp-tracking", "yes", 1),
        ("loose-tcp-tracking", "No", 0),
        ("accounting", "on", 1),
        ("accounting", "false", 0),
        ("events", "auto", 2),
        ("events", "yes", 1),
        ("events", "0", 0),
        ("tcp-max-retrans", "5", 5),
        ("max-entries", "1048576", 1048576),
    ],
)
def test_parse_value(name: str, text: str, raw: int) -> None:
    assert parse_value(lookup(name), text) == raw


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("tcp-established-timeout", "1x", "not a duration"),
        ("tcp-established-timeout", "0s", "out of range 1s..3w3d20h31m23s"),
        ("tcp-established-timeout", "25d", "out of range"),
        ("udp-timeout", "-1", "not a duration"),
        ("loose-tcp-tracking", "maybe", "not yes or no"),
        ("loose-tcp-tracking", "2", "not yes or no"),
        ("events", "3", "out of range 0..2"),
        ("events", "sometimes", "not one of no, yes, auto"),
        ("tcp-max-retrans", "256", "out of range 0..255"),
        ("tcp-max-retrans", "1.5", "not a non-negative integer"),
        ("max-entries", "0", "out of range"),
    ],
)
def test_parse_value_rejects(name: str, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_value(lookup(name), text)


def test_format_and_json_values() -> None:
    assert format_value(lookup("tcp-established-timeout"), 432000) == "5d"
    assert format_value(lookup("tcp-established-timeout"), 431999) == "4d23h59m59s"
    assert format_value(lookup("loose-tcp-tracking"), 1) == "yes"
    assert format_value(lookup("events"), 2) == "auto"
    assert format_value(lookup("events"), 7) == "7"
    assert format_value(lookup("max-entries"), 262144) == "262144"
    assert json_value(lookup("accounting"), 0) is False
    assert json_value(lookup("events"), 1) == "yes"
    assert json_value(lookup("udp-timeout"), 30) == 30


def test_readings_keep_table_order_and_writability() -> None:
    values = {name: value for name, (value, _) in PROC.items()}
    values["nf_conntrack_icmp_timeout"] = "garbage"
    writable = {name for name, (_, mode) in PROC.items() if mode & 0o200}
    writable.add("nf_conntrack_count")  # even if a kernel said so: the count is never written
    rows = readings(values, writable)
    names = [r.setting.name for r in rows]
    assert names[:2] == ["tcp-syn-received-timeout", "tcp-established-timeout"]
    assert "icmp-timeout" not in names  # unparsable: skipped
    assert "frag6" not in " ".join(names)
    by_name = {r.setting.name: r for r in rows}
    assert by_name["max-entries"].writable is False
    assert by_name["total-entries"].writable is False
    assert by_name["udp-timeout"].writable is True
    assert by_name["tcp-established-timeout"].text == "5d"


def test_render_text_and_json() -> None:
    rows = readings({"nf_conntrack_udp_timeout": "30", "nf_conntrack_tcp_loose": "1"}, set())
    assert render_text("auto", rows) == (
        "           enabled: auto\n       udp-timeout: 30s\nloose-tcp-tracking: yes"
    )
    data = to_json("auto", rows)
    assert data["schema"] == "ctsync.tracking/v1" and data["enabled"] == "auto"
    assert data["settings"][0] == {
        "name": "udp-timeout",
        "value": 30,
        "text": "30s",
        "kind": "duration",
        "sysctl": "net.netfilter.nf_conntrack_udp_timeout",
        "writable": False,
    }
    assert data["settings"][1]["value"] is True


# --- the sysctl adapter and the commands ------------------------------------------------------


def test_sysctls_adapter(proc: Path, tmp_path: Path) -> None:
    sysctls = Sysctls(proc)
    assert sysctls.loaded()
    values = sysctls.read_all()
    assert values["nf_conntrack_max"] == "262144" and "nf_log" not in values
    assert "nf_conntrack_max" not in sysctls.writable()
    assert "nf_conntrack_acct" in sysctls.writable()
    sysctls.write("nf_conntrack_acct", 1)
    assert value_of(proc, "nf_conntrack_acct") == "1"
    assert sysctls.read("nf_conntrack_nothing") is None
    empty = Sysctls(tmp_path / "absent")
    assert not empty.loaded() and empty.read_all() == {} and empty.writable() == frozenset()


def test_show(proc: Path) -> None:
    result = run()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].strip() == "enabled: auto"
    assert "tcp-established-timeout: 5d" in result.stdout
    assert "loose-tcp-tracking: yes" in result.stdout
    assert "total-entries: 12" in result.stdout
    # Same colon column on every line (RouterOS print).
    assert len({line.index(":") for line in lines}) == 1
    data = json.loads(run("--json").stdout)
    assert json.loads(run("show", "--json").stdout) == data
    assert {s["name"]: s["value"] for s in data["settings"]}["udp-stream-timeout"] == 120


def test_show_without_conntrack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking_cmd, "_sysctls", lambda: Sysctls(tmp_path / "none"))
    result = run()
    assert result.exit_code == 0 and result.stdout.strip() == "enabled: no"
    result = run("set", "udp-timeout", "10s")
    assert result.exit_code == 1
    assert "nf_conntrack is not loaded" in result.stderr


def test_set_round_trip(proc: Path) -> None:
    result = run(
        "set", "tcp-established-timeout", "1d", "udp-timeout", "45", "loose-tcp-tracking", "no"
    )
    assert result.exit_code == 0, result.output
    assert value_of(proc, "nf_conntrack_tcp_timeout_established") == "86400"
    assert value_of(proc, "nf_conntrack_udp_timeout") == "45"
    assert value_of(proc, "nf_conntrack_tcp_loose") == "0"
    assert result.stdout.splitlines() == [
        "tcp-established-timeout: 1d",
        "            udp-timeout: 45s",
        "     loose-tcp-tracking: no",
    ]
    data = json.loads(run("set", "nf_conntrack_acct", "yes", "--json").stdout)
    assert data["settings"] == [
        {
            "name": "accounting",
            "value": True,
            "text": "yes",
            "kind": "bool",
            "sysctl": "net.netfilter.nf_conntrack_acct",
            "writable": True,
        }
    ]
    shown = json.loads(run("--json").stdout)
    values = {s["name"]: s["value"] for s in shown["settings"]}
    assert values["tcp-established-timeout"] == 86400 and values["accounting"] is True


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["udp-timeout", "10s", "tcp-established-timeout", "1x"], 2, "not a duration"),
        (["udp-timeout", "10s", "nope", "1"], 2, "unknown setting 'nope'"),
        (["udp-timeout"], 2, "has no value"),
        (["udp-timeout", "10s", "udp_timeout", "20s"], 2, "given twice"),
        (["udp-timeout", "10s", "max-entries", "1000"], 1, "max-entries is read-only in this"),
        (["udp-timeout", "10s", "total-entries", "5"], 1, "kernel maintains it"),
        (["udp-timeout", "10s", "buckets", "1024"], 1, "read-only"),
        (["udp-timeout", "10s", "enabled", "yes"], 1, "enabled is read-only"),
        (["udp-timeout", "10s", "gre-timeout", "30s"], 1, "does not exist in this kernel"),
    ],
)
def test_set_refuses_and_writes_nothing(
    proc: Path, args: list[str], code: int, message: str
) -> None:
    before = {p.name: p.read_text() for p in proc.iterdir() if p.is_file()}
    result = run("set", *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert {p.name: p.read_text() for p in proc.iterdir() if p.is_file()} == before


def test_set_reports_a_kernel_refusal(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Refusing(Sysctls):
        def write(self, name: str, value: int) -> None:
            if name == "nf_conntrack_udp_timeout":
                raise OSError(22, "Invalid argument")
            super().write(name, value)

    monkeypatch.setattr(tracking_cmd, "_sysctls", lambda: Refusing(proc))
    result = run("set", "icmp-timeout", "20s", "udp-timeout", "10s")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: cannot set udp-timeout (net.netfilter.nf_conntrack_udp_timeout):"
        " invalid argument (EINVAL) (already set: icmp-timeout)"
    )


def test_group_json_before_set_is_refused(proc: Path) -> None:
    result = run("--json", "set", "udp-timeout", "10s")
    assert result.exit_code == 2
    assert value_of(proc, "nf_conntrack_udp_timeout") == "30"


def test_read_only_reason_texts() -> None:
    assert "initial namespace" in tracking.read_only_reason(lookup("max-entries"))
    assert "kernel maintains" in tracking.read_only_reason(lookup("total-entries"))
