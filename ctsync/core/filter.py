"""Which conntrack entries a cache takes: accept-protocol, ignore-address, TCP states;
and which expectations it takes: expect-sync's helper names (:class:`HelperFilter`).

Semantics follow conntrackd's userspace filter (src/filter.c), which VyOS drives:
- ``accept-protocol``: only these IP protocols pass (empty = all);
- ``ignore-address``: an entry is dropped when its original source or its reply source
  (the real endpoints, whatever NAT did) is in one of the addresses/prefixes;
- TCP states: only TCP entries in these states pass (empty = all); other protocols pass.

Filters work on record keys and values (see ``ctsync.core.record``) so the event path
never builds an Entry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from ctsync.core import record
from ctsync.core.entry import IPPROTO_TCP, PROTO_NUMBERS, TcpState

_KIND_MASK = ~record.KEY_ZONE & 0xFF
_V4_KINDS = frozenset((record.KEY_V4_PORTS, record.KEY_V4_ICMP))
_V6_KINDS = frozenset((record.KEY_V6_PORTS, record.KEY_V6_ICMP))
_RAW = record.KEY_RAW
_VAL_REPLY = record.VAL_REPLY


def parse_protocol(name: str) -> int:
    """A protocol name as VyOS/conntrackd spell it (tcp, udp, icmp, icmp6, ...) or a number."""
    text = name.strip().lower()
    if text.isdigit() and 0 <= int(text) <= 255:
        return int(text)
    aliases = {"ipv6-icmp": "icmpv6", "icmp6": "icmpv6"}
    number = PROTO_NUMBERS.get(aliases.get(text, text))
    if number is None:
        raise ValueError(f"unknown protocol {name!r}")
    return number


def parse_tcp_state(name: str) -> int:
    text = name.strip().upper().replace("-", "_")
    if text == "LISTEN":
        return TcpState.SYN_SENT2
    try:
        return TcpState[text]
    except KeyError:
        raise ValueError(f"unknown TCP state {name!r}") from None


@dataclass(frozen=True)
class EntryFilter:
    """A compiled filter. Build it with :meth:`build`; test records with :meth:`accepts`."""

    protocols: frozenset[int] = frozenset()
    exact_addresses: frozenset[bytes] = frozenset()
    networks: tuple[tuple[int, int, int], ...] = ()  # (address length, network int, prefix)
    tcp_states: frozenset[int] = frozenset()
    description: dict[str, list[str]] = field(default_factory=dict, compare=False)
    _aligned: dict[int, tuple[tuple[int, frozenset[bytes]], ...]] = field(
        init=False, repr=False, compare=False
    )
    _shifted: dict[int, tuple[tuple[int, frozenset[int]], ...]] = field(
        init=False, repr=False, compare=False
    )
    _by_address: bool = field(init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        accept_protocols: Iterable[str | int] = (),
        ignore_addresses: Iterable[str] = (),
        tcp_states: Iterable[str | int] = (),
    ) -> EntryFilter:
        """Compile config values; raises ValueError naming the bad value."""
        protocols = frozenset(
            p if isinstance(p, int) else parse_protocol(p) for p in accept_protocols
        )
        exact: set[bytes] = set()
        networks: list[tuple[int, int, int]] = []
        ignored = list(ignore_addresses)
        for text in ignored:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"invalid address or prefix {text!r}") from None
            size = 4 if net.version == 4 else 16
            if net.prefixlen == size * 8:
                exact.add(net.network_address.packed)
            else:
                networks.append((size, int(net.network_address), net.prefixlen))
        states = frozenset(s if isinstance(s, int) else parse_tcp_state(s) for s in tcp_states)
        return cls(
            protocols,
            frozenset(exact),
            tuple(networks),
            states,
            {
                "accept_protocol": [str(p) for p in accept_protocols],
                "ignore_address": ignored,
                "tcp_states": [str(s) for s in tcp_states],
            },
        )

    @property
    def accepts_all(self) -> bool:
        return not (self.protocols or self.exact_addresses or self.networks or self.tcp_states)

    def __post_init__(self) -> None:
        # Compiled once for the event path: ignored prefixes as byte strings per address
        # length where the prefix ends on a byte boundary (one slice and one set lookup),
        # shifted integers per prefix length otherwise.
        aligned: dict[int, dict[int, set[bytes]]] = {}
        shifted: dict[int, dict[int, set[int]]] = {}
        for size, network, prefix in self.networks:
            bits = size * 8
            if prefix % 8 == 0:
                raw = network.to_bytes(size, "big")[: prefix // 8]
                aligned.setdefault(size, {}).setdefault(prefix // 8, set()).add(raw)
            else:
                shift = bits - prefix
                shifted.setdefault(size, {}).setdefault(shift, set()).add(network >> shift)
        object.__setattr__(
            self,
            "_aligned",
            {k: tuple((n, frozenset(v)) for n, v in d.items()) for k, d in aligned.items()},
        )
        object.__setattr__(
            self,
            "_shifted",
            {k: tuple((n, frozenset(v)) for n, v in d.items()) for k, d in shifted.items()},
        )
        object.__setattr__(self, "_by_address", bool(self.exact_addresses or self.networks))

    def address_ignored(self, address: bytes) -> bool:
        if address in self.exact_addresses:
            return True
        size = len(address)
        for length, prefixes in self._aligned.get(size, ()):
            if address[:length] in prefixes:
                return True
        shifted = self._shifted.get(size)
        if shifted:
            value = int.from_bytes(address, "big")
            for shift, networks in shifted:
                if value >> shift in networks:
                    return True
        return False

    def accepts(self, key: bytes, value: bytes) -> bool:
        """Whether a record passes. ``value`` may be a fresh one built from an event."""
        if self.protocols and record.key_proto(key) not in self.protocols:
            return False
        if self._by_address:
            kind = key[0] & _KIND_MASK
            if kind in _V4_KINDS:
                src, dst = key[1:5], key[5:9]
            elif kind in _V6_KINDS:
                src, dst = key[1:17], key[17:33]
            else:
                src, dst = record.key_addresses(key)
            # Without NAT the reply's source is the original destination.
            reply = record.reply_src(key, value) if value[0] & _VAL_REPLY or kind == _RAW else dst
            if self.address_ignored(src) or self.address_ignored(reply):
                return False
        if self.tcp_states:
            state = record.tcp_state(value)
            if state is not None and state not in self.tcp_states:
                return False
            if state is None and record.key_proto(key) == IPPROTO_TCP:
                return False  # a TCP entry whose state we do not know yet
        return True


ACCEPT_ALL = EntryFilter()


@dataclass(frozen=True)
class HelperFilter:
    """``expect-sync``: which expectations are synced, by the helper that made them.

    conntrackd matches each configured name case-insensitively as a *prefix* of the
    expectation's helper name ("to support things like sip-PORT", src/filter.c
    exp_filter_find). ``helpers=None`` takes every expectation (``all``); an empty set
    takes none (expectation sync off). Which master entries a cache takes is the
    conntrack filter's business: an expectation whose master is not cached is dropped
    by the reader, as conntrackd's ct_filter_master does.
    """

    helpers: tuple[str, ...] | None = ()

    @classmethod
    def build(cls, helpers: Iterable[str] | None) -> HelperFilter:
        if helpers is None:
            return cls(None)
        return cls(tuple(sorted({h.strip().lower() for h in helpers if h.strip()})))

    @property
    def enabled(self) -> bool:
        return self.helpers is None or bool(self.helpers)

    def accepts(self, helper: str | None) -> bool:
        if self.helpers is None:
            return True
        if not helper:
            return False
        return helper.lower().startswith(self.helpers)


NO_EXPECTATIONS = HelperFilter()
ALL_EXPECTATIONS = HelperFilter(None)
