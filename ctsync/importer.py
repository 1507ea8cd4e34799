"""Import a conntrackd.conf: conntrackd's configuration in, the equivalent ctsync TOML out.

Pure: text in, ``(TOML text, notices)`` out; no files, no sockets. The CLI command
``ctsync config import-conntrackd`` reads the file, calls :func:`import_conntrackd`, validates
the result with :func:`ctsync.config.loads_config` and prints the notices on stderr.

Parsing follows conntrackd's own grammar (``src/read_config_lex.l`` and
``src/read_config_yy.y`` of conntrack-tools): newlines are not significant, ``#`` starts a
comment that runs to the end of the line, ``{`` and ``}`` open and close blocks, and each
directive takes a fixed shape (one value; a few header words and a block of directives; or
a block of bare words such as ``Protocol Accept { TCP UDP }``). Directive names are matched
case-insensitively (conntrackd is stricter); an unknown directive or a misplaced brace is a
:class:`ConntrackdSyntaxError` naming the line, as conntrackd's parser would stop there too.

Every directive ends up in exactly one of three places: carried over to a ctsync key, carried
over with a change of meaning (a :class:`Notice` of kind ``changed``), or not carried over
(kind ``dropped``). Things the user must do before the result runs (set ``node-id``, create
the key file, point keepalived at ``ctsync failover``) are notices of kind ``action``. The
mapping follows the "VyOS / conntrackd" column of ``docs/configuration.md``.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

MIB: Final = 1 << 20
PLACEHOLDER_NODE_ID: Final = 1
PLACEHOLDER_INTERFACE: Final = "SET-ME"
KEY_FILE: Final = "/etc/ctsync/sync.key"
DEFAULT_GROUP: Final = "225.0.0.50"
DEFAULT_PORT: Final = 3780
DEFAULT_QUEUE_MAX_MIB: Final = 64  # ctsync's sync.event-listen-queue-max default
DEFAULT_RESEND_MIB: Final = 16  # ctsync's sync.resend-queue-size default
RESEND_BYTES_PER_ENTRY: Final = 8  # docs/configuration.md, sync.resend-queue-size
MAX_LINKS: Final = 4  # conntrackd's MULTICHANNEL_MAX, ctsync's limit too

NoticeKind = Literal["dropped", "changed", "action"]


class ConntrackdSyntaxError(ValueError):
    """The file is not a conntrackd.conf conntrackd would accept (or not a sync one)."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}" if line else message)


@dataclass(frozen=True)
class Notice:
    """Something the import could not carry over as it was, or that the user must do.

    ``directive`` is the conntrackd path (``General.HashSize``); ``line`` its line in the
    file (0 when it concerns the whole file).
    """

    kind: NoticeKind
    line: int
    directive: str
    message: str

    def text(self, source: str = "conntrackd.conf") -> str:
        where = f"{source}:{self.line}" if self.line else source
        label = {"dropped": "not carried over", "changed": "changed", "action": "action"}
        subject = f"{self.directive}: " if self.directive else ""
        return f"{where}: {label[self.kind]}: {subject}{self.message}"


@dataclass(frozen=True)
class ImportResult:
    toml: str
    notices: tuple[Notice, ...]

    def of_kind(self, kind: NoticeKind) -> list[Notice]:
        return [n for n in self.notices if n.kind == kind]

    @property
    def dropped(self) -> list[Notice]:
        return self.of_kind("dropped")

    @property
    def changed(self) -> list[Notice]:
        return self.of_kind("changed")

    @property
    def actions(self) -> list[Notice]:
        return self.of_kind("action")


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class Token:
    text: str
    line: int
    quoted: bool = False

    @property
    def is_open(self) -> bool:
        return self.text == "{" and not self.quoted

    @property
    def is_close(self) -> bool:
        return self.text == "}" and not self.quoted


def tokenize(text: str) -> list[Token]:
    """Words, quoted strings and braces, with their line numbers; comments removed."""
    tokens: list[Token] = []
    line = 1
    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\n":
            line += 1
            i += 1
        elif char.isspace():
            i += 1
        elif char == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif char in "{}":
            tokens.append(Token(char, line))
            i += 1
        elif char == '"':
            end = text.find('"', i + 1)
            newline = text.find("\n", i + 1)
            if end < 0 or (0 <= newline < end):
                raise ConntrackdSyntaxError(line, "unterminated quoted string")
            tokens.append(Token(text[i + 1 : end], line, quoted=True))
            i = end + 1
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] not in '{}#"':
                i += 1
            tokens.append(Token(text[start:i], line))
    return tokens


# --------------------------------------------------------------------------- grammar


@dataclass
class Node:
    """One directive: ``name`` with its header words or value (``args``) and, for blocks,
    the directives (``children``) or bare words (``words``) between its braces."""

    name: str
    args: list[str]
    line: int
    children: list[Node] | None = None
    words: list[Token] | None = None

    def path(self, parent: str) -> str:
        return f"{parent}.{self.name}" if parent else self.name


@dataclass(frozen=True)
class _Value:
    """A directive with exactly one value, of one of ``kinds`` (see :data:`_VALUE_CHECKS`)."""

    kinds: tuple[str, ...] = ("number",)


@dataclass(frozen=True)
class _Block:
    """``NAME header... { directives of context }``; header word counts in [low, high]."""

    context: str
    low: int = 0
    high: int = 0


@dataclass(frozen=True)
class _Words:
    """``NAME header... { bare words }``."""

    low: int = 0
    high: int = 0


@dataclass(frozen=True)
class _ValueOrWords:
    """``NAME value`` or ``NAME { bare words }`` (ExpectationSync)."""


_Spec = _Value | _Block | _Words | _ValueOrWords

_NUMBER: Final = _Value(("number",))
_BOOL: Final = _Value(("bool",))
_IP: Final = _Value(("ip",))
_NAME: Final = _Value(("string",))

_CHANNEL: Final[dict[str, _Spec]] = {
    "IPv4_address": _IP,
    "IPv6_address": _IP,
    "IPv4_interface": _IP,
    "IPv6_interface": _IP,
    "IPv4_Destination_Address": _IP,
    "IPv6_Destination_Address": _IP,
    "Interface": _NAME,
    "Group": _NUMBER,
    "Port": _NUMBER,
    "SndSocketBuffer": _NUMBER,
    "RcvSocketBuffer": _NUMBER,
    "Checksum": _BOOL,
    "ErrorQueueLength": _NUMBER,
}

GRAMMAR: Final[dict[str, dict[str, _Spec]]] = {
    "": {
        "General": _Block("General"),
        "Sync": _Block("Sync"),
        "Stats": _Block("Stats"),
        "Helper": _Block("Helper"),
    },
    "Sync": {
        "Mode": _Block("Mode", 1, 1),
        "Multicast": _Block("Channel", 0, 1),
        "UDP": _Block("Channel", 0, 1),
        "TCP": _Block("Channel", 0, 1),
        "Options": _Block("Options"),
        "RefreshTime": _NUMBER,
        "CacheTimeout": _NUMBER,
        "CommitTimeout": _NUMBER,
        "PurgeTimeout": _NUMBER,
    },
    "Mode": {
        "ResendQueueSize": _NUMBER,
        "CommitTimeout": _NUMBER,
        "PurgeTimeout": _NUMBER,
        "ACKWindowSize": _NUMBER,
        "DisableExternalCache": _BOOL,
        "DisableInternalCache": _BOOL,
        "StartupResync": _BOOL,
        "RefreshTime": _NUMBER,
        "CacheTimeout": _NUMBER,
    },
    "Channel": _CHANNEL,
    "Options": {
        "TCPWindowTracking": _BOOL,
        "ExpectationSync": _ValueOrWords(),
        "ErrorQueueLength": _NUMBER,
    },
    "General": {
        "HashSize": _NUMBER,
        "HashLimit": _NUMBER,
        "LogFile": _Value(("bool", "path")),
        "Syslog": _Value(("bool", "string")),
        "LockFile": _Value(("path",)),
        "NetlinkBufferSize": _NUMBER,
        "NetlinkBufferSizeMaxGrowth": _NUMBER,
        "SocketBufferSize": _NUMBER,  # old aliases conntrackd still accepts
        "SocketBufferSizeMaxGrown": _NUMBER,
        "SocketBufferSizeMaxGrowth": _NUMBER,
        "EventIterationLimit": _NUMBER,
        "PollSecs": _NUMBER,
        "NetlinkOverrunResync": _Value(("bool", "number")),
        "NetlinkEventsReliable": _BOOL,
        "Nice": _Value(("signed",)),
        "Systemd": _BOOL,
        "UNIX": _Block("UNIX"),
        "Filter": _Block("Filter", 0, 2),
        "Scheduler": _Block("Scheduler"),
    },
    "UNIX": {"Path": _Value(("path",)), "Backlog": _NUMBER},
    "Scheduler": {"Type": _NAME, "Priority": _NUMBER},
    "Filter": {
        "Protocol": _Words(1, 1),
        "Address": _Block("Address", 1, 1),
        "State": _Words(1, 1),
    },
    "Address": {"IPv4_address": _IP, "IPv6_address": _IP},
    "Stats": {"LogFile": _Value(("bool", "path")), "Syslog": _Value(("bool", "string"))},
    "Helper": {"Type": _Block("HelperType", 3, 3)},
    "HelperType": {
        "QueueNum": _NUMBER,
        "QueueLen": _NUMBER,
        "Policy": _Block("HelperPolicy", 1, 1),
    },
    "HelperPolicy": {"ExpectMax": _NUMBER, "ExpectTimeout": _NUMBER},
}


_TRUE: Final = frozenset({"on", "yes"})
_FALSE: Final = frozenset({"off", "no"})


def _is_ip(text: str) -> bool:
    address, _, prefix = text.partition("/")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return not prefix or prefix.isdigit()


# What conntrackd's lexer accepts for each kind of value (src/read_config_lex.l); a quoted
# string is taken wherever a path or a name is.
_VALUE_CHECKS: Final[dict[str, tuple[str, Callable[[Token], bool]]]] = {
    "number": ("a number", lambda t: not t.quoted and t.text.isdigit()),
    "signed": (
        "a signed number",
        lambda t: not t.quoted and t.text[:1] in "+-" and t.text[1:].isdigit(),
    ),
    "bool": ("on/off (or yes/no)", lambda t: t.text.lower() in _TRUE | _FALSE),
    "ip": ("an IP address", lambda t: not t.quoted and _is_ip(t.text)),
    "path": ("an absolute path", lambda t: t.text.startswith("/")),
    "string": ("a name", lambda t: t.quoted or bool(re.fullmatch(r"[A-Za-z][\w.-]*", t.text))),
}

_ALIASES: Final = {
    "SocketBufferSize": "NetlinkBufferSize",
    "SocketBufferSizeMaxGrown": "NetlinkBufferSizeMaxGrowth",
    "SocketBufferSizeMaxGrowth": "NetlinkBufferSizeMaxGrowth",
}


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _next(self, what: str, line: int) -> Token:
        token = self._peek()
        if token is None:
            raise ConntrackdSyntaxError(line, f"unexpected end of file: expected {what}")
        self.pos += 1
        return token

    def parse(self) -> list[Node]:
        nodes = self._directives("", closing=False, line=0)
        return nodes

    def _directives(self, context: str, *, closing: bool, line: int) -> list[Node]:
        grammar = GRAMMAR[context]
        by_lower = {name.lower(): name for name in grammar}
        nodes: list[Node] = []
        while True:
            token = self._peek()
            if token is None:
                if closing:
                    raise ConntrackdSyntaxError(line, "unexpected end of file: missing '}'")
                return nodes
            if token.is_close:
                if not closing:
                    raise ConntrackdSyntaxError(token.line, "'}' without a matching '{'")
                self.pos += 1
                return nodes
            if token.is_open or token.quoted:
                raise ConntrackdSyntaxError(
                    token.line, f"unexpected {token.text!r}: expected a directive"
                )
            name = by_lower.get(token.text.lower())
            if name is None:
                where = f"in {context}" if context else "at the top level"
                known = ", ".join(grammar)
                raise ConntrackdSyntaxError(
                    token.line, f"unknown directive {token.text!r} {where} (known: {known})"
                )
            self.pos += 1
            nodes.append(self._directive(_ALIASES.get(name, name), grammar[name], token.line))

    def _header(self, name: str, line: int, low: int, high: int) -> list[str]:
        words: list[str] = []
        while True:
            token = self._next(f"'{{' after {name}", line)
            if token.is_open:
                break
            if token.is_close:
                raise ConntrackdSyntaxError(token.line, f"unexpected '}}' after {name}")
            words.append(token.text)
        if not low <= len(words) <= high:
            expected = f"{low}" if low == high else f"{low} to {high}"
            raise ConntrackdSyntaxError(
                line, f"{name} takes {expected} word(s) before '{{', got {len(words)}"
            )
        return words

    def _words(self, name: str, line: int) -> list[Token]:
        words: list[Token] = []
        while True:
            token = self._next(f"'}}' closing {name}", line)
            if token.is_close:
                return words
            if token.is_open:
                raise ConntrackdSyntaxError(token.line, f"unexpected '{{' inside {name}")
            words.append(token)

    def _directive(self, name: str, spec: _Spec, line: int) -> Node:
        if isinstance(spec, _Value):
            value = self._next(f"a value for {name}", line)
            if value.is_open or value.is_close:
                raise ConntrackdSyntaxError(value.line, f"{name} needs a value")
            checks = [_VALUE_CHECKS[kind] for kind in spec.kinds]
            if not any(check(value) for _, check in checks):
                expected = " or ".join(what for what, _ in checks)
                raise ConntrackdSyntaxError(
                    value.line, f"{name}: expected {expected}, got {value.text!r}"
                )
            return Node(name, [value.text], line)
        if isinstance(spec, _Block):
            args = self._header(name, line, spec.low, spec.high)
            children = self._directives(spec.context, closing=True, line=line)
            return Node(name, args, line, children=children)
        if isinstance(spec, _Words):
            args = self._header(name, line, spec.low, spec.high)
            return Node(name, args, line, words=self._words(name, line))
        token = self._next(f"a value or '{{' for {name}", line)
        if token.is_open:
            return Node(name, [], line, words=self._words(name, line))
        if token.is_close:
            raise ConntrackdSyntaxError(token.line, f"{name} needs a value")
        return Node(name, [token.text], line)


def parse_conntrackd(text: str) -> list[Node]:
    """The directive tree of a conntrackd.conf; raises :class:`ConntrackdSyntaxError`."""
    return _Parser(tokenize(text)).parse()


# --------------------------------------------------------------------------- values


# /etc/protocols (Debian netbase) names conntrackd resolves with getprotobyname(), for
# protocols ctsync has no name for: written as numbers, which accept-protocol takes.
_PROTOCOL_NUMBERS: Final[dict[str, int]] = {
    "ip": 0, "hopopt": 0, "igmp": 2, "ggp": 3, "ipencap": 4, "st": 5, "egp": 8, "igp": 9,
    "pup": 12, "hmp": 20, "xns-idp": 22, "rdp": 27, "iso-tp4": 29, "xtp": 36, "ddp": 37,
    "idpr-cmtp": 38, "ipv6": 41, "ipv6-route": 43, "ipv6-frag": 44, "idrp": 45, "rsvp": 46,
    "esp": 50, "ah": 51, "skip": 57, "ipv6-nonxt": 59, "ipv6-opts": 60, "rspf": 73,
    "vmtp": 81, "eigrp": 88, "ospf": 89, "ax.25": 93, "ipip": 94, "etherip": 97,
    "encap": 98, "pim": 103, "ipcomp": 108, "vrrp": 112, "l2tp": 115, "isis": 124,
    "fc": 133, "mobility-header": 135, "mpls-in-ip": 137, "manet": 138, "hip": 139,
    "shim6": 140, "wesp": 141, "rohc": 142, "ethernet": 143,
}  # fmt: skip
# Names ctsync's accept-protocol knows (VyOS's spelling where VyOS has one).
_PROTOCOL_NAMES: Final[dict[str, str]] = {
    "tcp": "tcp",
    "udp": "udp",
    "icmp": "icmp",
    "ipv6-icmp": "icmp6",
    "icmpv6": "icmp6",
    "icmp6": "icmp6",
    "sctp": "sctp",
    "dccp": "dccp",
    "gre": "gre",
    "udplite": "udplite",
}

# conntrackd's TCP state keywords -> ctsync's sync.tcp-states names.
_TCP_STATES: Final[dict[str, str]] = {
    "SYN_SENT": "SYN_SENT",
    "SYN_RECV": "SYN_RECV",
    "ESTABLISHED": "ESTABLISHED",
    "FIN_WAIT": "FIN_WAIT",
    "CLOSE_WAIT": "CLOSE_WAIT",
    "LAST_ACK": "LAST_ACK",
    "TIME_WAIT": "TIME_WAIT",
    "CLOSE": "CLOSE",
    "CLOSED": "CLOSE",
    "LISTEN": "LISTEN",
}
_ALL_TCP_STATES: Final[tuple[str, ...]] = (
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "LISTEN",
)

# Kernel helper names (what conntrackd's ExpectationSync lists) -> ctsync expect-sync names.
_HELPER_TO_EXPECT: Final[dict[str, str]] = {
    "ftp": "ftp",
    "sip": "sip",
    "ras": "h323",
    "q.931": "h323",
    "h.245": "h323",
    "rpc": "nfs",
    "tns": "sqlnet",
}
_H323_HELPERS: Final = ("ras", "q.931", "h.245")
# VyOS writes its own names into ExpectationSync verbatim; conntrackd then matches nothing.
_VYOS_EXPECT_NAMES: Final[dict[str, str]] = {
    "h323": "RAS, Q.931 and H.245",
    "nfs": "rpc",
    "sqlnet": "tns",
}


def _bool(node: Node, parent: str) -> bool:
    value = node.args[0].lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConntrackdSyntaxError(
        node.line, f"{node.path(parent)}: expected on/off (or yes/no), got {node.args[0]!r}"
    )


def _number(node: Node, parent: str) -> int:
    value = node.args[0]
    if not value.isdigit():
        raise ConntrackdSyntaxError(
            node.line, f"{node.path(parent)}: expected a number, got {value!r}"
        )
    return int(value)


def _mib(size: int) -> int:
    """Bytes -> whole MiB, rounded up (ctsync sizes are in MiB)."""
    return max(1, math.ceil(size / MIB))


def _fmt_bytes(size: int) -> str:
    if size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size} bytes ({size / MIB:.2f} MiB)"


# --------------------------------------------------------------------------- mapping


@dataclass
class _Channel:
    kind: str  # Multicast | UDP | TCP
    line: int
    default: bool
    interface: str | None = None
    group: str | None = None
    port: int | None = None
    listen: str | None = None
    listen_line: int = 0
    peer: str | None = None
    buffers: list[int] = field(default_factory=list)
    lines: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (directive, line)

    def source(self, key: str) -> str:
        directive, line = self.lines.get(key, ("", self.line))
        return f"Sync.{self.kind}{' ' + directive if directive else ''} (line {line})"


@dataclass
class _Entry:
    """One TOML key to write: value, where it came from, and comment lines above it."""

    key: str
    value: object
    source: str = ""
    notes: list[str] = field(default_factory=list)


class _Importer:
    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self.sync: dict[str, _Entry] = {}
        self.links: list[list[_Entry]] = []
        self.channels: list[_Channel] = []
        self.protocols: list[str] = []
        self.protocol_source = ""
        self.addresses: list[str] = []
        self.address_source = ""
        self.states: list[str] = []
        self.state_source = ""
        self.expect: list[str] = []
        self.expect_source = ""
        self.netlink_size: tuple[int, int] | None = None  # (bytes, line)
        self.netlink_max: tuple[int, int] | None = None
        self.seen_sync = False
        self.seen_stats = 0

    # --- notices -----------------------------------------------------------------------

    def drop(self, node: Node, parent: str, message: str) -> None:
        self.notices.append(Notice("dropped", node.line, _label(node, parent), message))

    def change(self, node: Node, parent: str, message: str) -> None:
        self.notices.append(Notice("changed", node.line, _label(node, parent), message))

    def set(self, key: str, value: object, node: Node, parent: str, *notes: str) -> None:
        self.sync[key] = _Entry(key, value, f"{_label(node, parent)} (line {node.line})", [*notes])

    # --- walking -----------------------------------------------------------------------

    def run(self, nodes: Sequence[Node]) -> None:
        for node in nodes:
            if node.name == "Sync":
                self.seen_sync = True
                self._sync(node.children or [])
            elif node.name == "General":
                self._general(node.children or [])
            elif node.name == "Stats":
                self.seen_stats = node.line
            elif node.name == "Helper":
                types = [" ".join(t.args) for t in node.children or []]
                self.drop(
                    node,
                    "",
                    "ctsync runs no user-space conntrack helpers"
                    + (f" (here: {', '.join(types)})" if types else "")
                    + "; keep conntrackd for them with only its General and Helper sections,"
                    " or use the kernel's helpers",
                )
        if self.seen_stats and self.seen_sync:
            raise ConntrackdSyntaxError(
                self.seen_stats, "Stats and Sync in one file (conntrackd refuses this too)"
            )
        if not self.seen_sync:
            if self.seen_stats:
                raise ConntrackdSyntaxError(
                    self.seen_stats,
                    "this is a statistics-mode configuration (Stats { ... }): it syncs"
                    " nothing, so there is nothing for ctsync to import",
                )
            raise ConntrackdSyntaxError(0, "no Sync section: nothing to import")
        if not self.channels:
            raise ConntrackdSyntaxError(
                0, "the Sync section has no Multicast, UDP or TCP block: no sync link to import"
            )
        self._finish_channels()
        self._finish_filters()
        self._finish_netlink()

    def _sync(self, nodes: Sequence[Node]) -> None:
        for node in nodes:
            if node.name == "Mode":
                self._mode(node)
            elif node.name in ("Multicast", "UDP", "TCP"):
                self._channel(node)
            elif node.name == "Options":
                self._options(node.children or [])
            else:
                self._mode_option(node, "Sync")

    def _mode(self, node: Node) -> None:
        mode = node.args[0].upper()
        aliases = {"NACK": "FTFW", "PERSISTENT": "ALARM"}
        mode = aliases.get(mode, mode)
        if mode not in ("FTFW", "NOTRACK", "ALARM"):
            raise ConntrackdSyntaxError(
                node.line, f"Sync.Mode: unknown mode {node.args[0]!r} (FTFW, NOTRACK or ALARM)"
            )
        path = f"Sync.Mode {mode}"
        if mode == "NOTRACK":
            self._note_mode(
                node,
                "ctsync's sync is always acknowledged and repaired (as FTFW), not best effort",
            )
        elif mode == "ALARM":
            self._note_mode(
                node,
                "ctsync sends each change once, acknowledged, and repairs divergence by"
                " exchanging digests (sync.digest-interval) instead of periodic refreshes",
            )
        for child in node.children or []:
            self._mode_option(child, path)

    def _note_mode(self, node: Node, message: str) -> None:
        self.notices.append(Notice("changed", node.line, f"Sync.Mode {node.args[0]}", message))

    def _mode_option(self, node: Node, parent: str) -> None:
        name = node.name
        if name == "CommitTimeout":
            self.set("commit-timeout", _number(node, parent), node, parent)
        elif name == "PurgeTimeout":
            value = _number(node, parent)
            if value == 0:
                self.drop(node, parent, "0 means conntrackd's default (60 s), ctsync's too")
            else:
                self.set("purge-timeout", value, node, parent)
        elif name == "DisableExternalCache":
            self.set("disable-external-cache", _bool(node, parent), node, parent)
        elif name == "StartupResync":
            self.set("startup-resync", _bool(node, parent), node, parent)
        elif name == "DisableInternalCache":
            if _bool(node, parent):
                self.drop(node, parent, "ctsync always keeps its internal cache")
        elif name == "ResendQueueSize":
            self._resend_queue(node, parent)
        elif name == "ACKWindowSize":
            self.drop(
                node,
                parent,
                "ctsync acknowledges by time and sequence gaps; its window is not configurable",
            )
        elif name in ("RefreshTime", "CacheTimeout"):
            self.drop(
                node,
                parent,
                "ALARM mode's periodic refresh has no equivalent; ctsync repairs divergence"
                " by exchanging digests (sync.digest-interval)",
            )

    def _resend_queue(self, node: Node, parent: str) -> None:
        entries = _number(node, parent)
        mib = _mib(entries * RESEND_BYTES_PER_ENTRY)
        if mib > DEFAULT_RESEND_MIB:
            self.set(
                "resend-queue-size",
                mib,
                node,
                parent,
                f"ResendQueueSize {entries} messages, at ~{RESEND_BYTES_PER_ENTRY} bytes per"
                " queued entry",
            )
            self.change(
                node, parent, f"{entries} messages -> resend-queue-size = {mib} (MiB of entries)"
            )
        else:
            self.drop(
                node,
                parent,
                f"{entries} messages; ctsync's queue is sized in MiB and its default"
                f" ({DEFAULT_RESEND_MIB} MiB, ~{DEFAULT_RESEND_MIB * MIB // RESEND_BYTES_PER_ENTRY}"
                " entries) already holds more",
            )

    def _channel(self, node: Node) -> None:
        default = False
        for word in node.args:
            if word.lower() != "default":
                raise ConntrackdSyntaxError(
                    node.line, f"Sync.{node.name}: expected 'Default' or '{{', got {word!r}"
                )
            default = True
        kinds = {c.kind if c.kind != "TCP" else "UDP" for c in self.channels}
        kind = "UDP" if node.name == "TCP" else node.name
        if kinds and kind not in kinds:
            raise ConntrackdSyntaxError(
                node.line,
                f"Sync.{node.name}: cannot mix Multicast with UDP/TCP links (conntrackd refuses"
                " this too)",
            )
        if len(self.channels) >= MAX_LINKS:
            raise ConntrackdSyntaxError(
                node.line,
                f"too many dedicated links (conntrackd's and ctsync's limit: {MAX_LINKS})",
            )
        channel = _Channel(node.name, node.line, default)
        parent = f"Sync.{node.name}"
        if node.name == "TCP":
            self.change(
                node,
                "Sync",
                "ctsync has no TCP transport; the link becomes unicast UDP between the same"
                " addresses and port (acknowledged and repaired like the rest of ctsync's sync)",
            )
        locals_seen: list[Node] = []
        peers_seen: list[Node] = []
        for child in node.children or []:
            self._channel_option(channel, child, parent, locals_seen, peers_seen)
        for seen, what in ((locals_seen, "local address"), (peers_seen, "destination")):
            for extra in seen[:-1]:
                self.drop(
                    extra,
                    parent,
                    f"several {what}es in one block: conntrackd uses the last one"
                    f" ({seen[-1].args[0]}), and so does this import",
                )
        self.channels.append(channel)

    def _channel_option(
        self,
        channel: _Channel,
        node: Node,
        parent: str,
        locals_seen: list[Node],
        peers_seen: list[Node],
    ) -> None:
        name = node.name
        value = node.args[0]
        multicast = channel.kind == "Multicast"
        keys = {
            "IPv4_address": "mcast-group" if multicast else "listen-address",
            "IPv6_address": "mcast-group" if multicast else "listen-address",
            "IPv4_Destination_Address": "peer",
            "IPv6_Destination_Address": "peer",
            "IPv4_interface": "listen-address",
            "Interface": "interface",
            "Group": "port",
            "Port": "port",
        }
        if name in keys:
            channel.lines[keys[name]] = (name, node.line)
        if name in ("IPv4_address", "IPv6_address"):
            if multicast:
                channel.group = _address(node, parent)
            else:
                channel.listen, channel.listen_line = _address(node, parent), node.line
                locals_seen.append(node)
        elif name in ("IPv4_Destination_Address", "IPv6_Destination_Address") and not multicast:
            channel.peer = _address(node, parent)
            peers_seen.append(node)
        elif name == "IPv4_interface" and multicast:
            channel.listen, channel.listen_line = _address(node, parent), node.line
        elif name == "IPv6_interface" and multicast:
            self.drop(node, parent, "conntrackd ignores it too ('not required')")
        elif name == "Interface":
            channel.interface = value
        elif (name == "Group" and multicast) or (name == "Port" and not multicast):
            channel.port = _number(node, parent)
        elif name in ("SndSocketBuffer", "RcvSocketBuffer"):
            channel.buffers.append(_number(node, parent))
        elif name == "Checksum":
            if not _bool(node, parent):
                self.drop(
                    node,
                    parent,
                    "ctsync keeps UDP checksums on, and authenticates every datagram",
                )
        elif name == "ErrorQueueLength" and channel.kind == "TCP":
            self.drop(node, parent, "TCP's error queue has no equivalent over UDP")
        else:
            raise ConntrackdSyntaxError(
                node.line, f"{parent}: {name} does not apply to a {channel.kind} block"
            )

    def _options(self, nodes: Sequence[Node]) -> None:
        parent = "Sync.Options"
        for node in nodes:
            if node.name == "TCPWindowTracking":
                if _bool(node, parent):
                    self.drop(
                        node,
                        parent,
                        "ctsync commits TCP entries with window scaling and BE_LIBERAL (as"
                        " conntrackd does with it off); window tracking resumes from traffic",
                    )
            elif node.name == "ErrorQueueLength":
                self.drop(node, parent, "TCP's error queue has no equivalent over UDP")
            elif node.words is None:
                if _bool(node, parent):
                    self.expect = ["all"]
                    self.expect_source = f"{_label(node, parent)} (line {node.line})"
            else:
                self._expect_list(node, parent)

    def _expect_list(self, node: Node, parent: str) -> None:
        names: list[str] = []
        helpers = [t.text.lower() for t in node.words or []]
        for token in node.words or []:
            helper = token.text.lower()
            mapped = _HELPER_TO_EXPECT.get(helper)
            if mapped is None and helper in _VYOS_EXPECT_NAMES:
                mapped = helper
                self.change(
                    node,
                    parent,
                    f"{token.text!r} is VyOS's name and matches no kernel helper in conntrackd"
                    f" (nothing was synced for it); ctsync's {helper!r} syncs the expectations"
                    f" of {_VYOS_EXPECT_NAMES[helper]}",
                )
            if mapped is None:
                self.notices.append(
                    Notice(
                        "dropped",
                        token.line,
                        f"{_label(node, parent)} {token.text}",
                        "ctsync syncs expectations of the ftp, sip, H.323 (ras, q.931, h.245),"
                        " rpc and tns helpers only",
                    )
                )
                continue
            if mapped not in names:
                names.append(mapped)
        partial = [h for h in _H323_HELPERS if h not in helpers]
        if "h323" in names and any(h in helpers for h in _H323_HELPERS) and partial:
            self.change(
                node,
                parent,
                f"ctsync's h323 covers all of RAS, Q.931 and H.245 (also {', '.join(partial)})",
            )
        self.expect = names
        self.expect_source = f"{_label(node, parent)} (line {node.line})"

    def _general(self, nodes: Sequence[Node]) -> None:
        parent = "General"
        for node in nodes:
            name = node.name
            if name in ("HashSize", "HashLimit"):
                self.drop(node, parent, "ctsync's caches size themselves and have no fixed limit")
            elif name == "LogFile":
                if node.args[0].lower() not in _FALSE:
                    self.drop(
                        node,
                        parent,
                        "ctsync logs to stderr (the journal under systemd); see [log]",
                    )
            elif name == "Syslog":
                if node.args[0].lower() not in _FALSE:
                    self.drop(
                        node,
                        parent,
                        "ctsync logs to stderr; under systemd the journal forwards to syslog",
                    )
            elif name == "LockFile":
                self.drop(node, parent, "not needed: a second agent finds the control socket taken")
            elif name == "UNIX":
                for child in node.children or []:
                    if child.name == "Path":
                        self.drop(
                            child,
                            "General.UNIX",
                            "ctsync's commands (ctsync commit, flush, resync, show ...) talk to"
                            " the agent on /run/ctsync/ctsync.sock (control.socket), where"
                            " the systemd unit's runtime directory is",
                        )
                    else:
                        self.drop(child, "General.UNIX", "deprecated in conntrackd too")
            elif name == "NetlinkBufferSize":
                self.netlink_size = (_number(node, parent), node.line)
            elif name == "NetlinkBufferSizeMaxGrowth":
                self.netlink_max = (_number(node, parent), node.line)
            elif name == "NetlinkOverrunResync":
                self.drop(
                    node,
                    parent,
                    "ctsync always reconciles its cache with a table dump right after the"
                    " kernel reports lost events",
                )
            elif name == "NetlinkEventsReliable":
                if _bool(node, parent):
                    self.drop(
                        node,
                        parent,
                        "ctsync does not make the kernel drop packets when it cannot deliver"
                        " an event; lost events are counted and recovered by a table dump",
                    )
            elif name == "EventIterationLimit":
                self.drop(node, parent, "ctsync reads events in batches of its own")
            elif name == "PollSecs":
                self.drop(
                    node,
                    parent,
                    "ctsync always follows kernel events (no polling mode)",
                )
            elif name in ("Nice", "Scheduler"):
                self.drop(
                    node,
                    parent,
                    "set scheduling in the systemd unit (Nice=, CPUSchedulingPolicy=) if needed",
                )
            elif name == "Systemd":
                if not _bool(node, parent):
                    self.drop(node, parent, "ctsync always notifies systemd when run by it")
            elif name == "Filter":
                self._filter(node)

    def _filter(self, node: Node) -> None:
        words = [w.lower() for w in node.args]
        if words not in ([], ["from", "userspace"], ["from", "kernelspace"]):
            raise ConntrackdSyntaxError(
                node.line, "General.Filter: expected 'From Userspace' or 'From Kernelspace'"
            )
        if words == ["from", "kernelspace"]:
            self.change(
                node,
                "General",
                "ctsync filters in user space, matching addresses as conntrackd's user-space"
                " filter does (original or reply source)",
            )
        parent = "General.Filter"
        for child in node.children or []:
            action = child.args[0].lower()
            if action not in ("accept", "ignore"):
                raise ConntrackdSyntaxError(
                    child.line, f"{parent}.{child.name}: expected Accept or Ignore"
                )
            if child.name == "Protocol":
                self._protocols(child, parent, action)
            elif child.name == "Address":
                self._addresses(child, parent, action)
            else:
                self._states(child, parent, action)

    def _protocols(self, node: Node, parent: str, action: str) -> None:
        label = f"{parent}.Protocol {node.args[0]}"
        if action == "ignore":
            self.notices.append(
                Notice(
                    "dropped",
                    node.line,
                    label,
                    "ctsync has accept-protocol only: the protocols listed here are synced",
                )
            )
            return
        self.protocol_source = f"{label} (line {node.line})"
        if not node.words:
            self.notices.append(
                Notice(
                    "changed",
                    node.line,
                    label,
                    "an empty list makes conntrackd sync nothing; ctsync's empty"
                    " accept-protocol syncs every protocol",
                )
            )
        for token in node.words or []:
            name = token.text.lower()
            # getprotobyname() takes names only; ctsync knows a few by name, the rest by number.
            value: str | int | None = _PROTOCOL_NAMES.get(name, _PROTOCOL_NUMBERS.get(name))
            if value is None:
                self.notices.append(
                    Notice(
                        "dropped",
                        token.line,
                        f"{label} {token.text}",
                        "not a protocol name (conntrackd ignores it too)",
                    )
                )
            elif str(value) not in self.protocols:
                self.protocols.append(str(value))

    def _addresses(self, node: Node, parent: str, action: str) -> None:
        label = f"{parent}.Address {node.args[0]}"
        if action == "accept":
            self.notices.append(
                Notice(
                    "dropped",
                    node.line,
                    label,
                    "ctsync has ignore-address only: entries of every address are synced"
                    " (list the firewall's own addresses in ignore-address instead)",
                )
            )
            return
        self.address_source = f"{label} (line {node.line})"
        for child in node.children or []:
            text = child.args[0]
            try:
                network = ipaddress.ip_network(text, strict=False)
            except ValueError:
                self.notices.append(
                    Notice(
                        "dropped",
                        child.line,
                        f"{label}.{child.name} {text}",
                        "not a valid address (conntrackd ignores it too)",
                    )
                )
                continue
            family = 4 if child.name == "IPv4_address" else 6
            if network.version != family:
                self.notices.append(
                    Notice(
                        "dropped",
                        child.line,
                        f"{label}.{child.name} {text}",
                        f"not an IPv{family} address (conntrackd ignores it too)",
                    )
                )
                continue
            if network.prefixlen == network.max_prefixlen:
                out = str(network.network_address)
            else:
                out = str(network)
            if out not in self.addresses:
                self.addresses.append(out)

    def _states(self, node: Node, parent: str, action: str) -> None:
        label = f"{parent}.State {node.args[0]}"
        words = [t.text for t in node.words or []]
        # "ESTABLISHED CLOSED ... for TCP", possibly several such groups.
        states: list[str] = []
        pending: list[str] = []
        i = 0
        while i < len(words):
            word = words[i]
            if word.lower() == "for":
                if i + 1 >= len(words) or words[i + 1].upper() != "TCP":
                    raise ConntrackdSyntaxError(node.line, f"{label}: expected 'for TCP'")
                states.extend(pending)
                pending = []
                i += 2
                continue
            if word.upper() not in _TCP_STATES:
                raise ConntrackdSyntaxError(node.line, f"{label}: unknown TCP state {word!r}")
            pending.append(_TCP_STATES[word.upper()])
            i += 1
        if pending:
            raise ConntrackdSyntaxError(node.line, f"{label}: the states must end with 'for TCP'")
        self.state_source = f"{label} (line {node.line})"
        if action == "accept":
            chosen = [s for s in _ALL_TCP_STATES if s in states]
        else:
            chosen = [s for s in _ALL_TCP_STATES if s not in states]
            self.notices.append(
                Notice(
                    "changed",
                    node.line,
                    label,
                    "ctsync lists the states to sync: written as tcp-states, every other state",
                )
            )
        self.states = chosen

    # --- results -------------------------------------------------------------------------

    def _finish_channels(self) -> None:
        channels = sorted(self.channels, key=lambda c: not c.default)  # Default one first
        if channels[0] is not self.channels[0]:
            first = channels[0]
            self.notices.append(
                Notice(
                    "changed",
                    first.line,
                    f"Sync.{first.kind} Default",
                    "written as the first [[sync.link]]: ctsync starts on the first link",
                )
            )
        buffers = [b for c in channels for b in c.buffers]
        if buffers:
            size = max(buffers)
            mib = min(_mib(size), 1024)
            notes = []
            if size % MIB or len(set(buffers)) > 1:
                notes.append(
                    f"Snd/RcvSocketBuffer {_fmt_bytes(size)}: one size for every sync socket,"
                    " in whole MiB (rounded up)"
                )
            line = next(c.line for c in channels if size in c.buffers)
            self.sync["sync-queue-size"] = _Entry(
                "sync-queue-size",
                mib,
                f"Sync.{channels[0].kind} Snd/RcvSocketBuffer (line {line})",
                notes,
            )
        links: list[list[_Entry]] = []
        for channel in channels:
            links.append(self._link(channel))
        if len(links) == 1:
            for entry in links[0]:
                self.sync[entry.key] = entry
        else:
            self.links = links

    def _link(self, channel: _Channel) -> list[_Entry]:
        where = f"Sync.{channel.kind}"
        out: list[_Entry] = []
        interface = channel.interface
        if interface is None:
            interface = PLACEHOLDER_INTERFACE
            self.notices.append(
                Notice(
                    "action",
                    channel.line,
                    where,
                    f"no Interface: set the sync interface (written as {interface!r})",
                )
            )
        out.append(_Entry("interface", interface, channel.source("interface")))
        unicast = channel.kind != "Multicast"
        family = 4
        if unicast:
            if channel.peer is None:
                raise ConntrackdSyntaxError(
                    channel.line, f"{where}: no IPv4/IPv6_Destination_Address (the peer)"
                )
            out.append(_Entry("peer", [channel.peer], channel.source("peer")))
            family = ipaddress.ip_address(channel.peer).version
        else:
            group = channel.group
            if group is None:
                group = DEFAULT_GROUP
                self.notices.append(
                    Notice(
                        "changed",
                        channel.line,
                        where,
                        f"no multicast address: ctsync's default {group} is used",
                    )
                )
            out.append(_Entry("mcast-group", group, channel.source("mcast-group")))
            family = ipaddress.ip_address(group).version
        port = channel.port
        if port is None:
            port = DEFAULT_PORT
            self.notices.append(
                Notice(
                    "changed",
                    channel.line,
                    where,
                    f"no {'Port' if unicast else 'Group'}: ctsync's default port {port} is used",
                )
            )
        out.append(_Entry("port", port, channel.source("port")))
        if channel.listen is not None:
            if ipaddress.ip_address(channel.listen).version != family:
                self.notices.append(
                    Notice(
                        "dropped",
                        channel.listen_line,
                        f"{where} local address {channel.listen}",
                        "not of the link's address family (conntrackd ignores it too)",
                    )
                )
            else:
                out.append(
                    _Entry("listen-address", channel.listen, channel.source("listen-address"))
                )
        return out

    def _finish_filters(self) -> None:
        if self.protocols or self.protocol_source:
            self.sync["accept-protocol"] = _Entry(
                "accept-protocol", self.protocols, self.protocol_source
            )
        if self.addresses:
            self.sync["ignore-address"] = _Entry(
                "ignore-address", self.addresses, self.address_source
            )
        if self.state_source:
            self.sync["tcp-states"] = _Entry("tcp-states", self.states, self.state_source)
        if self.expect:
            self.sync["expect-sync"] = _Entry("expect-sync", self.expect, self.expect_source)

    def _finish_netlink(self) -> None:
        given = [v for v in (self.netlink_size, self.netlink_max) if v is not None]
        if not given:
            return
        size, line = max(given)
        mib = min(_mib(size), 1024)
        parts = []
        if self.netlink_size is not None:
            parts.append(f"NetlinkBufferSize {_fmt_bytes(self.netlink_size[0])}")
        if self.netlink_max is not None:
            parts.append(f"NetlinkBufferSizeMaxGrowth {_fmt_bytes(self.netlink_max[0])}")
        growth = max(DEFAULT_QUEUE_MAX_MIB, mib)
        note = (
            f"{', '.join(parts)}: ctsync starts the event buffer at conntrackd's largest size"
            f" ({mib} MiB, as VyOS's event-listen-queue-size) and grows it up to"
            f" event-listen-queue-max ({growth} MiB) when the kernel reports lost events"
        )
        self.sync["event-listen-queue-size"] = _Entry(
            "event-listen-queue-size", mib, f"General.NetlinkBufferSize* (line {line})", [note]
        )
        if growth != DEFAULT_QUEUE_MAX_MIB:
            self.sync["event-listen-queue-max"] = _Entry(
                "event-listen-queue-max", growth, "at least event-listen-queue-size"
            )
        self.notices.append(Notice("changed", line, "General.NetlinkBufferSize*", note))


def _label(node: Node, parent: str) -> str:
    return f"{parent}.{node.name}" if parent else node.name


def _address(node: Node, parent: str) -> str:
    text = node.args[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConntrackdSyntaxError(
            node.line, f"{node.path(parent)}: {text!r} is not an IP address"
        ) from None
    return str(address)


# --------------------------------------------------------------------------- output

_SYNC_ORDER: Final = (
    "interface",
    "mcast-group",
    "port",
    "peer",
    "listen-address",
    "accept-protocol",
    "ignore-address",
    "tcp-states",
    "expect-sync",
    "event-listen-queue-size",
    "event-listen-queue-max",
    "sync-queue-size",
    "resend-queue-size",
    "startup-resync",
    "disable-external-cache",
    "commit-timeout",
    "purge-timeout",
)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__}")


def _integer_strings(values: list[object]) -> list[object]:
    return [int(v) if isinstance(v, str) and v.isdigit() else v for v in values]


def _entry_lines(entry: _Entry) -> Iterator[str]:
    for note in entry.notes:
        yield from _comment(note)
    value = entry.value
    if entry.key == "accept-protocol" and isinstance(value, list):
        value = _integer_strings(value)
    text = f"{entry.key} = {_toml(value)}"
    if entry.source and len(text) > 56:
        yield f"# {entry.source}:"
    elif entry.source:
        text += " " * max(38 - len(text), 1) + f"# {entry.source}"
    yield text


def _comment(text: str, width: int = 92) -> Iterator[str]:
    for line in textwrap.wrap(text, width - 2, subsequent_indent="  "):
        yield "# " + line


def _render(importer: _Importer, source: str) -> str:
    lines = [
        f"# ctsync configuration imported from {source} (ctsync config import-conntrackd).",
        "# Review it, then check it: ctsync config check /etc/ctsync/ctsync.toml",
        "# Every key, its default and meaning: ctsync.toml(5), docs/configuration.md.",
    ]
    sections: list[tuple[str, list[Notice]]] = [
        ("Before you start ctsync", [n for n in importer.notices if n.kind == "action"]),
        ("Not carried over", [n for n in importer.notices if n.kind == "dropped"]),
        ("Carried over with a change", [n for n in importer.notices if n.kind == "changed"]),
    ]
    for title, notices in sections:
        if not notices:
            continue
        lines += ["#", f"# {title}:"]
        for notice in notices:
            where = f"line {notice.line}: " if notice.line else ""
            subject = f"{notice.directive}: " if notice.directive else ""
            wrapped = textwrap.wrap(f"{where}{subject}{notice.message}", 86)
            lines.append("# - " + wrapped[0])
            lines += ["#   " + rest for rest in wrapped[1:]]
    lines += [
        "",
        "# CHANGE ME: this node's number, unique in the cluster (e.g. 1 here, 2 on the peer).",
        f"node-id = {PLACEHOLDER_NODE_ID}",
        "",
        "[sync]",
    ]
    for key in _SYNC_ORDER:
        if key in importer.sync:
            lines += _entry_lines(importer.sync[key])
    for link in importer.links:
        lines += ["", "[[sync.link]]"]
        for entry in link:
            lines += _entry_lines(entry)
    lines += [
        "",
        "[auth]",
        "# conntrackd has no authentication. ctsync authenticates every sync datagram with this",
        "# pre-shared key: the same file on every node, mode 0600. Create it once with",
        f"#   umask 077; openssl rand -base64 48 > {KEY_FILE}",
        "# and copy it to the other nodes.",
        f"key-file = {json.dumps(KEY_FILE)}",
        "",
        "[failover]",
        "# keepalived keeps deciding the roles: in its notify_master/backup/fault lines,",
        "# replace primary-backup.sh with `ctsync failover primary|backup|fault`, or use its",
        "# notify FIFO (notify-fifo, sync-group); examples in deploy/keepalived/.",
        '# ctsync can also run VRRP itself: mechanism = "vrrp" and [[vrrp.instance]].',
        'mechanism = "keepalived"',
    ]
    return "\n".join(lines) + "\n"


def import_conntrackd(text: str, source: str = "conntrackd.conf") -> ImportResult:
    """Translate a conntrackd.conf (its text) into ctsync TOML and the notices.

    Raises :class:`ConntrackdSyntaxError` for a file conntrackd would not accept, or one
    with nothing to import (no Sync section, no sync link).
    """
    importer = _Importer()
    importer.run(parse_conntrackd(text))
    actions = [
        Notice(
            "action",
            0,
            "",
            f"set node-id (written as {PLACEHOLDER_NODE_ID}): each node needs its own number",
        ),
        Notice(
            "action",
            0,
            "",
            f"create the pre-shared key {KEY_FILE} (same file on every node, mode 0600):"
            f" umask 077; openssl rand -base64 48 > {KEY_FILE}",
        ),
        Notice(
            "action",
            0,
            "",
            "in keepalived's notify lines, replace primary-backup.sh with"
            " `ctsync failover primary|backup|fault` (or use its notify FIFO), and stop"
            " conntrackd before starting ctsync",
        ),
    ]
    importer.notices[:0] = actions
    notices = tuple(sorted(importer.notices, key=_notice_order))
    importer.notices = list(notices)
    return ImportResult(_render(importer, source), notices)


def _notice_order(notice: Notice) -> tuple[int, int]:
    return ({"action": 0, "dropped": 1, "changed": 2}[notice.kind], notice.line)


__all__ = [
    "GRAMMAR",
    "ConntrackdSyntaxError",
    "ImportResult",
    "Node",
    "Notice",
    "Token",
    "import_conntrackd",
    "parse_conntrackd",
    "tokenize",
]
