"""Connection-tracking settings (the nf_conntrack sysctls) under RouterOS-like names. Pure.

``ctsync tracking`` shows and sets ``/proc/sys/net/netfilter/nf_conntrack_*`` of the network
namespace it runs in, named and valued as RouterOS's ``/ip firewall connection tracking``
does (``tcp-established-timeout: 1d``, ``loose-tcp-tracking: yes``). This module holds the
table of settings, the value parsing and validation, and the formatting; the file access is
:mod:`ctsync.io.sysctl`.

The kernel takes timeouts in seconds and converts them to jiffies, refusing a value above
``INT_MAX / HZ``: with HZ up to 1000 that is 2147483 s, the bound used here so that a value
accepted here is never refused by the kernel. Booleans are the kernel's u8 0/1 switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from ctsync.core.routeros import format_duration, parse_duration

SYSCTL_PREFIX = "net.netfilter."
SCHEMA = "ctsync.tracking/v1"

#: Largest timeout every kernel accepts (INT_MAX / HZ for HZ <= 1000).
MAX_TIMEOUT = 0x7FFFFFFF // 1000
MAX_INT = 0x7FFFFFFF


class Kind(Enum):
    DURATION = "duration"  # seconds, shown as 1d2h3m4s
    BOOL = "bool"  # 0/1, shown as yes/no
    INT = "int"  # a count
    CHOICE = "choice"  # a small integer with names (events: no/yes/auto)


@dataclass(frozen=True, slots=True)
class Setting:
    name: str  # RouterOS-like name
    sysctl: str  # file name under /proc/sys/net/netfilter
    kind: Kind
    help: str
    minimum: int = 0
    maximum: int = MAX_INT
    choices: tuple[str, ...] = ()  # CHOICE: names of the values 0, 1, 2, ...
    always_read_only: bool = False  # counters the kernel never lets anyone write

    @property
    def key(self) -> str:
        """The full sysctl key (``net.netfilter.nf_conntrack_max``)."""
        return SYSCTL_PREFIX + self.sysctl


def _timeout(name: str, sysctl: str, help: str) -> Setting:
    return Setting(name, sysctl, Kind.DURATION, help, minimum=1, maximum=MAX_TIMEOUT)


def _switch(name: str, sysctl: str, help: str) -> Setting:
    return Setting(name, sysctl, Kind.BOOL, help, maximum=1)


_TCP_TIMEOUTS = (
    ("syn-sent", "syn_sent", "after a SYN, until the SYN-ACK"),
    ("syn-received", "syn_recv", "after a SYN-ACK, until the handshake's ACK"),
    ("established", "established", "an established connection without packets"),
    ("fin-wait", "fin_wait", "after a FIN, until the other side's FIN"),
    ("close-wait", "close_wait", "after a FIN was acknowledged, until the other FIN"),
    ("last-ack", "last_ack", "after the second FIN, until its ACK"),
    ("time-wait", "time_wait", "after a connection closed (TIME_WAIT)"),
    ("close", "close", "after a RST"),
    ("unacked", "unacknowledged", "while data stays unacknowledged"),
    ("max-retrans", "max_retrans", "after the same segment was retransmitted max-retrans times"),
)
_SCTP_TIMEOUTS = (
    "closed",
    "cookie_wait",
    "cookie_echoed",
    "established",
    "shutdown_sent",
    "shutdown_recd",
    "shutdown_ack_sent",
    "heartbeat_sent",
)
_DCCP_TIMEOUTS = ("request", "respond", "partopen", "open", "closereq", "closing", "timewait")

#: Every setting, in the order ``ctsync tracking`` prints them (RouterOS's order first).
SETTINGS: tuple[Setting, ...] = (
    *(
        _timeout(f"tcp-{name}-timeout", f"nf_conntrack_tcp_timeout_{sysctl}", f"TCP: {what}")
        for name, sysctl, what in _TCP_TIMEOUTS
    ),
    _timeout("udp-timeout", "nf_conntrack_udp_timeout", "UDP flow seen in one direction only"),
    _timeout(
        "udp-stream-timeout", "nf_conntrack_udp_timeout_stream", "UDP flow with replies (assured)"
    ),
    _timeout("icmp-timeout", "nf_conntrack_icmp_timeout", "ICMP (echo, ...)"),
    _timeout("icmpv6-timeout", "nf_conntrack_icmpv6_timeout", "ICMPv6 (echo, ...)"),
    _timeout("generic-timeout", "nf_conntrack_generic_timeout", "protocols without a tracker"),
    _timeout("gre-timeout", "nf_conntrack_gre_timeout", "GRE, one direction"),
    _timeout("gre-stream-timeout", "nf_conntrack_gre_timeout_stream", "GRE with replies"),
    *(
        _timeout(
            f"sctp-{state.replace('_', '-')}-timeout",
            f"nf_conntrack_sctp_timeout_{state}",
            f"SCTP state {state.upper()}",
        )
        for state in _SCTP_TIMEOUTS
    ),
    *(
        _timeout(
            f"dccp-{state}-timeout",
            f"nf_conntrack_dccp_timeout_{state}",
            f"DCCP state {state.upper()}",
        )
        for state in _DCCP_TIMEOUTS
    ),
    _switch(
        "loose-tcp-tracking",
        "nf_conntrack_tcp_loose",
        "pick up TCP connections already established (mid-stream)",
    ),
    _switch(
        "liberal-tcp-tracking",
        "nf_conntrack_tcp_be_liberal",
        "accept out-of-window TCP packets (only RSTs are checked)",
    ),
    _switch(
        "ignore-invalid-rst",
        "nf_conntrack_tcp_ignore_invalid_rst",
        "do not mark out-of-window RSTs invalid",
    ),
    Setting(
        "tcp-max-retrans",
        "nf_conntrack_tcp_max_retrans",
        Kind.INT,
        "retransmissions before tcp-max-retrans-timeout applies",
        maximum=255,
    ),
    _switch("accounting", "nf_conntrack_acct", "count bytes and packets per connection"),
    _switch("timestamps", "nf_conntrack_timestamp", "record when each connection started"),
    Setting(
        "events",
        "nf_conntrack_events",
        Kind.CHOICE,
        "conntrack events (auto: only once a listener exists)",
        maximum=2,
        choices=("no", "yes", "auto"),
    ),
    _switch("checksum", "nf_conntrack_checksum", "verify checksums (bad ones are invalid)"),
    Setting(
        "log-invalid",
        "nf_conntrack_log_invalid",
        Kind.INT,
        "log invalid packets of this IP protocol number (0: none, 255: all)",
        maximum=255,
    ),
    Setting(
        "max-entries",
        "nf_conntrack_max",
        Kind.INT,
        "table size limit (writable in the initial namespace only)",
        minimum=1,
    ),
    Setting(
        "total-entries",
        "nf_conntrack_count",
        Kind.INT,
        "connections now in the table",
        always_read_only=True,
    ),
    Setting(
        "buckets",
        "nf_conntrack_buckets",
        Kind.INT,
        "hash table buckets (writable in the initial namespace only)",
        minimum=1,
    ),
    Setting(
        "max-expectations",
        "nf_conntrack_expect_max",
        Kind.INT,
        "expectation table limit (writable in the initial namespace only)",
        minimum=1,
    ),
)

_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
_BY_SYSCTL: dict[str, Setting] = {s.sysctl: s for s in SETTINGS}
# Names people type from other tools: conntrack's/the kernel's wording.
_ALIASES = {
    "be-liberal": "liberal-tcp-tracking",
    "tcp-be-liberal": "liberal-tcp-tracking",
    "acct": "accounting",
    "timestamp": "timestamps",
    "tcp-syn-recv-timeout": "tcp-syn-received-timeout",
    "tcp-unacknowledged-timeout": "tcp-unacked-timeout",
    "max": "max-entries",
    "count": "total-entries",
}

_TRUE = frozenset({"yes", "true", "on", "1", "enabled"})
_FALSE = frozenset({"no", "false", "off", "0", "disabled"})


def lookup(name: str) -> Setting:
    """A setting by RouterOS-like name (``tcp-established-timeout``), alias, or sysctl name
    (``nf_conntrack_tcp_loose``, ``net.netfilter.nf_conntrack_tcp_loose``)."""
    text = name.strip().lower()
    if text.startswith(SYSCTL_PREFIX):
        text = text[len(SYSCTL_PREFIX) :]
    if text in _BY_SYSCTL:
        return _BY_SYSCTL[text]
    text = text.replace("_", "-")
    text = _ALIASES.get(text, text)
    if text in _BY_NAME:
        return _BY_NAME[text]
    raise ValueError(f"unknown setting {name!r} (see `ctsync tracking` for the names)")


def parse_value(setting: Setting, text: str) -> int:
    """The kernel's integer for a value as an operator writes it; ValueError if invalid.

    Durations: ``1d``, ``1d2h3m4s``, ``30`` (seconds), ``00:05:00``; booleans: yes/no (also
    true/false, on/off, 1/0); counts: decimal integers; choices: a name or its number.
    """
    value = text.strip().lower()
    if setting.kind is Kind.DURATION:
        try:
            number = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{setting.name}: {exc}") from None
    elif setting.kind is Kind.BOOL:
        if value in _TRUE:
            return 1
        if value in _FALSE:
            return 0
        raise ValueError(f"{setting.name}: {text!r} is not yes or no")
    elif setting.kind is Kind.CHOICE:
        if value in setting.choices:
            return setting.choices.index(value)
        if value in _TRUE:
            return 1
        if value in _FALSE:
            return 0
        if not value.isdigit():
            raise ValueError(f"{setting.name}: {text!r} is not one of {', '.join(setting.choices)}")
        number = int(value)
    else:
        if not value.isdigit():
            raise ValueError(f"{setting.name}: {text!r} is not a non-negative integer")
        number = int(value)
    if not setting.minimum <= number <= setting.maximum:
        low, high = _show(setting, setting.minimum), _show(setting, setting.maximum)
        raise ValueError(f"{setting.name}: {text!r} is out of range {low}..{high}")
    return number


def format_value(setting: Setting, raw: int) -> str:
    """The kernel's integer as ``ctsync tracking`` prints it (``1d``, ``yes``, ``auto``)."""
    if setting.kind is Kind.DURATION:
        return format_duration(raw) if raw >= 0 else str(raw)
    if setting.kind is Kind.BOOL:
        return "yes" if raw else "no"
    if setting.kind is Kind.CHOICE and 0 <= raw < len(setting.choices):
        return setting.choices[raw]
    return str(raw)


def json_value(setting: Setting, raw: int) -> Any:
    """Machine value: seconds and counts as integers, switches as booleans, choices named."""
    if setting.kind is Kind.BOOL:
        return bool(raw)
    if setting.kind is Kind.CHOICE and 0 <= raw < len(setting.choices):
        return setting.choices[raw]
    return raw


def _show(setting: Setting, raw: int) -> str:
    return format_duration(raw) if setting.kind is Kind.DURATION else str(raw)


# --- the namespace's view -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """One setting as read in a namespace: its integer and whether it may be written."""

    setting: Setting
    raw: int
    writable: bool

    @property
    def text(self) -> str:
        return format_value(self.setting, self.raw)


def readings(values: dict[str, str], writable: set[str] | frozenset[str]) -> list[Reading]:
    """The settings present in ``values`` (sysctl file name -> file content), in
    :data:`SETTINGS` order; a file whose content is not an integer is skipped."""
    out = []
    for setting in SETTINGS:
        text = values.get(setting.sysctl)
        if text is None:
            continue
        try:
            raw = int(text.strip())
        except ValueError:
            continue
        is_writable = setting.sysctl in writable and not setting.always_read_only
        out.append(Reading(setting, raw, is_writable))
    return out


def enabled_state(loaded: bool) -> str:
    """RouterOS's ``enabled``: Linux tracks a namespace's packets only once a rule (or NAT)
    there needs conntrack, which is RouterOS's ``auto``; ``no`` when nf_conntrack is not
    loaded at all."""
    return "auto" if loaded else "no"


def render_text(enabled: str, rows: list[Reading]) -> str:
    """RouterOS ``print`` layout: right-aligned names, ``name: value``."""
    pairs = [("enabled", enabled), *((r.setting.name, r.text) for r in rows)]
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name:>{width}}: {value}" for name, value in pairs)


def to_json(enabled: str, rows: list[Reading]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "enabled": enabled,
        "settings": [
            {
                "name": r.setting.name,
                "value": json_value(r.setting, r.raw),
                "text": r.text,
                "kind": r.setting.kind.value,
                "sysctl": r.setting.key,
                "writable": r.writable,
            }
            for r in rows
        ],
    }


def read_only_reason(setting: Setting) -> str:
    """Why a present setting cannot be written, for the error line."""
    if setting.always_read_only:
        return f"{setting.name} is read-only: the kernel maintains it ({setting.key})"
    return (
        f"{setting.name} is read-only in this network namespace ({setting.key}; the kernel"
        " lets only the initial namespace change it)"
    )
