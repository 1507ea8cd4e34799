"""The TOML configuration: defaults, validation errors that name their key, file checks, CLI."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ctsync import config as cfg
from ctsync.cli import config_cmd
from ctsync.cli import main as cli_main
from ctsync.config import Config, ConfigError, check_files, load_config, loads_config
from ctsync.core import record
from ctsync.core.entry import IPPROTO_TCP, IPPROTO_UDP, Entry, TcpInfo, TcpState, make_tuple

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [
    ROOT / "config" / name for name in ("ctsync.toml", "two-node-a.toml", "two-node-b.toml")
]
DOC = ROOT / "docs" / "configuration.md"

MINIMAL = """
node-id = 1
[sync]
interface = "eth1"
"""


def errors_of(text: str) -> dict[str, str]:
    """Load ``text``, expect a ConfigError, return {key: message}."""
    with pytest.raises(ConfigError) as info:
        loads_config(text)
    keys = [key for key, _ in info.value.errors]
    assert len(keys) == len(set(keys)), info.value.errors
    return dict(info.value.errors)


def with_sync(lines: str, rest: str = "") -> str:
    return f'node-id = 1\n[sync]\ninterface = "eth1"\n{lines}\n{rest}'


def write_key(directory: Path, content: bytes = b"k" * 48, mode: int = 0o600) -> Path:
    key = directory / "sync.key"
    key.write_bytes(content)
    key.chmod(mode)
    return key


def write_config(directory: Path, key: Path, extra: str = "") -> Path:
    path = directory / "ctsync.toml"
    path.write_text(f'{MINIMAL}\n[auth]\nkey-file = "{key}"\n{extra}')
    return path


# --------------------------------------------------------------------------- valid files


def test_minimal_config_and_vyos_defaults() -> None:
    config = loads_config(MINIMAL)
    sync = config.sync
    assert config.node_id == 1
    assert sync.mcast_group == IPv4Address("225.0.0.50")
    assert sync.port == 3780
    assert sync.event_listen_queue_size == 8
    assert sync.sync_queue_size == 1
    assert sync.event_listen_queue_bytes == 8 << 20
    assert sync.sync_queue_bytes == 1 << 20
    assert not sync.startup_resync
    assert not sync.disable_external_cache
    assert sync.purge_timeout == 60
    assert sync.commit_timeout_override is None
    assert sync.accept_protocol == sync.ignore_address == sync.tcp_states == []
    assert config.auth.key_file == Path("/etc/ctsync/sync.key")
    assert not config.auth.allow_unauthenticated
    assert config.failover.mechanism == "none"
    assert config.control.socket == Path("/run/ctsync/ctsync.sock")
    assert config.metrics.endpoint() is None
    assert (config.log.format, config.log.level) == ("auto", "info")
    assert config.warnings() == []
    (channel,) = sync.channels()
    assert channel == cfg.SyncChannel("eth1", 3780, IPv4Address("225.0.0.50"), (), None)
    assert not channel.unicast
    assert config.entry_filter().accepts_all


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(path, check_files=False)
    assert config.sync.interface == "eth1"
    assert config.failover.mechanism == "none"
    assert config.auth.key_file == Path("/etc/ctsync/sync.key")


def test_two_node_examples_differ_only_in_identity() -> None:
    a = load_config(EXAMPLES[1], check_files=False)
    b = load_config(EXAMPLES[2], check_files=False)
    assert (a.node_id, b.node_id) == (1, 2)
    assert a.sync.listen_address != b.sync.listen_address
    same = {"auth", "failover", "vrrp", "control", "metrics", "log"}
    assert a.model_dump(include=same) == b.model_dump(include=same)
    for config in (a, b):
        assert config.sync.listen_address is not None
        assert config.sync.listen_address in cfg.ipaddress.ip_network("192.0.2.0/24")


def test_full_config() -> None:
    config = loads_config(
        """
        node-id = 65535
        [sync]
        mcast-group = "ff02::1:50"
        accept-protocol = ["TCP", "udp", 1, "icmp6", "sctp", "dccp"]
        ignore-address = ["192.0.2.1", "198.51.100.7/24", "2001:db8::/64"]
        tcp-states = ["established", "time-wait", "SYN_RECV"]
        expect-sync = ["ftp", "h323"]
        event-listen-queue-size = 16
        event-listen-queue-max = 128
        sync-queue-size = 4
        startup-resync = true
        disable-external-cache = true
        commit-timeout = 180
        purge-timeout = 30
        alive-interval = 1
        peer-dead-after = 3.5
        digest-interval = 30
        [[sync.link]]
        interface = "eth1.100"
        listen-address = "2001:db8::1"
        [[sync.link]]
        interface = "eth2"
        mcast-group = "225.0.0.51"
        port = 3781
        [failover]
        mechanism = "vrrp"
        [[vrrp.instance]]
        name = "VI_1"
        interface = "eth0"
        virtual-router-id = 51
        priority = 150
        advert-int = 0.5
        virtual-address = ["203.0.113.1/24", "203.0.113.2"]
        [[vrrp.instance]]
        name = "VI_6"
        interface = "eth0"
        virtual-router-id = 51
        virtual-address = ["2001:db8:1::1/64"]
        unicast-peer = ["2001:db8:1::3"]
        [control]
        socket = "/run/ctsync/other.sock"
        [metrics]
        listen = "[::1]:9724"
        [log]
        format = "json"
        level = "debug"
        """
    )
    sync = config.sync
    assert sync.accept_protocol == ["tcp", "udp", "1", "icmp6", "sctp", "dccp"]
    assert sync.ignore_address == ["192.0.2.1", "198.51.100.0/24", "2001:db8::/64"]
    assert sync.tcp_states == ["ESTABLISHED", "TIME_WAIT", "SYN_RECV"]
    assert sync.expect_helpers() == {"ftp", "ras", "q.931", "h.245"}
    assert sync.commit_timeout_override == 180
    assert sync.alive_interval == 1.0
    assert sync.channels() == (
        cfg.SyncChannel(
            "eth1.100", 3780, IPv6Address("ff02::1:50"), (), IPv6Address("2001:db8::1")
        ),
        cfg.SyncChannel("eth2", 3781, IPv4Address("225.0.0.51"), (), None),
    )
    assert config.vrrp.instance[0].virtual_address == ["203.0.113.1/24", "203.0.113.2"]
    assert [i.family for i in config.vrrp.instance] == [4, 6]
    assert config.vrrp.instance[0].advert_centiseconds == 50
    assert config.metrics.endpoint() == ("::1", 9724)
    assert config.log.format == "json"


def test_unicast_link() -> None:
    config = loads_config(
        with_sync('peer = ["192.0.2.2", "192.0.2.3"]\nlisten-address = "192.0.2.1"')
    )
    (channel,) = config.sync.channels()
    assert channel.unicast
    assert channel.mcast_group is None
    assert channel.peers == (IPv4Address("192.0.2.2"), IPv4Address("192.0.2.3"))
    assert channel.version == 4


def test_empty_string_means_unset() -> None:
    config = loads_config(
        with_sync('listen-address = ""', '[failover]\nnotify-fifo = ""\n[metrics]\nlisten = ""')
    )
    assert config.sync.listen_address is None
    assert config.failover.notify_fifo is None
    assert config.metrics.endpoint() is None


@pytest.mark.parametrize(
    ("expect", "helpers"),
    [([], frozenset()), (["all"], None), (["nfs", "sqlnet", "sip"], {"rpc", "tns", "sip"})],
)
def test_expect_sync_helpers(expect: list[str], helpers: frozenset[str] | None) -> None:
    config = loads_config(with_sync(f"expect-sync = {json.dumps(expect)}"))
    assert config.sync.expect_helpers() == helpers


def test_entry_filter_is_built_from_the_config() -> None:
    config = loads_config(
        with_sync(
            'accept-protocol = ["tcp"]\nignore-address = ["192.0.2.0/24"]\n'
            'tcp-states = ["ESTABLISHED"]'
        )
    )
    entry_filter = config.entry_filter()

    def tcp(src: str, state: int = TcpState.ESTABLISHED) -> tuple[bytes, bytes]:
        orig = make_tuple(src, "203.0.113.1", IPPROTO_TCP, 40000, 443)
        return record.from_entry(Entry(orig, orig.inverted(), status=8, protoinfo=TcpInfo(state)))

    udp = make_tuple("198.51.100.2", "203.0.113.1", IPPROTO_UDP, 5000, 53)
    assert entry_filter.accepts(*tcp("198.51.100.2"))
    assert not entry_filter.accepts(*tcp("192.0.2.9"))
    assert not entry_filter.accepts(*tcp("198.51.100.2", TcpState.SYN_SENT))
    assert not entry_filter.accepts(*record.from_entry(Entry(udp, status=8)))


def test_metrics_listen_forms() -> None:
    assert cfg.parse_listen("127.0.0.1:9724") == ("127.0.0.1", 9724)
    assert cfg.parse_listen("[::]:9724") == ("::", 9724)
    assert cfg.parse_listen(":9724") == ("", 9724)
    for bad in ("9724", "::1:9724", "localhost:9724", "[192.0.2.1]:1", "127.0.0.1:0", "[]:1"):
        with pytest.raises(ValueError):
            cfg.parse_listen(bad)


# --------------------------------------------------------------------------- errors


def test_bad_port_names_the_key() -> None:
    assert errors_of(with_sync("port = 70000")) == {
        "sync.port": "Input should be less than or equal to 65535"
    }
    assert errors_of(with_sync("port = 0")) == {
        "sync.port": "Input should be greater than or equal to 1"
    }


def test_types_are_strict() -> None:
    errors = errors_of(
        with_sync('port = "3780"\nstartup-resync = 1\nalive-interval = "1"', "[auth]\nkey-file = 5")
    )
    assert errors == {
        "auth.key-file": "Input should be a path (a string), got an integer",
        "sync.port": "Input should be a valid integer, got a string",
        "sync.startup-resync": "Input should be a valid boolean, got an integer",
        "sync.alive-interval": "Input should be a valid number, got a string",
    }


def test_bad_addresses_name_the_key_and_index() -> None:
    errors = errors_of(
        with_sync(
            'peer = ["192.0.2.2", "192.0.2.300", "224.0.0.5"]\n'
            'listen-address = "2001:db8::zz"\nignore-address = ["192.0.2.0/33"]'
        )
    )
    assert errors == {
        "sync.peer[1]": "'192.0.2.300' is not a valid IPv4 or IPv6 address",
        "sync.peer[2]": "224.0.0.5 is not a unicast address",
        "sync.listen-address": "'2001:db8::zz' is not a valid IPv4 or IPv6 address",
        "sync.ignore-address[0]": "'192.0.2.0/33' is not a valid IPv4/IPv6 address or prefix",
    }


def test_mcast_group_must_be_multicast() -> None:
    errors = errors_of(with_sync('mcast-group = "192.0.2.50"'))
    assert list(errors) == ["sync.mcast-group"]
    assert "192.0.2.50 is not a multicast address" in errors["sync.mcast-group"]


def test_unknown_keys_with_suggestions() -> None:
    errors = errors_of(
        with_sync(
            'mcast_group = "225.0.0.50"\nacept-protocol = ["tcp"]\nfoo = 1',
            '[auth]\nport = 3780\n[logging]\nlevel = "info"',
        )
    )
    assert errors == {
        "sync.mcast_group": "unknown key; did you mean 'mcast-group'?",
        "sync.acept-protocol": "unknown key; did you mean 'accept-protocol'?",
        "sync.foo": "unknown key",
        "auth.port": "unknown key; did you mean sync.port or sync.link.port?",
        "logging": "unknown key; did you mean 'log'?",
    }


def test_unknown_protocol_and_tcp_state() -> None:
    errors = errors_of(
        with_sync('accept-protocol = ["tcp", "tpc", 300]\ntcp-states = ["OPEN", "establshed"]')
    )
    assert errors == {
        "sync.accept-protocol[1]": "unknown protocol 'tpc'; did you mean 'tcp'?",
        "sync.accept-protocol[2]": "unknown protocol '300'",
        "sync.tcp-states[0]": "unknown TCP state 'OPEN'",
        "sync.tcp-states[1]": "unknown TCP state 'establshed'; did you mean 'established'?",
    }


def test_expect_sync_values() -> None:
    errors = errors_of(with_sync('expect-sync = ["ftpp"]'))
    assert errors["sync.expect-sync[0]"].startswith("unknown helper 'ftpp'")
    assert errors["sync.expect-sync[0]"].endswith("did you mean 'ftp'?")
    assert errors_of(with_sync('expect-sync = ["all", "ftp"]')) == {
        "sync.expect-sync": '"all" cannot be combined with other helpers'
    }


def test_missing_required_keys() -> None:
    assert errors_of("") == {
        "node-id": "required key is missing",
        "sync": "required table is missing",
    }
    assert errors_of("node-id = 1\n[sync]\n") == {
        "sync.interface": "required key is missing (or give [[sync.link]] tables)"
    }
    assert errors_of("node-id = 1\nsync = 3") == {"sync": "expected a table"}


def test_ranges() -> None:
    errors = errors_of(
        'node-id = 70000\n[sync]\ninterface = "this-name-is-too-long"\n'
        "event-listen-queue-size = 0\nsync-queue-size = 2000\npurge-timeout = 0\n"
        "digest-interval = 0"
    )
    assert set(errors) == {
        "node-id",
        "sync.interface",
        "sync.event-listen-queue-size",
        "sync.sync-queue-size",
        "sync.purge-timeout",
        "sync.digest-interval",
    }
    assert errors["sync.interface"] == "'this-name-is-too-long' is not a valid interface name"


def test_multiple_errors_reported_at_once() -> None:
    errors = errors_of(
        'node-id = 0\n[sync]\ninterface = "eth1"\nport = 99999\nmcast-group = "10.0.0.1"\n'
        '[auth]\nkey-file = "relative.key"\n[log]\nlevel = "verbose"\n[metrics]\nlisten = "x"'
    )
    assert set(errors) == {
        "node-id",
        "sync.port",
        "sync.mcast-group",
        "auth.key-file",
        "log.level",
        "metrics.listen",
    }
    assert errors["auth.key-file"] == "'relative.key' is not an absolute path"
    assert errors["log.level"] == "Input should be 'debug', 'info', 'warning' or 'error'"


def test_timers_and_queues_cross_checks() -> None:
    errors = errors_of(
        with_sync(
            "event-listen-queue-size = 32\nevent-listen-queue-max = 16\npeer-dead-after = 1.5"
        )
    )
    assert errors == {
        "sync.event-listen-queue-max": "must be at least event-listen-queue-size (32)",
        "sync.peer-dead-after": "must be at least twice alive-interval (2 s)",
    }


def test_link_rules() -> None:
    both = 'node-id = 1\n[sync]\ninterface = "eth1"\n[[sync.link]]\ninterface = "eth2"\n'
    assert errors_of(both) == {
        "sync.link": "give either sync.interface (one link) or [[sync.link]], not both"
    }
    errors = errors_of(
        'node-id = 1\n[sync]\npeer = ["192.0.2.2"]\n'
        '[[sync.link]]\ninterface = "eth1"\npeer = ["192.0.2.2"]\nmcast-group = "225.0.0.1"\n'
        '[[sync.link]]\ninterface = "eth1"\n'
    )
    assert errors == {
        "sync.peer": "with [[sync.link]], set peer in each link",
        "sync.link[0].mcast-group": "does not apply to a unicast link (peer is set)",
        "sync.link[1].interface": "eth1 has two links",
    }
    mixed = (
        'node-id = 1\n[sync]\n[[sync.link]]\ninterface = "eth1"\npeer = ["192.0.2.2"]\n'
        '[[sync.link]]\ninterface = "eth2"\n'
    )
    assert errors_of(mixed) == {"sync.link": "cannot mix unicast (peer set) and multicast links"}
    five = "".join(f'[[sync.link]]\ninterface = "eth{i}"\n' for i in range(5))
    assert list(errors_of(f"node-id = 1\n[sync]\n{five}")) == ["sync.link"]


def test_address_families_must_agree() -> None:
    assert errors_of(with_sync('peer = ["192.0.2.2", "2001:db8::2"]')) == {
        "sync.peer": "mixes IPv4 and IPv6 addresses"
    }
    assert errors_of(with_sync('peer = ["2001:db8::2"]\nlisten-address = "192.0.2.1"')) == {
        "sync.listen-address": "is IPv4 but peer is IPv6"
    }
    assert errors_of(with_sync('listen-address = "2001:db8::1"')) == {
        "sync.listen-address": "is IPv6 but mcast-group is IPv4"
    }
    assert errors_of(with_sync('peer = ["192.0.2.2", "192.0.2.2"]')) == {
        "sync.peer": "192.0.2.2 is listed twice"
    }


def test_failover_rules() -> None:
    assert errors_of(with_sync("", '[failover]\nnotify-fifo = "/run/keepalived/notify.fifo"')) == {
        "failover.notify-fifo": 'only applies with mechanism = "keepalived"'
    }
    keepalived = '[failover]\nmechanism = "keepalived"\n'
    assert errors_of(with_sync("", keepalived + 'notify-fifo = "/run/k.fifo"')) == {
        "failover.sync-group": "with notify-fifo, name the keepalived vrrp_sync_group"
        " (or set instance) whose state ctsync follows"
    }
    assert errors_of(with_sync("", keepalived + 'sync-group = "G"')) == {
        "failover.sync-group": "only applies with notify-fifo"
    }
    config = loads_config(
        with_sync("", keepalived + 'notify-fifo = "/run/k.fifo"\nsync-group = "G"')
    )
    assert config.failover.sync_group == "G"
    assert errors_of(with_sync("", '[failover]\nmechanism = "vrrp"')) == {
        "failover.mechanism": '"vrrp" needs at least one [[vrrp.instance]]'
    }
    instance = (
        '[[vrrp.instance]]\nname = "VI_1"\ninterface = "eth0"\nvirtual-router-id = 51\n'
        'virtual-address = ["192.0.2.100"]\n'
    )
    assert errors_of(with_sync("", instance)) == {
        "vrrp.instance": 'only applies with failover.mechanism = "vrrp"'
    }
    assert errors_of(with_sync("", '[failover]\nmechanism = "carp"'))["failover.mechanism"] == (
        "Input should be 'none', 'vrrp' or 'keepalived'"
    )


def test_vrrp_instance() -> None:
    vrrp = '[failover]\nmechanism = "vrrp"\n'
    good = (
        '[[vrrp.instance]]\nname = "VI_1"\ninterface = "eth0"\nvirtual-router-id = 51\n'
        'virtual-address = ["192.0.2.100/24"]\n'
    )
    config = loads_config(with_sync("", vrrp + good))
    (instance,) = config.vrrp.instance
    assert (instance.priority, instance.advert_int) == (100, 1.0)
    errors = errors_of(
        with_sync(
            "",
            vrrp
            + good
            + '[[vrrp.instance]]\nname = "VI_1"\ninterface = "eth0"\nvirtual-router-id = 256\n'
            "priority = 0\nvirtual-address = []\n",
        )
    )
    assert set(errors) == {
        "vrrp.instance[1].virtual-router-id",
        "vrrp.instance[1].priority",
        "vrrp.instance[1].virtual-address",
    }
    errors = errors_of(with_sync("", vrrp + good + good))
    assert errors == {
        "vrrp.instance[1].name": "'VI_1' is used twice",
        "vrrp.instance[1].virtual-router-id": "51 on eth0 (IPv4) is already used by 'VI_1'",
    }


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ("version = 2\nadvert-int = 0.5\n", "advert-int", "VRRPv2 counts whole seconds"),
        ('version = 2\nauth-pass = "123456789"\n', "auth-pass", "must be 1..8 bytes"),
        ('auth-pass = "secret"\n', "auth-pass", "VRRPv3 has no authentication"),
        ("advert-int = 0.015\n", "advert-int", "VRRPv3 counts centiseconds"),
        ("advert-int = 41.0\n", "advert-int", "VRRPv3 counts centiseconds"),
        ('state = "MASTER"\n', "state", 'keepalived treats "MASTER" below priority 255'),
        ("priority = 255\npreempt = false\n", "preempt", "keepalived ignores it"),
        ("preempt = false\npreempt-delay = 2.0\n", "preempt-delay", "no effect"),
        ('unicast-peer = ["2001:db8::2"]\n', "unicast-peer[0]", "IPv6 peer on an IPv4"),
        ('unicast-src = "192.0.2.9"\n', "unicast-src", "only applies with unicast-peer"),
    ],
)
def test_vrrp_instance_refuses_what_keepalived_peers_would_disagree_on(
    extra: str, key: str, message: str
) -> None:
    text = (
        '[failover]\nmechanism = "vrrp"\n[[vrrp.instance]]\nname = "VI_1"\n'
        'interface = "eth0"\nvirtual-router-id = 51\nvirtual-address = ["192.0.2.100/24"]\n'
    )
    errors = errors_of(with_sync("", text + extra))
    assert message in errors[f"vrrp.instance[0].{key}"], errors


def test_vrrp_v2_over_ipv6_and_mixed_families_are_refused() -> None:
    text = (
        '[failover]\nmechanism = "vrrp"\n[[vrrp.instance]]\nname = "VI_1"\n'
        'interface = "eth0"\nvirtual-router-id = 51\nversion = 2\n'
        'virtual-address = ["2001:db8::1", "192.0.2.1"]\n'
    )
    errors = errors_of(with_sync("", text))
    assert "mixes IPv4 and IPv6" in errors["vrrp.instance[0].virtual-address"]
    assert "VRRPv2 is IPv4 only" in errors["vrrp.instance[0].version"]


def test_toml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('node-id = 1\n[sync]\ninterface = "eth1"\nport = \n')
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    ((key, message),) = info.value.errors
    assert key == ""
    assert re.fullmatch(r"TOML syntax error at line 4, column \d+: .+", message), message
    assert str(info.value).startswith(f"{path}: TOML syntax error at line 4, column")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert (
        str(info.value)
        == f"{tmp_path / 'missing.toml'}: cannot read the file: No such file or directory"
    )
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"node-id = 1\n\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_error_str_is_one_line_per_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('node-id = 0\n[sync]\ninterface = "eth1"\nport = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    assert str(info.value).splitlines() == [
        f"{path}: node-id: Input should be greater than or equal to 1",
        f"{path}: sync.port: Input should be greater than or equal to 1",
    ]
    assert info.value.path == str(path)
    assert str(ConfigError([("sync.port", "bad")])) == "sync.port: bad"


def test_validate_config_takes_parsed_data() -> None:
    config = cfg.validate_config({"node-id": 2, "sync": {"interface": "eth1"}})
    assert config.node_id == 2
    with pytest.raises(ConfigError):
        cfg.validate_config({"node_id": 2, "sync": {"interface": "eth1"}})


# --------------------------------------------------------------------------- key file checks


def test_check_files_accepts_a_private_key(tmp_path: Path) -> None:
    key = write_key(tmp_path)
    config = load_config(write_config(tmp_path, key), check_files=True)
    assert config.auth.key_file == key
    assert check_files(config) == []
    assert cfg.read_key(key) == b"k" * 48


def test_key_material_ignores_surrounding_whitespace(tmp_path: Path) -> None:
    key = write_key(tmp_path, b"  " + b"k" * 31 + b"\n\n")
    errors = check_files(loads_config(with_sync("", f'[auth]\nkey-file = "{key}"')))
    assert errors == [
        (
            "auth.key-file",
            f"{key} holds 31 bytes of key material; at least 32 are needed"
            f" (openssl rand -base64 48 > {key})",
        )
    ]


@pytest.mark.parametrize(
    ("content", "mode", "problem"),
    [
        (b"short\n", 0o600, "holds 5 bytes of key material; at least 32 are needed"),
        (b"k" * 48, 0o644, "is accessible by group or others (mode 0644); run: chmod 600"),
        (b"k" * 48, 0o640, "is accessible by group or others (mode 0640)"),
        (b"k" * 48, 0o602, "is accessible by group or others (mode 0602)"),
    ],
)
def test_bad_key_files(tmp_path: Path, content: bytes, mode: int, problem: str) -> None:
    key = write_key(tmp_path, content, mode)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, key))
    ((name, message),) = info.value.errors
    assert name == "auth.key-file"
    assert problem in message
    # Pure validation does not look at files.
    assert load_config(write_config(tmp_path, key), check_files=False).auth.key_file == key


def test_missing_key_file(tmp_path: Path) -> None:
    key = tmp_path / "absent.key"
    config = load_config(write_config(tmp_path, key), check_files=False)
    ((name, message),) = check_files(config)
    assert name == "auth.key-file"
    assert message.startswith(f"{key} does not exist")
    with pytest.raises(ConfigError, match=r"auth\.key-file: .* does not exist"):
        load_config(write_config(tmp_path, key))


def test_key_file_must_be_a_regular_file(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, tmp_path), check_files=False)
    assert check_files(config) == [("auth.key-file", f"{tmp_path} is not a regular file")]


def test_unreadable_key_file(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        key = write_key(tmp_path, mode=0o000)
        ((name, message),) = check_files(
            load_config(write_config(tmp_path, key), check_files=False)
        )
    else:
        # Root reads any file: check as an unprivileged user instead (setpriv, util-linux),
        # in a directory that user may enter (pytest's tmp_path parents are 0700).
        with tempfile.TemporaryDirectory() as tmp:
            where = Path(tmp)
            where.chmod(0o755)
            key = write_key(where, mode=0o000)
            config_path = write_config(where, key)
            probe = (
                "import sys; from ctsync.config import check_files, load_config; "
                "print(check_files(load_config(sys.argv[1], check_files=False)))"
            )
            done = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                 sys.executable, "-c", probe, str(config_path)],
                capture_output=True, text=True, check=False, cwd=Path(__file__).parents[2],
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            ((name, message),) = ast.literal_eval(done.stdout)
    assert name == "auth.key-file"
    assert message.startswith(f"cannot read {key}")


def test_allow_unauthenticated_skips_the_key_and_warns(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path / "absent.key", "allow-unauthenticated = true\n")
    config = load_config(path)
    assert check_files(config) == []
    ((key, message),) = config.warnings()
    assert key == "auth.allow-unauthenticated"
    assert "NOT authenticated" in message


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_show_output_loads_again(path: Path) -> None:
    config = load_config(path, check_files=False)
    assert loads_config(config.to_toml()) == config
    assert cfg.validate_config(json.loads(config.to_json())) == config


def test_show_output_of_a_full_config_loads_again() -> None:
    text = (
        'node-id = 7\n[sync]\nmcast-group = "ff02::1:50"\nignore-address = ["2001:db8::/48"]\n'
        'accept-protocol = ["tcp", 17]\ntcp-states = ["established"]\nexpect-sync = ["all"]\n'
        'commit-timeout = 180\n[[sync.link]]\ninterface = "eth1"\nport = 4000\n'
        '[[sync.link]]\ninterface = "eth2"\nmcast-group = "ff02::1:51"\n'
        'listen-address = "2001:db8::1"\n'
        '[failover]\nmechanism = "vrrp"\n[[vrrp.instance]]\nname = "VI_1"\ninterface = "eth0"\n'
        'virtual-router-id = 1\nvirtual-address = ["192.0.2.1/24"]\n[metrics]\nlisten = ":9724"\n'
    )
    config = loads_config(text)
    dumped = config.to_toml()
    assert "[[sync.link]]" in dumped
    assert "[[vrrp.instance]]" in dumped
    assert 'port = ""' in dumped  # the second link inherits sync.port
    assert loads_config(dumped) == config


def test_dump_toml_quotes_and_escapes() -> None:
    text = cfg.dump_toml({"a b": 'x"y\\z', "n": 1.5, "t": {"k": [True, 2]}})
    assert text == '"a b" = "x\\"y\\\\z"\nn = 1.5\n\n[t]\nk = [true, 2]\n'


# --------------------------------------------------------------------------- docs


def model_keys() -> list[str]:
    return cfg.config_keys()


def test_docs_mention_every_key() -> None:
    doc = DOC.read_text()
    missing = [
        key
        for key in model_keys()
        if f"`{key}`" not in doc and f"`[{key}]`" not in doc and f"`[[{key}]]`" not in doc
    ]
    assert missing == [], f"docs/configuration.md lacks {missing}"


def test_docs_describe_no_unknown_key() -> None:
    doc = DOC.read_text().split("## Cross-key rules", 1)[0]  # the reference tables
    rows = re.findall(r"^\| `([a-z0-9.-]+)` \|", doc, re.MULTILINE)
    assert rows, "no key rows found"
    assert sorted(set(rows) - set(model_keys())) == []
    tables = set(cfg.config_tables())
    assert sorted(set(model_keys()) - tables - set(rows)) == []


def test_reference_config_lists_every_key() -> None:
    text = EXAMPLES[0].read_text()
    for key in model_keys():
        if key in cfg.config_tables():
            continue
        name = key.rsplit(".", 1)[-1]
        assert re.search(rf"^#? ?{re.escape(name)} = ", text, re.MULTILINE), key


def test_reference_config_shows_the_defaults() -> None:
    """Uncommenting any `# key = value` line of config/ctsync.toml keeps the default."""
    table = ""
    in_example_block = False
    seen: set[str] = set()
    default = loads_config(MINIMAL)
    for line in EXAMPLES[0].read_text().splitlines():
        if header := re.fullmatch(r"\[([a-z]+)\]", line):
            table, in_example_block = header.group(1), False
        elif line.startswith("# [["):
            in_example_block = True  # an example table: its values are not defaults
        elif not line.strip():
            in_example_block = False
        elif (match := re.fullmatch(r"# ([a-z-]+) = (.*)", line)) and not in_example_block:
            key, value = match.groups()
            data = tomllib.loads(MINIMAL)
            data.setdefault(table, {})[key] = tomllib.loads(f"v = {value}")["v"]
            attr = key.replace("-", "_")
            config = cfg.validate_config(data)
            assert getattr(getattr(config, table), attr) == getattr(
                getattr(default, table), attr
            ), line
            seen.add(f"{table}.{key}")
    leaves = {k for k in model_keys() if k not in cfg.config_tables()}
    without_default = {"node-id", "sync.interface"}
    in_arrays = {
        k for k in leaves if k.startswith(("sync.link.", "vrrp.instance.", "gateway-watch."))
    }
    assert leaves - without_default - in_arrays == seen


# --------------------------------------------------------------------------- CLI


def run(*args: str) -> Result:
    return CliRunner().invoke(cli_main.cli, ["config", *args], prog_name="ctsync")


def test_cli_check_ok(tmp_path: Path) -> None:
    path = write_config(tmp_path, write_key(tmp_path))
    path.write_text(path.read_text().replace('interface = "eth1"', 'interface = "lo"'))
    result = run("check", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: configuration OK\n"
    assert result.stderr == ""


def test_cli_check_warns_about_interfaces_this_host_lacks(tmp_path: Path) -> None:
    # Valid (the agent waits for a late interface), but a misspelt name would wait forever.
    path = write_config(tmp_path, write_key(tmp_path))
    path.write_text(path.read_text().replace('interface = "eth1"', 'interface = "ctsync-none0"'))
    result = run("check", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: configuration OK\n"
    assert result.stderr == (
        f"{path}: warning: sync.interface: interface 'ctsync-none0' does not exist on this"
        " host (now)\n"
    )
    assert run("check", "--no-file-checks", str(path)).stderr == ""


def test_cli_check_reports_every_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('node-id = 1\n[sync]\ninterface = "eth1"\nport = 70000\nmcast_group = "x"\n')
    result = run("check", "--no-file-checks", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: sync.port: Input should be less than or equal to 65535",
        f"{path}: sync.mcast_group: unknown key; did you mean 'mcast-group'?",
    ]


def test_cli_check_runs_file_checks(tmp_path: Path) -> None:
    key = write_key(tmp_path, mode=0o644)
    path = write_config(tmp_path, key)
    result = run("check", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{path}: auth.key-file: {key} is accessible by group")
    assert run("check", "--no-file-checks", str(path)).exit_code == 0


def test_cli_check_missing_file_and_syntax_error(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1
    assert "cannot read the file" in result.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("node-id = = 1\n")
    result = run("check", str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{bad}: TOML syntax error at line 1, column")
    assert "Traceback" not in result.output


def test_cli_check_warns_but_passes(tmp_path: Path) -> None:
    path = write_config(tmp_path, tmp_path / "none.key", "allow-unauthenticated = true\n")
    result = run("check", str(path))
    assert result.exit_code == 0
    assert result.stdout == f"{path}: configuration OK\n"
    assert result.stderr.startswith(f"{path}: warning: auth.allow-unauthenticated: ")


def test_cli_show(tmp_path: Path) -> None:
    path = EXAMPLES[1]
    result = run("show", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"# effective configuration of {path}")
    assert loads_config(result.stdout) == load_config(path, check_files=False)
    result = run("show", "--json", str(path))
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["sync"]["mcast-group"] == "225.0.0.50"
    assert data["node-id"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("node-id = 1\n")
    result = run("show", str(bad))
    assert result.exit_code == 1
    assert result.stderr == f"{bad}: sync: required table is missing\n"


def test_cli_default_path() -> None:
    assert str(cfg.DEFAULT_CONFIG_PATH) == config_cmd.DEFAULT_PATH
    result = run("check", "--help")
    assert result.exit_code == 0
    assert "PATH" in result.stdout


def test_key_size_matches_the_wire_layer() -> None:
    from ctsync.core import wire

    assert wire.MIN_KEY_SIZE == cfg.MIN_KEY_BYTES


def test_config_is_immutable() -> None:
    config: Config = loads_config(MINIMAL)
    with pytest.raises(Exception, match="frozen"):
        config.node_id = 2  # type: ignore[misc]
