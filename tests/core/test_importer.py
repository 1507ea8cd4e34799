"""``ctsync config import-conntrackd``: conntrackd.conf in, ctsync TOML and notices out.

The data files are Debian's example configurations (conntrackd 1:1.4.7, copied from
/usr/share/doc/conntrackd/examples/ and /etc/conntrackd/) and two files rendered from VyOS's
template (vyos-1x data/templates/conntrackd/conntrackd.conf.j2) for a multicast and a unicast
``service conntrack-sync``. Each converts, validates, and the notices list exactly what was
dropped or changed.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ctsync.cli import main as cli_main
from ctsync.config import Config, load_config, loads_config
from ctsync.importer import (
    ConntrackdSyntaxError,
    ImportResult,
    import_conntrackd,
    parse_conntrackd,
    tokenize,
)

DATA = Path(__file__).parent / "data" / "conntrackd"
PACKAGE_EXAMPLES = Path("/usr/share/doc/conntrackd/examples")

# The General section of Debian's three sync examples (identical in all three).
DEBIAN_GENERAL_DROPPED = [
    "General.HashSize",
    "General.HashLimit",
    "General.LogFile",
    "General.LockFile",
    "General.UNIX.Path",
]
# What VyOS's template always renders and ctsync does not carry over.
VYOS_DROPPED = [
    "Helper",
    "General.HashSize",
    "General.HashLimit",
    "General.LockFile",
    "General.UNIX.Path",
    "General.NetlinkOverrunResync",
    "General.NetlinkEventsReliable",
]

EXPECTED: dict[str, dict[str, object]] = {
    "debian-sync-ftfw.conf": {
        "dropped": DEBIAN_GENERAL_DROPPED,
        "changed": ["General.NetlinkBufferSize*"],
        "sync": {
            "interface": "eth2",
            "mcast_group": "225.0.0.50",
            "port": 3780,
            "listen_address": "192.168.100.100",
            "accept_protocol": ["tcp", "sctp", "dccp"],
            "ignore_address": [
                "127.0.0.1",
                "192.168.0.100",
                "192.168.1.100",
                "192.168.0.1",
                "192.168.1.1",
                "192.168.100.100",
            ],
            "event_listen_queue_size": 8,
            "sync_queue_size": 2,  # 1249280 bytes, rounded up to whole MiB
            "expect_sync": [],
        },
    },
    "debian-sync-notrack.conf": {
        "dropped": DEBIAN_GENERAL_DROPPED,
        "changed": ["Sync.Mode NOTRACK", "General.NetlinkBufferSize*"],
        "sync": {"interface": "eth2", "port": 3780, "sync_queue_size": 2},
    },
    "debian-sync-alarm.conf": {
        "dropped": [
            "Sync.Mode ALARM.RefreshTime",
            "Sync.Mode ALARM.CacheTimeout",
            *DEBIAN_GENERAL_DROPPED,
        ],
        "changed": ["Sync.Mode ALARM", "General.NetlinkBufferSize*"],
        "sync": {"interface": "eth2", "listen_address": "192.168.100.100"},
    },
    "vyos-multicast.conf": {
        "dropped": [*VYOS_DROPPED[:3], "General.Syslog", *VYOS_DROPPED[3:]],
        "changed": ["Sync.Options.ExpectationSync", "General.NetlinkBufferSize*"],
        "sync": {
            "interface": None,
            "accept_protocol": ["tcp", "udp", "icmp", "icmp6"],
            "ignore_address": ["192.0.2.1", "192.0.2.254", "198.51.100.0/24", "2001:db8::1"],
            "expect_sync": ["ftp", "sip", "h323"],
            "startup_resync": True,
            "disable_external_cache": False,
            "event_listen_queue_size": 8,
            "sync_queue_size": 1,
        },
        "links": [
            ("eth1", "225.0.0.50", 3780, "192.0.2.1"),
            ("eth2", "225.0.0.50", 3781, "198.51.100.1"),
        ],
    },
    "vyos-unicast.conf": {
        "dropped": VYOS_DROPPED,
        "changed": ["General.NetlinkBufferSize*"],
        "sync": {
            "interface": "eth1",
            "peer": ["192.0.2.2"],
            "port": 3781,
            "listen_address": "192.0.2.1",
            "accept_protocol": ["tcp"],
            "expect_sync": ["all"],
            "disable_external_cache": True,
            "startup_resync": False,
            "event_listen_queue_size": 16,
            "sync_queue_size": 8,
        },
    },
}


def _import(name: str) -> ImportResult:
    return import_conntrackd((DATA / name).read_text(), name)


def _value(config: Config, attr: str) -> object:
    value = getattr(config.sync, attr)
    if isinstance(value, list):
        return [str(v) for v in value]
    return None if value is None else value if isinstance(value, int | bool) else str(value)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_examples_convert_validate_and_list_what_was_dropped(name: str) -> None:
    expected = EXPECTED[name]
    result = _import(name)
    config = loads_config(result.toml)  # validates (no file checks)

    assert [n.directive for n in result.dropped] == expected["dropped"]
    assert [n.directive for n in result.changed] == expected["changed"]
    assert len(result.actions) == 3  # node-id, key file, keepalived hooks
    for attr, want in dict(expected["sync"]).items():  # type: ignore[call-overload]
        assert _value(config, attr) == want, attr
    links = [
        (link.interface, str(link.mcast_group), link.port, str(link.listen_address))
        for link in config.sync.link
    ]
    assert links == expected.get("links", [])
    assert config.node_id == 1
    assert str(config.auth.key_file) == "/etc/ctsync/sync.key"
    assert not config.auth.allow_unauthenticated
    assert config.failover.mechanism == "keepalived"
    # The notices are in the output too, as comments, with their line numbers.
    header = result.toml.split("\nnode-id", 1)[0]
    for notice in result.notices:
        if notice.line:
            assert f"line {notice.line}: {notice.directive}:" in header
    assert "CHANGE ME" in result.toml


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_passes_config_check_except_for_the_key_file(name: str, tmp_path: Path) -> None:
    out = tmp_path / "ctsync.toml"
    out.write_text(_import(name).toml)
    runner = CliRunner()
    ok = runner.invoke(cli_main.cli, ["config", "check", "--no-file-checks", str(out)])
    assert ok.exit_code == 0, ok.output
    full = runner.invoke(cli_main.cli, ["config", "check", str(out)])
    # Only the key file is missing (it is /etc/ctsync/sync.key, absent here).
    if not Path("/etc/ctsync/sync.key").exists():
        assert full.exit_code == 1
        assert full.stderr.strip().splitlines() == [
            line for line in full.stderr.strip().splitlines() if "auth.key-file" in line
        ]
        assert "auth.key-file" in full.stderr


def test_with_a_key_file_the_import_loads_completely(tmp_path: Path) -> None:
    key = tmp_path / "sync.key"
    key.write_text("k" * 48)
    key.chmod(stat.S_IRUSR | stat.S_IWUSR)
    text = _import("debian-sync-ftfw.conf").toml.replace("/etc/ctsync/sync.key", str(key))
    out = tmp_path / "ctsync.toml"
    out.write_text(text)
    config = load_config(out)  # with the file checks
    assert config.sync.interface == "eth2"


@pytest.mark.parametrize("name", ["debian-stats.conf", "debian-etc-conntrackd.conf"])
def test_stats_mode_configurations_have_nothing_to_import(name: str) -> None:
    with pytest.raises(ConntrackdSyntaxError, match="statistics-mode") as info:
        _import(name)
    assert info.value.line > 0


def test_every_packaged_example_is_covered() -> None:
    """Whatever example conntrackd.conf the installed package ships is in the test data."""
    names = {
        "sync/ftfw/conntrackd.conf": "debian-sync-ftfw.conf",
        "sync/notrack/conntrackd.conf": "debian-sync-notrack.conf",
        "sync/alarm/conntrackd.conf": "debian-sync-alarm.conf",
        "stats/conntrackd.conf": "debian-stats.conf",
    }
    for path in sorted(PACKAGE_EXAMPLES.glob("**/conntrackd.conf")):
        relative = str(path.relative_to(PACKAGE_EXAMPLES))
        assert relative in names, f"new example {relative}: copy it to {DATA} and test it"
        assert path.read_bytes() == (DATA / names[relative]).read_bytes()
    for copy in names.values():
        assert (DATA / copy).exists()


# --------------------------------------------------------------------------- grammar


def test_tokens_comments_quotes_and_braces() -> None:
    tokens = tokenize('Sync{ # comment {\n  Interface "eth 1"}#x\nGeneral {}')
    assert [(t.text, t.line, t.quoted) for t in tokens] == [
        ("Sync", 1, False),
        ("{", 1, False),
        ("Interface", 2, False),
        ("eth 1", 2, True),
        ("}", 2, False),
        ("General", 3, False),
        ("{", 3, False),
        ("}", 3, False),
    ]


def test_newlines_do_not_matter() -> None:
    one_line = (
        "Sync { Mode FTFW { StartupResync on } UDP Default { IPv4_address 192.0.2.1 "
        "IPv4_Destination_Address 192.0.2.2 Port 3799 Interface eth1 } } "
        "General { Filter { State Accept { ESTABLISHED CLOSED for TCP } "
        "Address Ignore { IPv4_address 192.0.2.0/24 IPv6_address 2001:db8::/32 } } }"
    )
    config = loads_config(import_conntrackd(one_line).toml)
    assert config.sync.peer[0].compressed == "192.0.2.2"
    assert config.sync.port == 3799
    assert config.sync.startup_resync
    assert config.sync.tcp_states == ["ESTABLISHED", "CLOSE"]
    assert config.sync.ignore_address == ["192.0.2.0/24", "2001:db8::/32"]


def test_tree_shape() -> None:
    nodes = parse_conntrackd(
        "General { Filter From Kernelspace { Protocol Accept { TCP UDP } } UNIX { Path /x } }"
    )
    general = nodes[0]
    assert general.name == "General"
    children = general.children or []
    assert [c.name for c in children] == ["Filter", "UNIX"]
    assert children[0].args == ["From", "Kernelspace"]
    protocol = (children[0].children or [])[0]
    assert (protocol.name, protocol.args) == ("Protocol", ["Accept"])
    assert [t.text for t in protocol.words or []] == ["TCP", "UDP"]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("Sync {\n  Mode FTFW {\n  Bogus 1\n  }\n}", 3, "unknown directive 'Bogus' in Mode"),
        ("Sync {\n Multicast {\n Interface eth1\n", 2, "missing '}'"),
        ("General { }\n}", 2, "'}' without a matching '{'"),
        ("General {\n HashSize\n}", 3, "HashSize needs a value"),
        ("General {\n HashSize big\n}\nSync { UDP { Port 1 } }", 2, "expected a number"),
        ("Sync {\n Mode FTFW {\n StartupResync maybe\n } }", 3, "expected on/off"),
        ("Sync { UDP {\n IPv4_address 192.0.2.300 } }", 2, "expected an IP address"),
        ("General {\n LockFile relative/path }", 2, "expected an absolute path"),
        ("Sync {\n Mode FAST { } }", 2, "unknown mode 'FAST'"),
        ("Sync { Multicast { Interface a }\n UDP { Interface b } }", 2, "cannot mix"),
        ("Sync { Multicast { Port 1 } }", 1, "Port does not apply to a Multicast block"),
        ("Sync {\n Multicast Primary { } }", 2, "expected 'Default'"),
        ("Sync { Mode FTFW { } }", 0, "no Multicast, UDP or TCP block"),
        ("General { HashSize 1 }", 0, "no Sync section"),
        ("Sync { Multicast { } }\nStats { LogFile on }", 2, "Stats and Sync"),
        ('General { LogFile "unterminated\n }', 1, "unterminated quoted string"),
        ("General {\n Filter {\n State Accept { ESTABLISHED } } }", 3, "end with 'for TCP'"),
        (
            "Sync {" + " Multicast { Interface a }" * 5 + " }",
            1,
            "too many dedicated links",
        ),
    ],
)
def test_syntax_errors_name_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConntrackdSyntaxError) as info:
        import_conntrackd(text)
    assert info.value.line == line
    assert message in str(info.value)


# --------------------------------------------------------------------------- mapping


def _notices(result: ImportResult, kind: str) -> dict[str, str]:
    return {n.directive: n.message for n in result.notices if n.kind == kind}


def test_quoted_values() -> None:
    result = import_conntrackd(
        'Sync { Multicast { Interface "eth1" } }\nGeneral { LogFile "/var/log/c t.log" }'
    )
    assert loads_config(result.toml).sync.interface == "eth1"
    assert [n.directive for n in result.dropped] == ["General.LogFile"]


def test_tcp_link_becomes_unicast_udp_and_extra_addresses_are_reported() -> None:
    result = import_conntrackd(
        """Sync {
            Mode FTFW { ResendQueueSize 4194304  ACKWindowSize 100  CommitTimeout 180 }
            TCP {
                IPv4_address 192.0.2.9
                IPv4_address 192.0.2.1
                IPv4_Destination_Address 192.0.2.2
                Port 3780
                Interface eth1
                Checksum off
                ErrorQueueLength 256
            }
            Options { TCPWindowTracking on }
        }"""
    )
    config = loads_config(result.toml)
    assert str(config.sync.listen_address) == "192.0.2.1"  # the last one, as conntrackd
    assert [str(p) for p in config.sync.peer] == ["192.0.2.2"]
    assert config.sync.commit_timeout == 180
    assert config.sync.resend_queue_size == 32  # 4M entries x 8 bytes
    assert set(_notices(result, "dropped")) == {
        "Sync.TCP.IPv4_address",
        "Sync.Mode FTFW.ACKWindowSize",
        "Sync.TCP.Checksum",
        "Sync.TCP.ErrorQueueLength",
        "Sync.Options.TCPWindowTracking",
    }
    assert set(_notices(result, "changed")) == {"Sync.TCP", "Sync.Mode FTFW.ResendQueueSize"}
    assert "the last one (192.0.2.1)" in _notices(result, "dropped")["Sync.TCP.IPv4_address"]


def test_default_link_goes_first_and_ipv6_multicast() -> None:
    result = import_conntrackd(
        """Sync {
            Multicast { IPv6_address ff02::1:50 Group 3780 Interface eth1 IPv6_interface fe80::1 }
            Multicast Default { IPv6_address ff02::1:51 Group 3781 Interface eth2 }
        }"""
    )
    config = loads_config(result.toml)
    assert [link.interface for link in config.sync.link] == ["eth2", "eth1"]
    assert [str(link.mcast_group) for link in config.sync.link] == ["ff02::1:51", "ff02::1:50"]
    assert "Sync.Multicast Default" in _notices(result, "changed")
    assert "Sync.Multicast.IPv6_interface" in _notices(result, "dropped")


def test_filters_ignore_forms_and_kernel_helper_names() -> None:
    result = import_conntrackd(
        """Sync { Multicast { IPv4_address 225.0.0.50 Group 3780 Interface eth1 }
                  Options { ExpectationSync { ftp RAS q.931 rpc irc } } }
           General {
             Filter From Kernelspace {
               Protocol Ignore { UDP }
               Address Accept { IPv4_address 192.0.2.0/24 }
               State Ignore { SYN_SENT SYN_RECV for TCP }
             }
             Filter { Protocol Accept { TCP ESP GRE bogus } }
             PollSecs 15
             Scheduler { Type FIFO Priority 50 }
             Nice -5
             Systemd off
             NetlinkOverrunResync 30
           }"""
    )
    config = loads_config(result.toml)
    assert config.sync.expect_sync == ["ftp", "h323", "nfs"]
    assert config.sync.accept_protocol == ["tcp", "50", "gre"]
    assert config.sync.tcp_states == [
        "ESTABLISHED",
        "FIN_WAIT",
        "CLOSE_WAIT",
        "LAST_ACK",
        "TIME_WAIT",
        "CLOSE",
        "LISTEN",
    ]
    assert config.sync.ignore_address == []
    assert set(_notices(result, "dropped")) == {
        "Sync.Options.ExpectationSync irc",
        "General.Filter.Protocol Ignore",
        "General.Filter.Address Accept",
        "General.Filter.Protocol Accept bogus",
        "General.PollSecs",
        "General.Scheduler",
        "General.Nice",
        "General.Systemd",
        "General.NetlinkOverrunResync",
    }
    assert set(_notices(result, "changed")) == {
        "General.Filter",  # From Kernelspace
        "General.Filter.State Ignore",  # written as the complement
        "Sync.Options.ExpectationSync",  # h323 covers h.245 too
    }


def test_settings_that_match_ctsync_produce_no_notice() -> None:
    result = import_conntrackd(
        """Sync { Mode ftfw { DisableExternalCache Off PurgeTimeout 30 }
                  Multicast { IPv4_address 225.0.0.51 Group 3790 Interface eth1 Checksum on }
                  Options { TCPWindowTracking off ExpectationSync off } }
           General { LogFile off Syslog off NetlinkEventsReliable no Systemd yes
                     Filter From Userspace { Address Ignore { IPv4_address 192.0.2.1 } } }"""
    )
    assert result.dropped == []
    assert result.changed == []
    config = loads_config(result.toml)
    assert config.sync.purge_timeout == 30
    assert str(config.sync.mcast_group) == "225.0.0.51"
    assert config.sync.port == 3790
    assert config.sync.expect_sync == []


# --------------------------------------------------------------------------- CLI


def test_cli_prints_toml_on_stdout_and_notices_on_stderr() -> None:
    path = DATA / "debian-sync-ftfw.conf"
    result = CliRunner().invoke(cli_main.cli, ["config", "import-conntrackd", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == _import("debian-sync-ftfw.conf").toml
    lines = result.stderr.splitlines()
    assert lines[0].endswith("action: set node-id (written as 1): each node needs its own number")
    assert f"{path}:256: not carried over: General.HashSize:" in result.stderr
    assert len(lines) == 9  # 3 actions, 5 dropped, 1 changed


def test_cli_writes_the_output_file_and_does_not_overwrite(tmp_path: Path) -> None:
    path = DATA / "vyos-unicast.conf"
    out = tmp_path / "ctsync.toml"
    runner = CliRunner()
    first = runner.invoke(cli_main.cli, ["config", "import-conntrackd", str(path), "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert first.stdout == ""
    assert loads_config(out.read_text()).sync.interface == "eth1"
    out.write_text("keep me")
    again = runner.invoke(cli_main.cli, ["config", "import-conntrackd", str(path), "-o", str(out)])
    assert again.exit_code == 1
    assert "exists; use --force" in again.stderr
    assert out.read_text() == "keep me"
    forced = runner.invoke(
        cli_main.cli, ["config", "import-conntrackd", str(path), "-o", str(out), "--force"]
    )
    assert forced.exit_code == 0
    assert out.read_text().startswith("# ctsync configuration imported from")


def test_cli_reads_stdin_and_fails_with_one_line() -> None:
    runner = CliRunner()
    ok = runner.invoke(
        cli_main.cli,
        ["config", "import-conntrackd", "-"],
        input="Sync { UDP { IPv4_Destination_Address 192.0.2.2 Port 3780 Interface eth1 } }",
    )
    assert ok.exit_code == 0, ok.output
    assert "from stdin" in ok.stdout
    bad = runner.invoke(
        cli_main.cli, ["config", "import-conntrackd", str(DATA / "debian-stats.conf")]
    )
    assert bad.exit_code == 1
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: ") and "line 106" in bad.stderr
