"""The agent's configuration: a TOML file, validated, where every error names its key.

Key names follow VyOS ``service conntrack-sync`` (``mcast-group``, ``accept-protocol``,
``event-listen-queue-size``, ...) so an operator can map settings one to one; the Python
attribute is always the TOML key with dashes turned into underscores (``sync.mcast-group``
is ``config.sync.mcast_group``). ``docs/configuration.md`` is the reference.

Loading happens in three steps, so that the pure part stays testable without files:

1. TOML parsing (:func:`loads_config` / :func:`load_config`); a syntax error reports tomllib's
   line and column;
2. validation (:func:`validate_config`): pydantic models with ``extra="forbid"``; all errors are
   collected and reported at once as ``(dotted key, message)``, unknown keys with a
   "did you mean" hint;
3. file checks (:func:`check_files`): the pre-shared key file exists, is private and holds
   enough key material. :func:`load_config` runs them unless told not to.

TOML has no null, so an empty string means "not set" for every optional value; that keeps
``ctsync config show`` output complete (every key present) and loadable again.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ctsync.core.entry import L4_PORT_PROTOCOLS, PROTO_NUMBERS, TcpState
from ctsync.core.filter import EntryFilter, parse_protocol, parse_tcp_state
from ctsync.core.select import U32_MAX, parse_mark
from ctsync.core.select import EntryFilter as Selector

DEFAULT_CONFIG_PATH: Final = Path("/etc/ctsync/ctsync.toml")
DEFAULT_KEY_FILE: Final = Path("/etc/ctsync/sync.key")
DEFAULT_CONTROL_SOCKET: Final = Path("/run/ctsync/ctsync.sock")
DEFAULT_MCAST_GROUP: Final = IPv4Address("225.0.0.50")  # VyOS default
DEFAULT_PORT: Final = 3780  # VyOS / conntrackd default
MIN_KEY_BYTES: Final = 32
MAX_LINKS: Final = 4  # conntrackd's MULTICHANNEL_MAX
MIB: Final = 1 << 20

IPAddress = IPv4Address | IPv6Address
Loc = tuple[str | int, ...]
ConfigErrorItem = tuple[str, str]
"""``(dotted key, message)``; the key is ``""`` for errors about the whole file."""


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """Every problem found in one configuration, each naming its key.

    ``str()`` gives one line per error, ``PATH: KEY: MESSAGE`` (``PATH: MESSAGE`` for errors
    about the whole file, ``KEY: MESSAGE`` when no file is involved).
    """

    def __init__(
        self, errors: Iterable[ConfigErrorItem], path: str | os.PathLike[str] | None = None
    ):
        self.errors: list[ConfigErrorItem] = list(errors)
        self.path: str | None = os.fspath(path) if path is not None else None
        super().__init__(self.errors)

    def lines(self) -> list[str]:
        out = []
        for key, message in self.errors:
            parts = [p for p in (self.path, key) if p]
            out.append(": ".join([*parts, message]))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _fail(errors: Sequence[tuple[Loc, str]]) -> None:
    """Raise several errors at once from a model validator, each at its own sub-key.

    pydantic puts an error raised in a model validator at the model's location; the
    sub-locations travel in the error context and :func:`_convert` appends them.
    """
    if errors:
        raise PydanticCustomError(
            "ctsync_config",
            "{summary}",
            {"summary": "; ".join(m for _, m in errors), "errors": list(errors)},
        )


# --------------------------------------------------------------------------- value types


def _empty_to_none(value: object) -> object:
    return None if value == "" else value


def _not_empty(value: object) -> object:
    if value == "":
        raise ValueError("must not be empty")
    return value


def _none_to_empty(value: object) -> str:
    return "" if value is None else str(value)


def _address(value: object) -> IPAddress:
    if not isinstance(value, str):
        raise ValueError(f"expected an IP address as a string, got {_toml_type(value)}")
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 address") from None


def _optional_address(value: object) -> IPAddress | None:
    return None if value == "" else _address(value)


def _multicast(address: IPAddress) -> IPAddress:
    if not address.is_multicast:
        raise ValueError(f"{address} is not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)")
    return address


def _unicast(address: IPAddress) -> IPAddress:
    if address.is_multicast or address.is_unspecified or address == IPv4Address("255.255.255.255"):
        raise ValueError(f"{address} is not a unicast address")
    return address


def _not_multicast(address: IPAddress | None) -> IPAddress | None:
    if address is not None and address.is_multicast:
        raise ValueError(f"{address} is a multicast address; give a local unicast address")
    return address


def _network(value: object) -> str:
    """An address or prefix, normalized (host bits cleared, /32 and /128 as bare addresses)."""
    if not isinstance(value, str):
        raise ValueError(f"expected an address or prefix as a string, got {_toml_type(value)}")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4/IPv6 address or prefix") from None
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


def _interface_address(value: object) -> str:
    """A VRRP virtual address: an address with an optional prefix length."""
    if not isinstance(value, str):
        raise ValueError(f"expected an address as a string, got {_toml_type(value)}")
    try:
        iface = ipaddress.ip_interface(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a valid address[/prefix]") from None
    if "/" not in value:
        return str(iface.ip)
    return str(iface)


def _hint(value: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(value.lower(), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _protocol(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a protocol name or number, got {_toml_type(value)}")
    text = str(value).strip().lower()
    try:
        parse_protocol(text)
    except ValueError as exc:
        raise ValueError(f"{exc}{_hint(text, PROTO_NUMBERS)}") from None
    return text


def _tcp_state(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a TCP state name, got {_toml_type(value)}")
    try:
        parse_tcp_state(value)
    except ValueError as exc:
        names = [s.name.lower() for s in TcpState] + ["listen"]
        raise ValueError(f"{exc}{_hint(value.replace('-', '_'), names)}") from None
    return value.strip().upper().replace("-", "_")


EXPECT_HELPERS: Final[Mapping[str, tuple[str, ...]]] = {
    # VyOS names -> the helper names conntrackd matches (case-insensitive prefix), as the
    # legacy vyatta-conntrack-sync mapped them; the current VyOS template passes h323, nfs
    # and sqlnet through verbatim and so matches nothing for them.
    "ftp": ("ftp",),
    "sip": ("sip",),
    "h323": ("ras", "q.931", "h.245"),
    "nfs": ("rpc",),
    "sqlnet": ("tns",),
}


def _expect_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a helper name, got {_toml_type(value)}")
    text = value.strip().lower()
    choices = ["all", *EXPECT_HELPERS]
    if text not in choices:
        raise ValueError(
            f"unknown helper {value!r} (expected one of {', '.join(choices)}){_hint(text, choices)}"
        )
    return text


def _ifname(value: str) -> str:
    # The kernel's dev_valid_name(): 1..15 bytes, not "." or "..", no '/', ':' or whitespace.
    if not value:
        raise ValueError("must not be empty")
    if len(value.encode()) > 15 or value in (".", "..") or re.search(r"[/:\s]", value):
        raise ValueError(f"{value!r} is not a valid interface name")
    return value


def _absolute(path: Path | None) -> Path | None:
    if path is not None and not path.is_absolute():
        raise ValueError(f"{str(path)!r} is not an absolute path")
    return path


def _no_duplicates(values: list[Any]) -> list[Any]:
    seen: set[str] = set()
    for value in values:
        if str(value) in seen:
            raise ValueError(f"{value} is listed twice")
        seen.add(str(value))
    return values


def _listen(value: str) -> str:
    """``HOST:PORT`` (IPv4), ``[HOST]:PORT`` (IPv6), ``:PORT`` (all addresses) or ``""`` (off)."""
    if value:
        parse_listen(value)
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """Split a ``metrics.listen`` value into (host, port); host ``""`` means all addresses."""
    match = re.fullmatch(r"(\[(?P<v6>[^\]]+)\]|(?P<v4>[^:\[\]]*)):(?P<port>\d{1,5})", value)
    if match is None:
        raise ValueError(
            f"{value!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9724, [::1]:9724 or :9724)"
        )
    host = match.group("v6") or match.group("v4") or ""
    if match.group("v6") is not None and not match.group("v6"):
        raise ValueError(f"{value!r}: empty IPv6 address")
    if host:
        try:
            parsed = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
        if (match.group("v6") is not None) != (parsed.version == 6):
            raise ValueError(f"{value!r}: write IPv6 addresses in brackets, [ADDRESS]:PORT")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port must be 1..65535")
    return host, port


Bool = Annotated[bool, Strict()]
Seconds = Annotated[float, Strict()]  # strict float still takes a TOML integer
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
Address = Annotated[IPAddress, PlainValidator(_address), PlainSerializer(str, return_type=str)]
OptionalAddress = Annotated[
    IPAddress | None,
    PlainValidator(_optional_address),
    AfterValidator(_not_multicast),
    PlainSerializer(_none_to_empty, return_type=str),
]
MulticastAddress = Annotated[Address, AfterValidator(_multicast)]
UnicastAddress = Annotated[Address, AfterValidator(_unicast)]
PeerList = Annotated[list[UnicastAddress], AfterValidator(_no_duplicates)]
InterfaceName = Annotated[str, Strict(), AfterValidator(_ifname)]
OptionalInterfaceName = Annotated[
    str | None,
    BeforeValidator(_empty_to_none),
    AfterValidator(lambda v: None if v is None else _ifname(v)),
    PlainSerializer(_none_to_empty, return_type=str),
]
AbsolutePath = Annotated[
    Path,
    BeforeValidator(_not_empty),
    AfterValidator(_absolute),
    PlainSerializer(str, return_type=str),
]
OptionalAbsolutePath = Annotated[
    Path | None,
    BeforeValidator(_empty_to_none),
    AfterValidator(_absolute),
    PlainSerializer(_none_to_empty, return_type=str),
]
OptionalName = Annotated[
    Annotated[str, Strict()] | None,
    BeforeValidator(_empty_to_none),
    PlainSerializer(_none_to_empty, return_type=str),
]
Protocol = Annotated[str, PlainValidator(_protocol)]
TcpStateName = Annotated[str, PlainValidator(_tcp_state)]
Network = Annotated[str, PlainValidator(_network)]
ExpectName = Annotated[str, PlainValidator(_expect_name)]
VirtualAddress = Annotated[str, PlainValidator(_interface_address)]


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class _Model(BaseModel):
    """Base for every table: TOML keys are the attribute names with dashes; nothing else."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_dashed,
        frozen=True,
        hide_input_in_errors=True,
    )


# --------------------------------------------------------------------------- [sync]


class SyncLink(_Model):
    """One ``[[sync.link]]``: a dedicated sync link. ``mcast-group`` and ``port`` default to
    the ``[sync]`` values; ``peer`` makes the link unicast."""

    interface: InterfaceName
    mcast_group: Annotated[
        IPAddress | None,
        PlainValidator(_optional_address),
        AfterValidator(lambda a: None if a is None else _multicast(a)),
        PlainSerializer(_none_to_empty, return_type=str),
    ] = None
    port: Annotated[
        Port | None,
        BeforeValidator(_empty_to_none),
        PlainSerializer(lambda v: "" if v is None else v),
    ] = None
    peer: PeerList = Field(default_factory=list)
    listen_address: OptionalAddress = None


@dataclass(frozen=True)
class SyncChannel:
    """A sync link with every default resolved: what the transport opens a socket for."""

    interface: str
    port: int
    mcast_group: IPAddress | None  # None on a unicast link
    peers: tuple[IPAddress, ...]
    listen_address: IPAddress | None

    @property
    def unicast(self) -> bool:
        return bool(self.peers)

    @property
    def version(self) -> int:
        """IP version of the link's traffic (4 or 6)."""
        if self.peers:
            return self.peers[0].version
        assert self.mcast_group is not None
        return self.mcast_group.version


class SyncConfig(_Model):
    """``[sync]``: VyOS ``service conntrack-sync`` minus the failover mechanism."""

    interface: OptionalInterfaceName = None
    mcast_group: MulticastAddress = DEFAULT_MCAST_GROUP
    port: Port = DEFAULT_PORT
    peer: PeerList = Field(default_factory=list)
    listen_address: OptionalAddress = None
    link: Annotated[list[SyncLink], Field(max_length=MAX_LINKS)] = Field(default_factory=list)

    accept_protocol: list[Protocol] = Field(default_factory=list)
    ignore_address: list[Network] = Field(default_factory=list)
    tcp_states: list[TcpStateName] = Field(default_factory=list)
    expect_sync: list[ExpectName] = Field(default_factory=list)

    event_listen_queue_size: Annotated[int, Strict(), Field(ge=1, le=1024)] = 8
    event_listen_queue_max: Annotated[int, Strict(), Field(ge=1, le=4096)] = 64
    sync_queue_size: Annotated[int, Strict(), Field(ge=1, le=1024)] = 1
    resend_queue_size: Annotated[int, Strict(), Field(ge=1, le=4096)] = 16

    startup_resync: Bool = False
    disable_external_cache: Bool = False
    commit_timeout: Annotated[int, Strict(), Field(ge=0, le=2**31 - 1)] = 0
    purge_timeout: Annotated[int, Strict(), Field(ge=1, le=2**31 - 1)] = 60

    alive_interval: Annotated[Seconds, Field(ge=0.05, le=60.0)] = 1.0
    peer_dead_after: Annotated[Seconds, Field(ge=0.1, le=600.0)] = 3.0
    digest_interval: Annotated[Seconds, Field(ge=1.0, le=3600.0)] = 10.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        if self.interface is None and not self.link:
            errors.append(
                (("interface",), "required key is missing (or give [[sync.link]] tables)")
            )
        if self.interface is not None and self.link:
            errors.append(
                (("link",), "give either sync.interface (one link) or [[sync.link]], not both")
            )
        if self.link:
            if self.peer:
                errors.append((("peer",), "with [[sync.link]], set peer in each link"))
            if self.listen_address is not None:
                errors.append(
                    (("listen-address",), "with [[sync.link]], set listen-address in each link")
                )
        seen: set[str] = set()
        for index, link in enumerate(self.link):
            prefix: Loc = ("link", index)
            if link.interface in seen:
                errors.append(((*prefix, "interface"), f"{link.interface} has two links"))
            seen.add(link.interface)
            if link.peer and link.mcast_group is not None:
                errors.append(
                    ((*prefix, "mcast-group"), "does not apply to a unicast link (peer is set)")
                )
        if not errors:
            for prefix, channel in self._channels_with_keys():
                errors.extend(_channel_errors(prefix, channel))
            if len({c.unicast for _, c in self._channels_with_keys()}) > 1:
                errors.append((("link",), "cannot mix unicast (peer set) and multicast links"))
        if self.event_listen_queue_max < self.event_listen_queue_size:
            errors.append(
                (
                    ("event-listen-queue-max",),
                    f"must be at least event-listen-queue-size ({self.event_listen_queue_size})",
                )
            )
        if self.peer_dead_after < 2 * self.alive_interval:
            errors.append(
                (
                    ("peer-dead-after",),
                    f"must be at least twice alive-interval ({2 * self.alive_interval:g} s)",
                )
            )
        if "all" in self.expect_sync and len(set(self.expect_sync)) > 1:
            errors.append((("expect-sync",), '"all" cannot be combined with other helpers'))
        _fail(errors)
        return self

    def _channels_with_keys(self) -> Iterator[tuple[Loc, SyncChannel]]:
        if self.interface is not None:
            yield (), self._channel(self.interface, None, None, self.peer, self.listen_address)
        for index, link in enumerate(self.link):
            channel = self._channel(
                link.interface, link.mcast_group, link.port, link.peer, link.listen_address
            )
            yield ("link", index), channel

    def _channel(
        self,
        interface: str,
        group: IPAddress | None,
        port: int | None,
        peers: Sequence[IPAddress],
        listen: IPAddress | None,
    ) -> SyncChannel:
        return SyncChannel(
            interface=interface,
            port=port if port is not None else self.port,
            mcast_group=None if peers else (group if group is not None else self.mcast_group),
            peers=tuple(peers),
            listen_address=listen,
        )

    def channels(self) -> tuple[SyncChannel, ...]:
        """The sync links, defaults resolved; the first is the one used at start."""
        return tuple(channel for _, channel in self._channels_with_keys())

    def expect_helpers(self) -> frozenset[str] | None:
        """Lower-case kernel helper names whose expectations are synced; None means all.

        Empty when ``expect-sync`` is empty: expectations are not synced.
        """
        if "all" in self.expect_sync:
            return None
        return frozenset(h for name in self.expect_sync for h in EXPECT_HELPERS[name])

    @property
    def event_listen_queue_bytes(self) -> int:
        return self.event_listen_queue_size * MIB

    @property
    def event_listen_queue_max_bytes(self) -> int:
        return self.event_listen_queue_max * MIB

    @property
    def sync_queue_bytes(self) -> int:
        return self.sync_queue_size * MIB

    @property
    def resend_queue_bytes(self) -> int:
        return self.resend_queue_size * MIB

    @property
    def commit_timeout_override(self) -> int | None:
        """The timeout to give committed entries, or None to keep each entry's synced one."""
        return self.commit_timeout or None


def _channel_errors(prefix: Loc, channel: SyncChannel) -> list[tuple[Loc, str]]:
    errors: list[tuple[Loc, str]] = []
    versions = {p.version for p in channel.peers}
    if len(versions) > 1:
        errors.append(((*prefix, "peer"), "mixes IPv4 and IPv6 addresses"))
    elif channel.listen_address is not None:
        other = "peer" if channel.unicast else "mcast-group"
        if channel.listen_address.version != channel.version:
            errors.append(
                (
                    (*prefix, "listen-address"),
                    f"is IPv{channel.listen_address.version} but {other} is IPv{channel.version}",
                )
            )
    return errors


# --------------------------------------------------------------------------- other tables


class AuthConfig(_Model):
    """``[auth]``: the pre-shared key that authenticates every sync datagram."""

    key_file: AbsolutePath = DEFAULT_KEY_FILE
    allow_unauthenticated: Bool = False


class FailoverConfig(_Model):
    """``[failover]``: what tells this node to become master or backup, and what it does then."""

    mechanism: Literal["none", "vrrp", "keepalived"] = "none"
    notify_fifo: OptionalAbsolutePath = None
    sync_group: OptionalName = None
    instance: OptionalName = None
    # Bounded wait for the commit before the virtual addresses are taken anyway: a node
    # that forwards with part of the state beats a node that does not forward at all.
    commit_wait: Annotated[Seconds, Field(ge=0.1, le=3600.0)] = 10.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        keepalived_keys = {
            "notify-fifo": self.notify_fifo,
            "sync-group": self.sync_group,
            "instance": self.instance,
        }
        if self.mechanism != "keepalived":
            for key, value in keepalived_keys.items():
                if value is not None:
                    errors.append(((key,), 'only applies with mechanism = "keepalived"'))
        else:
            if self.sync_group is not None and self.instance is not None:
                errors.append((("instance",), "give sync-group or instance, not both"))
            if self.notify_fifo is not None and self.sync_group is None and self.instance is None:
                errors.append(
                    (
                        ("sync-group",),
                        "with notify-fifo, name the keepalived vrrp_sync_group"
                        " (or set instance) whose state ctsync follows",
                    )
                )
            if self.notify_fifo is None:
                for key in ("sync-group", "instance"):
                    if keepalived_keys[key] is not None:
                        errors.append(((key,), "only applies with notify-fifo"))
        _fail(errors)
        return self


VRRP_V3_MAX_INTERVAL: Final = 40.95  # 12 bits of centiseconds


class VrrpInstance(_Model):
    """``[[vrrp.instance]]``: one VRRP instance of ctsync's own speaker (keepalived names).

    Checks refuse what would make keepalived peers disagree silently (dual master):
    keepalived rounds a fractional v2 interval, sends only 8 characters of a password,
    ignores nopreempt with ``state MASTER`` or priority 255, and speaks v2 over IPv4 only.
    """

    name: Annotated[str, Strict(), Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    interface: InterfaceName
    virtual_router_id: Annotated[int, Strict(), Field(ge=1, le=255)]
    version: Literal[2, 3] = 3
    priority: Annotated[int, Strict(), Field(ge=1, le=255)] = 100
    advert_int: Annotated[Seconds, Field(ge=0.01, le=255.0)] = 1.0
    virtual_address: Annotated[
        list[VirtualAddress], Field(min_length=1), AfterValidator(_no_duplicates)
    ]
    state: Literal["BACKUP", "MASTER"] = "BACKUP"
    preempt: Bool = True
    preempt_delay: Annotated[Seconds, Field(ge=0.0, le=1000.0)] = 0.0
    auth_pass: OptionalName = None
    unicast_peer: PeerList = Field(default_factory=list)
    unicast_src: OptionalAddress = None
    garp_master_repeat: Annotated[int, Strict(), Field(ge=1, le=255)] = 5
    garp_master_delay: Annotated[Seconds, Field(ge=0.0, le=3600.0)] = 5.0

    @property
    def family(self) -> int:
        """IP version of the instance (4 or 6), that of its virtual addresses."""
        return ipaddress.ip_interface(self.virtual_address[0]).version

    @property
    def advert_centiseconds(self) -> int:
        return round(self.advert_int * 100)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        versions = {ipaddress.ip_interface(a).version for a in self.virtual_address}
        if len(versions) > 1:
            errors.append(
                (("virtual-address",), "mixes IPv4 and IPv6; use one instance per family")
            )
        family = self.family
        if self.version == 2:
            if family == 6:
                errors.append((("version",), "VRRPv2 is IPv4 only; use version = 3 for IPv6"))
            if self.advert_int != int(self.advert_int) or self.advert_int < 1:
                errors.append(
                    (
                        ("advert-int",),
                        f"VRRPv2 counts whole seconds (1..255); keepalived would round"
                        f" {self.advert_int} and the peers would disagree",
                    )
                )
        else:
            cs = self.advert_int * 100
            if abs(cs - round(cs)) > 1e-6 or self.advert_int > VRRP_V3_MAX_INTERVAL:
                errors.append(
                    (
                        ("advert-int",),
                        f"VRRPv3 counts centiseconds: 0.01..{VRRP_V3_MAX_INTERVAL} s in steps"
                        " of 0.01",
                    )
                )
            if self.auth_pass is not None:
                errors.append((("auth-pass",), "VRRPv3 has no authentication; v2 only"))
        if self.auth_pass is not None and not 1 <= len(self.auth_pass.encode()) <= 8:
            errors.append(
                (
                    ("auth-pass",),
                    "must be 1..8 bytes: VRRPv2 carries 8 and keepalived silently truncates"
                    " longer passwords",
                )
            )
        for index, peer in enumerate(self.unicast_peer):
            if peer.version != family:
                errors.append(
                    (("unicast-peer", index), f"IPv{peer.version} peer on an IPv{family} instance")
                )
        if self.unicast_src is not None and self.unicast_src.version != family:
            errors.append((("unicast-src",), f"not an IPv{family} address"))
        if self.unicast_src is not None and not self.unicast_peer:
            errors.append((("unicast-src",), "only applies with unicast-peer"))
        if self.state == "MASTER" and self.priority != 255:
            errors.append(
                (
                    ("state",),
                    'keepalived treats "MASTER" below priority 255 as "BACKUP"; use'
                    " priority = 255 for an address owner or leave state out",
                )
            )
        if (not self.preempt or self.preempt_delay) and (
            self.state == "MASTER" or self.priority == 255
        ):
            key = "preempt" if not self.preempt else "preempt-delay"
            errors.append(((key,), "keepalived ignores it for an address owner (priority 255)"))
        if not self.preempt and self.preempt_delay:
            errors.append((("preempt-delay",), "has no effect with preempt = false"))
        _fail(errors)
        return self


class VrrpConfig(_Model):
    """``[vrrp]``: ctsync's VRRP speaker (``failover.mechanism = "vrrp"``).

    All instances form one sync group: a firewall's connection state has a single role,
    so its instances (LAN side, WAN side, IPv4, IPv6) change state together.
    """

    sync_group: Annotated[str, Strict(), Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = (
        "ctsync"
    )
    instance: list[VrrpInstance] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        seen: set[str] = set()
        routers: dict[tuple[str, int, int], str] = {}
        for index, inst in enumerate(self.instance):
            if inst.name in seen:
                errors.append((("instance", index, "name"), f"{inst.name!r} is used twice"))
            seen.add(inst.name)
            router = (inst.interface, inst.virtual_router_id, inst.family)
            if router in routers:
                errors.append(
                    (
                        ("instance", index, "virtual-router-id"),
                        f"{inst.virtual_router_id} on {inst.interface} (IPv{inst.family}) is"
                        f" already used by {routers[router]!r}",
                    )
                )
            routers.setdefault(router, inst.name)
        _fail(errors)
        return self


class ControlConfig(_Model):
    """``[control]``: the UNIX socket the ``ctsync`` commands talk to."""

    socket: AbsolutePath = DEFAULT_CONTROL_SOCKET


class MetricsConfig(_Model):
    """``[metrics]``: the Prometheus endpoint."""

    listen: Annotated[str, Strict(), AfterValidator(_listen)] = ""

    def endpoint(self) -> tuple[str, int] | None:
        """(host, port) to serve on, host ``""`` meaning all addresses; None when off."""
        return parse_listen(self.listen) if self.listen else None


class LogConfig(_Model):
    """``[log]``."""

    format: Literal["auto", "text", "logfmt", "json"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


# --------------------------------------------------------------------------- [[gateway-watch]]


def _mark(value: object) -> tuple[int, int] | None:
    """``"MARK"``, ``"MARK/MASK"`` (decimal or 0x-hex) or an integer; ``""`` = not set."""
    if value == "" or value is None:
        return None
    if isinstance(value, tuple):  # already parsed (model_validate of a built model)
        return (int(value[0]), int(value[1]))
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"expected a mark as a string (MARK or MARK/MASK), got {_toml_type(value)}"
        )
    mark, mask = parse_mark(value)
    if mark & ~mask:
        raise ValueError(f"mark {mark:#x} has bits outside mask {mask:#x}: it matches nothing")
    return mark, mask


def _mark_text(value: tuple[int, int] | None) -> str:
    return "" if value is None else f"{value[0]:#x}/{value[1]:#x}"


def _optional_network(value: object) -> str | None:
    return None if value == "" or value is None else _network(value)


def _optional_protocol(value: object) -> str | None:
    return None if value == "" or value is None else _protocol(value)


OptionalPort = Annotated[
    Port | None,
    BeforeValidator(_empty_to_none),
    PlainSerializer(lambda v: "" if v is None else v),
]


class GatewayMatch(_Model):
    """``[gateway-watch.match]``: the connections a watch removes, conntrack(8)'s filters
    on the original direction (``ctsync.core.select.EntryFilter``); all given must match."""

    mark: Annotated[
        tuple[int, int] | None,
        PlainValidator(_mark),
        PlainSerializer(_mark_text, return_type=str),
    ] = None
    src: Annotated[
        str | None,
        PlainValidator(_optional_network),
        PlainSerializer(_none_to_empty, return_type=str),
    ] = None
    dst: Annotated[
        str | None,
        PlainValidator(_optional_network),
        PlainSerializer(_none_to_empty, return_type=str),
    ] = None
    proto: Annotated[
        str | None,
        PlainValidator(_optional_protocol),
        PlainSerializer(_none_to_empty, return_type=str),
    ] = None
    dport: OptionalPort = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        if all(v is None for v in (self.mark, self.src, self.dst, self.proto, self.dport)):
            errors.append(
                (
                    (),
                    "give at least one of mark, src, dst, proto, dport: an empty match would"
                    " remove every connection",
                )
            )
        if self.src is not None and self.dst is not None:
            src, dst = ipaddress.ip_network(self.src), ipaddress.ip_network(self.dst)
            if src.version != dst.version:
                errors.append(
                    (("dst",), f"is IPv{dst.version} but src is IPv{src.version}: matches nothing")
                )
        ports = self.proto is None or parse_protocol(self.proto) in L4_PORT_PROTOCOLS
        if self.dport is not None and not ports:
            errors.append((("dport",), f"protocol {self.proto} has no ports"))
        _fail(errors)
        return self

    def selector(self) -> Selector:
        """The compiled filter (``ctsync show cache`` and ``conntrack -L`` semantics)."""
        mark, mask = self.mark if self.mark is not None else (None, U32_MAX)
        return Selector(
            proto=parse_protocol(self.proto) if self.proto is not None else None,
            src=ipaddress.ip_network(self.src) if self.src is not None else None,
            dst=ipaddress.ip_network(self.dst) if self.dst is not None else None,
            dport=self.dport,
            mark=mark,
            mark_mask=mask,
        )

    def describe(self) -> dict[str, str]:
        """The given filters as conntrack words, e.g. ``{"mark": "0x1/0xff"}``."""
        out: dict[str, str] = {}
        for key in ("mark", "src", "dst", "proto", "dport"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _mark_text(value) if key == "mark" else str(value)
        return out


FlushEvent = Literal["down", "up"]


class GatewayWatch(_Model):
    """``[[gateway-watch]]``: probe a gateway; when it goes down (or comes back), remove
    the connections ``match`` selects so that they are re-created on the path that works."""

    name: Annotated[str, Strict(), Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    address: UnicastAddress
    probe: Literal["icmp", "tcp"] = "icmp"
    port: OptionalPort = None
    source_address: OptionalAddress = None
    interface: OptionalInterfaceName = None
    interval: Annotated[Seconds, Field(ge=0.1, le=3600.0)] = 1.0
    timeout: Annotated[Seconds, Field(ge=0.01, le=60.0)] = 0.5
    down_after: Annotated[int, Strict(), Field(ge=1, le=1000)] = 3
    up_after: Annotated[int, Strict(), Field(ge=1, le=1000)] = 3
    flush_on: Annotated[list[FlushEvent], AfterValidator(_no_duplicates)] = Field(
        default_factory=lambda: list[FlushEvent](["down"])
    )
    match: GatewayMatch

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        if self.timeout >= self.interval:
            errors.append(
                (
                    ("timeout",),
                    f"must be less than interval ({self.interval:g} s): one probe at a time",
                )
            )
        if self.probe == "tcp" and self.port is None:
            errors.append((("port",), 'required with probe = "tcp"'))
        if self.probe != "tcp" and self.port is not None:
            errors.append((("port",), 'only applies with probe = "tcp"'))
        version = self.address.version
        if self.source_address is not None and self.source_address.version != version:
            errors.append(
                (
                    ("source-address",),
                    f"is IPv{self.source_address.version} but address is IPv{version}",
                )
            )
        if self.address.is_link_local and version == 6 and self.interface is None:
            errors.append((("interface",), f"required with a link-local address ({self.address})"))
        _fail(errors)
        return self

    def target(self) -> str:
        """``icmp 198.51.100.1`` / ``tcp [2001:db8::1]:443``, for status and logs."""
        if self.probe == "tcp":
            host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
            return f"tcp {host}:{self.port}"
        return f"icmp {self.address}"


class Config(_Model):
    """The whole file."""

    node_id: Annotated[int, Strict(), Field(ge=1, le=65535)]
    sync: SyncConfig
    auth: AuthConfig = Field(default_factory=AuthConfig)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)
    vrrp: VrrpConfig = Field(default_factory=VrrpConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    gateway_watch: list[GatewayWatch] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[Loc, str]] = []
        names: set[str] = set()
        for index, watch in enumerate(self.gateway_watch):
            if watch.name in names:
                errors.append((("gateway-watch", index, "name"), f"{watch.name!r} is used twice"))
            names.add(watch.name)
        if self.failover.mechanism == "vrrp" and not self.vrrp.instance:
            errors.append(
                (("failover", "mechanism"), '"vrrp" needs at least one [[vrrp.instance]]')
            )
        if self.vrrp.instance and self.failover.mechanism != "vrrp":
            errors.append((("vrrp", "instance"), 'only applies with failover.mechanism = "vrrp"'))
        _fail(errors)
        return self

    def entry_filter(self) -> EntryFilter:
        """The compiled accept-protocol / ignore-address / tcp-states filter."""
        return EntryFilter.build(
            accept_protocols=self.sync.accept_protocol,
            ignore_addresses=self.sync.ignore_address,
            tcp_states=self.sync.tcp_states,
        )

    def warnings(self) -> list[ConfigErrorItem]:
        """Valid but risky settings, as (key, message), for ``config check`` and the agent log."""
        out: list[ConfigErrorItem] = []
        if self.auth.allow_unauthenticated:
            out.append(
                (
                    "auth.allow-unauthenticated",
                    "sync datagrams are NOT authenticated: anyone who can reach the sync port"
                    " can put connections into this firewall's conntrack table",
                )
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration with TOML key names, JSON-compatible."""
        data: dict[str, Any] = self.model_dump(mode="json", by_alias=True)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_toml(self) -> str:
        """The effective configuration (defaults filled in) as TOML that loads again."""
        return dump_toml(self.to_dict())


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str], check_files: bool = True) -> Config:
    """Read, parse and validate ``path``; raises :class:`ConfigError` listing every problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([("", f"cannot read the file: {exc.strerror or exc}")], path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"not UTF-8 text (byte {exc.start})")], path) from None
    try:
        config = loads_config(text)
    except ConfigError as exc:
        raise ConfigError(exc.errors, path) from None
    if check_files:
        errors = _file_errors(config)
        if errors:
            raise ConfigError(errors, path)
    return config


def loads_config(text: str) -> Config:
    """Parse and validate TOML text (no file checks)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", _syntax_message(exc))]) from None
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> Config:
    """Validate already-parsed TOML data (pure: no files are read)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_convert(exc)) from None


def _syntax_message(exc: tomllib.TOMLDecodeError) -> str:
    text = str(exc)
    match = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", text)
    if match:
        return (
            f"TOML syntax error at line {match.group(2)}, column {match.group(3)}: {match.group(1)}"
        )
    match = re.fullmatch(r"(?s)(.*) \(at end of document\)", text)
    if match:
        return f"TOML syntax error at the end of the file: {match.group(1)}"
    return f"TOML syntax error: {text}"


def check_files(config: Config) -> list[ConfigErrorItem]:
    """Check the files the configuration names; returns (key, message) for each problem."""
    return _file_errors(config)


def _file_errors(config: Config) -> list[ConfigErrorItem]:
    errors: list[ConfigErrorItem] = []
    if not config.auth.allow_unauthenticated:
        problem = _key_file_problem(config.auth.key_file)
        if problem:
            errors.append(("auth.key-file", problem))
    return errors


def read_key(path: str | os.PathLike[str]) -> bytes:
    """The pre-shared key held in ``path``: its bytes without surrounding whitespace.

    Stripping means a trailing newline (``openssl rand -base64 48 > key``) does not matter.
    """
    return Path(path).read_bytes().strip()


def _key_file_problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (
            f"{path} does not exist (create it with: umask 077;"
            f" openssl rand -base64 48 > {path}; copy it to every node)"
        )
    except OSError as exc:
        return f"cannot access {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"
    try:
        key = read_key(path)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if len(key) < MIN_KEY_BYTES:
        return (
            f"{path} holds {len(key)} bytes of key material; at least {MIN_KEY_BYTES}"
            f" are needed (openssl rand -base64 48 > {path})"
        )
    return None


# --------------------------------------------------------------------------- error conversion

_MESSAGES: Final[Mapping[str, str]] = {
    "missing": "required key is missing",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
    "list_type": "expected an array",
    "path_type": "Input should be a path (a string)",
}
_TYPE_ERRORS: Final = {"int_type", "bool_type", "float_type", "string_type", "path_type"}


def _convert(exc: ValidationError) -> list[ConfigErrorItem]:
    out: list[ConfigErrorItem] = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        kind = error["type"]
        ctx = error.get("ctx") or {}
        if kind == "ctsync_config":
            for sub, message in ctx["errors"]:
                out.append((format_key((*loc, *sub)), message))
            continue
        message = _MESSAGES.get(kind, error["msg"])
        if kind == "missing" and _model_at(loc) is not None:
            message = "required table is missing"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif kind == "extra_forbidden":
            message = "unknown key" + _unknown_key_hint(loc)
        elif kind in _TYPE_ERRORS and "input" in error:
            message = f"{message}, got {_toml_type(error['input'])}"
        out.append((format_key(loc), message))
    return out


def _toml_type(value: object) -> str:
    names = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        (list, "an array"),
        (dict, "a table"),
    ]
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def format_key(loc: Iterable[str | int]) -> str:
    """``("sync", "link", 0, "port")`` -> ``sync.link[0].port``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _BARE_KEY.match(part) else json.dumps(part)
            text = f"{text}.{name}" if text else name
    return text


def _submodel(annotation: Any) -> type[_Model] | None:
    origin = get_origin(annotation)
    if origin in (list, tuple, Union, types.UnionType, Annotated):
        for arg in get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, _Model):
        return annotation
    return None


def _model_at(loc: Loc) -> type[_Model] | None:
    model: type[_Model] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        field = fields.get(part)
        sub = _submodel(field.annotation) if field is not None else None
        if sub is None:
            return None
        model = sub
    return model


def _unknown_key_hint(loc: Loc) -> str:
    key = loc[-1]
    if not isinstance(key, str):
        return ""
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    known = [field.alias or name for name, field in model.model_fields.items()]
    if key.replace("_", "-").lower() in known:
        return f"; did you mean {key.replace('_', '-').lower()!r}?"
    hint = _hint(key, known)
    if hint:
        return hint
    elsewhere = [k for k in config_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {' or '.join(elsewhere[:2])}?"
    return ""


def config_keys(model: type[_Model] = Config, prefix: str = "") -> list[str]:
    """Every key the configuration knows, dotted (``sync.link.port``: arrays without index)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        keys.append(key)
        sub = _submodel(field.annotation)
        if sub is not None:
            keys.extend(config_keys(sub, key + "."))
    return keys


def config_tables() -> list[str]:
    """The keys of :func:`config_keys` that are tables or arrays of tables."""
    return [k for k in config_keys() if _model_at(tuple(k.split("."))) is not None]


# --------------------------------------------------------------------------- TOML output


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def dump_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for configuration data (tables, arrays of tables, scalars)."""
    lines: list[str] = []
    _dump_table(lines, [], data)
    return "\n".join(lines).strip() + "\n"


def _dump_table(lines: list[str], path: list[str], data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in data.items():
        sub = [*path, _toml_key(key)]
        if isinstance(value, dict):
            lines.extend(["", f"[{'.'.join(sub)}]"])
            _dump_table(lines, sub, value)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{'.'.join(sub)}]]"])
                _dump_table(lines, sub, item)
