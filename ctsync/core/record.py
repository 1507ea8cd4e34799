"""Compact cache records: how ctsync holds a conntrack entry in memory.

A cached entry is two ``bytes`` objects, a key and a value, so a million entries cost about
150-200 bytes each (the issue's budget is 300). Both are built straight from kernel messages
by :func:`parse_ct` without creating an :class:`Entry`, which is what lets one core keep up
with 150k+ events/s; :func:`to_entry` and :func:`from_entry` convert for everything else.

Key (identifies the connection: original tuple + zone)::

    kind u8 | fields by kind | [zone be16 when kind & KEY_ZONE]
    KEY_V4_PORTS  src(4) dst(4) proto(1) sport(2) dport(2)
    KEY_V6_PORTS  src(16) dst(16) proto(1) sport(2) dport(2)
    KEY_V4_ICMP   src(4) dst(4) id(2) type(1) code(1)
    KEY_V6_ICMP   src(16) dst(16) id(2) type(1) code(1)
    KEY_RAW       the raw CTA_TUPLE_ORIG payload (other protocols, directional zones)
    KEY_EXPECT    not a conntrack entry: an expectation record (``ctsync.core.expect``);
                  conntrack keys never use it, so both live in one cache and one stream

Value (what is synced about it)::

    flags u8 | status be32 | timeout be32 | mark be32 | id be32
    [TCP:  state wscale_o wscale_r flags_o mask_o flags_r mask_r   (7 x u8)]  VAL_TCP
    [SCTP: state u8, vtag_o be32, vtag_r be32]                                 VAL_SCTP
    [DCCP: state u8, role u8, handshake_seq be64]                              VAL_DCCP
    [reply: src dst and ports/icmp fields as in the key, when NATed]           VAL_REPLY
    [rare attributes as raw ctnetlink TLVs: labels, helper, seq-adj, ...]      VAL_RARE

The reply tuple is stored only when it is not the inverse of the original (NAT): that is
exactly when the kernel sets SRC_NAT/DST_NAT, and it is what the commit path needs to
rebuild the NAT binding.
"""

from __future__ import annotations

import re
import struct
from typing import Final

from ctsync.core import ctnetlink as nl
from ctsync.core.ctnetlink import Buffer, CtnetlinkError
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    PORT_PROTOCOLS,
    CtTuple,
    DccpInfo,
    Entry,
    SctpInfo,
    TcpInfo,
)

KEY_V4_PORTS: Final = 1
KEY_V6_PORTS: Final = 2
KEY_V4_ICMP: Final = 3
KEY_V6_ICMP: Final = 4
KEY_RAW: Final = 5
# Kinds 0x40..0x7F are for records that are not conntrack entries; conntrack kinds stay below.
KEY_EXPECT: Final = 0x40
KEY_ZONE: Final = 0x80

VAL_TCP: Final = 0x01
VAL_SCTP: Final = 0x02
VAL_DCCP: Final = 0x04
VAL_REPLY: Final = 0x08
VAL_RARE: Final = 0x10

_K_V4_PORTS = struct.Struct(">B4s4sB2s2s")
_K_V6_PORTS = struct.Struct(">B16s16sB2s2s")
_K_V4_ICMP = struct.Struct(">B4s4s2sBB")
_K_V6_ICMP = struct.Struct(">B16s16s2sBB")
_ZONE = struct.Struct(">H")

_R_V4_PORTS = struct.Struct(">4s4s2s2s")
_R_V6_PORTS = struct.Struct(">16s16s2s2s")
_R_V4_ICMP = struct.Struct(">4s4s2sBB")
_R_V6_ICMP = struct.Struct(">16s16s2sBB")

_NAT_MASK: Final = 0x30  # IPS_SRC_NAT | IPS_DST_NAT, as a plain int for the hot path
_FIXED = struct.Struct(">BIIII")
FIXED_SIZE: Final = _FIXED.size
_TCP = struct.Struct("7B")
_SCTP = struct.Struct(">BII")
_DCCP = struct.Struct(">BBQ")


def _hdr(length: int, atype: int) -> int:
    """A netlink attribute header (len, type) read as one native u32."""
    return int.from_bytes(struct.pack("=HH", length, atype), "little" if _LE else "big")


_LE: Final = struct.pack("=H", 1) == b"\x01\x00"
_N = nl.NLA_F_NESTED

# Canonical kernel layouts of a tuple payload, read with one unpack and checked by headers.
_T_V4_PORTS = struct.Struct("=I I4s I4s I I B3x I 2s2x I 2s2x")
_H_V4_PORTS = (
    _hdr(20, _N | nl.CTA_TUPLE_IP),
    _hdr(8, nl.CTA_IP_V4_SRC),
    _hdr(8, nl.CTA_IP_V4_DST),
    _hdr(28, _N | nl.CTA_TUPLE_PROTO),
    _hdr(5, nl.CTA_PROTO_NUM),
    _hdr(6, nl.CTA_PROTO_SRC_PORT),
    _hdr(6, nl.CTA_PROTO_DST_PORT),
)
_T_V6_PORTS = struct.Struct("=I I16s I16s I I B3x I 2s2x I 2s2x")
_H_V6_PORTS = (
    _hdr(44, _N | nl.CTA_TUPLE_IP),
    _hdr(20, nl.CTA_IP_V6_SRC),
    _hdr(20, nl.CTA_IP_V6_DST),
    _hdr(28, _N | nl.CTA_TUPLE_PROTO),
    _hdr(5, nl.CTA_PROTO_NUM),
    _hdr(6, nl.CTA_PROTO_SRC_PORT),
    _hdr(6, nl.CTA_PROTO_DST_PORT),
)
_T_V4_ICMP = struct.Struct("=I I4s I4s I I B3x I 2s2x I B3x I B3x")
_H_V4_ICMP = (
    _hdr(20, _N | nl.CTA_TUPLE_IP),
    _hdr(8, nl.CTA_IP_V4_SRC),
    _hdr(8, nl.CTA_IP_V4_DST),
    _hdr(36, _N | nl.CTA_TUPLE_PROTO),
    _hdr(5, nl.CTA_PROTO_NUM),
    _hdr(6, nl.CTA_PROTO_ICMP_ID),
    _hdr(5, nl.CTA_PROTO_ICMP_TYPE),
    _hdr(5, nl.CTA_PROTO_ICMP_CODE),
)
_T_V6_ICMP = struct.Struct("=I I16s I16s I I B3x I 2s2x I B3x I B3x")
_H_V6_ICMP = (
    _hdr(44, _N | nl.CTA_TUPLE_IP),
    _hdr(20, nl.CTA_IP_V6_SRC),
    _hdr(20, nl.CTA_IP_V6_DST),
    _hdr(36, _N | nl.CTA_TUPLE_PROTO),
    _hdr(5, nl.CTA_PROTO_NUM),
    _hdr(6, nl.CTA_PROTO_ICMPV6_ID),
    _hdr(5, nl.CTA_PROTO_ICMPV6_TYPE),
    _hdr(5, nl.CTA_PROTO_ICMPV6_CODE),
)
# CTA_PROTOINFO payload for TCP: nest TCP { state, wscale o/r, flags o/r }.
_P_TCP = struct.Struct("=I IB3x IB3x IB3x IBB2x IBB2x")
_H_P_TCP = (
    _hdr(44, _N | nl.CTA_PROTOINFO_TCP),
    _hdr(5, nl.CTA_PROTOINFO_TCP_STATE),
    _hdr(5, nl.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL),
    _hdr(5, nl.CTA_PROTOINFO_TCP_WSCALE_REPLY),
    _hdr(6, nl.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL),
    _hdr(6, nl.CTA_PROTOINFO_TCP_FLAGS_REPLY),
)
_NLA = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_unpack_nla = _NLA.unpack_from
_unpack_be32 = _BE32.unpack_from

# Attributes kept verbatim in the rare tail, in this order.
_RARE_TYPES: Final = (
    nl.CTA_LABELS,
    nl.CTA_HELP,
    nl.CTA_SEQ_ADJ_ORIG,
    nl.CTA_SEQ_ADJ_REPLY,
    nl.CTA_SYNPROXY,
    nl.CTA_SECCTX,
    nl.CTA_TUPLE_MASTER,
    nl.CTA_TUPLE_REPLY,  # only for KEY_RAW entries (no compact reply layout)
)
_RARE_SET: Final = frozenset(_RARE_TYPES) - {nl.CTA_TUPLE_REPLY}
# Attributes the cache does not keep: use, counters, timestamps, mark mask, secmark.
_IGNORED_SET: Final = frozenset(
    {
        nl.CTA_USE,
        nl.CTA_COUNTERS_ORIG,
        nl.CTA_COUNTERS_REPLY,
        nl.CTA_TIMESTAMP,
        nl.CTA_TIMESTAMP_EVENT,
        nl.CTA_MARK_MASK,
        nl.CTA_SECMARK,
        nl.CTA_LABELS_MASK,
        nl.CTA_STATUS_MASK,
    }
)
_ZERO_SYNPROXY: Final = nl.nest(
    nl.CTA_SYNPROXY,
    nl.attr_be32(nl.CTA_SYNPROXY_ISN, 0),
    nl.attr_be32(nl.CTA_SYNPROXY_ITS, 0),
    nl.attr_be32(nl.CTA_SYNPROXY_TSOFF, 0),
)

# Presence bits of a parsed message (which fixed fields it carried).
P_STATUS: Final = 1
P_TIMEOUT: Final = 2
P_MARK: Final = 4
P_ID: Final = 8
P_PROTO: Final = 16
P_ALL_FIXED: Final = P_STATUS | P_TIMEOUT | P_MARK | P_ID | P_PROTO


def _compact_tuple(buf: Buffer, s: int, e: int) -> tuple[int, bytes] | None:
    """(key kind, compact key body) of a canonical tuple payload, or None."""
    n = e - s
    if n == 48:
        v = _T_V4_PORTS.unpack_from(buf, s)
        if (v[0], v[1], v[3], v[5], v[6], v[8], v[10]) == _H_V4_PORTS and v[7] in PORT_PROTOCOLS:
            return KEY_V4_PORTS, _K_V4_PORTS.pack(KEY_V4_PORTS, v[2], v[4], v[7], v[9], v[11])
    elif n == 72:
        v = _T_V6_PORTS.unpack_from(buf, s)
        if (v[0], v[1], v[3], v[5], v[6], v[8], v[10]) == _H_V6_PORTS and v[7] in PORT_PROTOCOLS:
            return KEY_V6_PORTS, _K_V6_PORTS.pack(KEY_V6_PORTS, v[2], v[4], v[7], v[9], v[11])
    elif n == 56:
        v = _T_V4_ICMP.unpack_from(buf, s)
        hdrs = (v[0], v[1], v[3], v[5], v[6], v[8], v[10], v[12])
        if hdrs == _H_V4_ICMP and v[7] == IPPROTO_ICMP:
            return KEY_V4_ICMP, _K_V4_ICMP.pack(KEY_V4_ICMP, v[2], v[4], v[9], v[11], v[13])
    elif n == 80:
        v = _T_V6_ICMP.unpack_from(buf, s)
        hdrs = (v[0], v[1], v[3], v[5], v[6], v[8], v[10], v[12])
        if hdrs == _H_V6_ICMP and v[7] == IPPROTO_ICMPV6:
            return KEY_V6_ICMP, _K_V6_ICMP.pack(KEY_V6_ICMP, v[2], v[4], v[9], v[11], v[13])
    return None


# (key, present, status, timeout, mark, id, flags, proto_bytes, tail), as parse_ct returns.
Parsed = tuple[bytes, int, int, int, int, int, int, bytes, bytes]


# body length -> messages of that length learn() could not take since the last success
_UNLEARNABLE: dict[int, int] = {}
_LEARN_TRIES: Final = 8
_LEARN_RETRY_EVERY: Final = 256


def parse_ct(buf: Buffer, start: int, end: int) -> Parsed:
    """Parse a CT_NEW/CT_DELETE body into record parts without building an Entry.

    The kernel sends a few fixed attribute layouts over and over (an event of a TCP
    connection: the two tuples, id, status, timeout, protoinfo, ...): the first message of
    each layout is parsed attribute by attribute and teaches a whole-message pattern and
    struct, so the next ones take one header match and one ``unpack`` (:class:`_Layout`).
    See :func:`_parse_walk` for the result.
    """
    candidates = _LAYOUTS.get(end - start)
    if candidates is not None:
        for layout in candidates:
            parts = layout.parse(buf, start, end)
            if parts is not None:
                return parts
    parts = _parse_walk(buf, start, end)
    length = end - start
    if len(_LAYOUTS) < _MAX_LAYOUT_LENGTHS and (candidates is None or len(candidates) < 4):
        # A layout learn() cannot take (an ICMP or SCTP entry's, one with labels, a helper
        # or a live synproxy) comes back with every such event: after a few failures, try
        # again only every _LEARN_RETRY_EVERY messages of that length, so that a learnable
        # layout of the same length is still learned soon, without a failed learn per
        # event meanwhile. A layout is kept only if it reads its first message as the walk.
        failures = _UNLEARNABLE.get(length, 0)
        if failures < _LEARN_TRIES or failures % _LEARN_RETRY_EVERY == 0:
            learned = _Layout.learn(buf, start, end)
            if learned is not None and learned.parse(buf, start, end) == parts:
                _LAYOUTS.setdefault(length, []).append(learned)
                _UNLEARNABLE.pop(length, None)
                return parts
        _UNLEARNABLE[length] = failures + 1
    return parts


def _parse_walk(buf: Buffer, start: int, end: int) -> Parsed:
    """Parse a CT_NEW/CT_DELETE body attribute by attribute (any layout).

    Returns ``(key, present, status, timeout, mark, id, proto_flag, proto_bytes, tail)``
    where ``present`` has P_* bits for the fixed fields the message carried, ``proto_flag``
    is VAL_TCP/SCTP/DCCP or 0, and ``tail`` is the compact reply (when NATed) followed by
    the rare TLVs, with VAL_REPLY/VAL_RARE folded into ``proto_flag``'s upper bits.
    Raises CtnetlinkError on malformed input.
    """
    key = b""
    present = 0
    status = timeout = mark = ct_id = 0
    proto_flag = 0
    proto_bytes = b""
    reply_s = reply_e = -1
    zone = 0
    rare: list[bytes] | None = None
    kind = 0
    off = start
    unpack_nla = _unpack_nla
    unpack_be32 = _unpack_be32
    t_v4_ports = _T_V4_PORTS.unpack_from
    ignored = _IGNORED_SET
    rare_set = _RARE_SET
    try:
        # Branches are ordered by how often the kernel sends each attribute; the literal
        # numbers are CTA_* values (named in the comments), for speed.
        while off + 4 <= end:
            alen, atype = unpack_nla(buf, off)
            if alen < 4 or off + alen > end:
                raise CtnetlinkError(f"attribute length {alen} at offset {off} is out of bounds")
            atype &= 0x3FFF
            s = off + 4
            e = off + alen
            off += (alen + 3) & ~3
            if atype == 1:  # CTA_TUPLE_ORIG
                if alen == 52:  # inline fast path for the commonest layout
                    v = t_v4_ports(buf, s)
                    if (v[0], v[1], v[3], v[5], v[6], v[8], v[10]) == _H_V4_PORTS and v[
                        7
                    ] in PORT_PROTOCOLS:
                        kind = KEY_V4_PORTS
                        key = _K_V4_PORTS.pack(KEY_V4_PORTS, v[2], v[4], v[7], v[9], v[11])
                        continue
                compact = _compact_tuple(buf, s, e)
                if compact is None:
                    nl.decode_tuple(buf, s, e)  # validates, raises on garbage
                    kind = KEY_RAW
                    key = bytes((KEY_RAW,)) + bytes(buf[s:e])
                else:
                    kind, key = compact
            elif atype == 3:  # CTA_STATUS
                if alen < 8:
                    raise CtnetlinkError("short CTA_STATUS")
                status = unpack_be32(buf, s)[0]
                present |= 1  # P_STATUS
            elif atype == 7:  # CTA_TIMEOUT
                if alen < 8:
                    raise CtnetlinkError("short CTA_TIMEOUT")
                timeout = unpack_be32(buf, s)[0]
                present |= 2  # P_TIMEOUT
            elif atype == 2:  # CTA_TUPLE_REPLY: decided once status is known
                reply_s, reply_e = s, e
            elif atype == 12:  # CTA_ID
                if alen < 8:
                    raise CtnetlinkError("short CTA_ID")
                ct_id = unpack_be32(buf, s)[0]
                present |= 8  # P_ID
            elif atype == 8:  # CTA_MARK
                if alen < 8:
                    raise CtnetlinkError("short CTA_MARK")
                mark = unpack_be32(buf, s)[0]
                present |= 4  # P_MARK
            elif atype == 4:  # CTA_PROTOINFO
                if alen == 48:
                    v = _P_TCP.unpack_from(buf, s)
                    if (v[0], v[1], v[3], v[5], v[7], v[10]) == _H_P_TCP:
                        proto_flag = VAL_TCP
                        proto_bytes = _TCP.pack(v[2], v[4], v[6], v[8], v[9], v[11], v[12])
                        present |= 16  # P_PROTO
                        continue
                info = nl.decode_protoinfo(buf, s, e)
                if info is not None:
                    proto_flag, proto_bytes = _pack_protoinfo(info)
                    present |= 16  # P_PROTO
            elif atype in ignored:
                continue
            elif atype == 18:  # CTA_ZONE
                if alen < 6:
                    raise CtnetlinkError("short CTA_ZONE")
                zone = buf[s] << 8 | buf[s + 1]
            elif atype in rare_set:
                raw = bytes(buf[s - 4 : e])
                if atype == nl.CTA_SYNPROXY and raw == _ZERO_SYNPROXY:
                    continue
                if rare is None:
                    rare = []
                rare.append(raw + b"\0" * (-alen & 3))
    except (struct.error, IndexError) as exc:
        raise CtnetlinkError(f"malformed conntrack message: {exc}") from exc
    if not key:
        raise CtnetlinkError("conntrack message without CTA_TUPLE_ORIG")
    if zone:
        key = bytes((key[0] | KEY_ZONE,)) + key[1:] + _ZONE.pack(zone)
    tail = b""
    if reply_s >= 0:
        # A compact reply (12 or 36 bytes) when there is NAT and the reply has the
        # original's layout; the raw CTA_TUPLE_REPLY (a rare attribute) when the original
        # has no compact key or the reply carries a directional zone; else nothing: the
        # reply is the inverse of the original.
        compact = None if kind == KEY_RAW else _compact_tuple(buf, reply_s, reply_e)
        if compact is not None and compact[0] == kind:
            if status & _NAT_MASK:
                body = compact[1]
                if kind in (KEY_V4_PORTS, KEY_V6_PORTS):
                    size = 4 if kind == KEY_V4_PORTS else 16
                    tail = body[1 : 1 + 2 * size] + body[2 + 2 * size :]  # no kind, no proto
                else:
                    tail = body[1:]  # no kind byte
                proto_flag |= VAL_REPLY
        else:
            nl.decode_tuple(buf, reply_s, reply_e)  # validates, raises on garbage
            raw_reply = _tlv_build(
                nl.CTA_TUPLE_REPLY | nl.NLA_F_NESTED, bytes(buf[reply_s:reply_e])
            )
            rare = [*(rare or []), raw_reply]
    if rare:
        proto_flag |= VAL_RARE
        ordered: list[bytes] = sorted(rare, key=_rare_order)
        tail += b"".join(ordered)
    return key, present, status, timeout, mark, ct_id, proto_flag, proto_bytes, tail


def _tlv_build(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, atype) + payload + b"\0" * (-n & 3)


def _rare_order(tlv: bytes) -> int:
    atype = _unpack_nla(tlv, 0)[1] & 0x3FFF
    return _RARE_TYPES.index(atype) if atype in _RARE_SET else len(_RARE_TYPES)


_MAX_LAYOUT_LENGTHS: Final = 64
_LAYOUTS: dict[int, list[_Layout]] = {}
_SKIPPED_TYPES: Final = frozenset(
    {nl.CTA_USE, nl.CTA_COUNTERS_ORIG, nl.CTA_COUNTERS_REPLY, nl.CTA_TIMESTAMP,
     nl.CTA_TIMESTAMP_EVENT, nl.CTA_SECMARK}
)  # fmt: skip
_FIXED_U32: Final = {nl.CTA_STATUS: P_STATUS, nl.CTA_TIMEOUT: P_TIMEOUT, nl.CTA_MARK: P_MARK,
                     nl.CTA_ID: P_ID}  # fmt: skip
_U32_SLOT: Final = {nl.CTA_STATUS: 0, nl.CTA_TIMEOUT: 1, nl.CTA_MARK: 2, nl.CTA_ID: 3}
# CTA_PROTOINFO of a TCP entry's DESTROY event: the state alone (the kernel's tcp_to_nlattr
# leaves window scales and flags out for a dying entry). The walk packs it as a state with
# zero scales and flags, as _TCP_STATE_ONLY does.
_P_TCP_STATE = struct.Struct("=I IB3x")
_H_P_TCP_STATE = (_hdr(12, _N | nl.CTA_PROTOINFO_TCP), _hdr(5, nl.CTA_PROTOINFO_TCP_STATE))
_TCP_STATE_ONLY: Final = tuple(_TCP.pack(state, 0, 0, 0, 0, 0, 0) for state in range(256))


class _LayoutBuilder:
    """What :meth:`_Layout.learn` accumulates while it walks the first message of a layout:
    a regular expression that matches the bytes the walk's result depends on besides the
    values (every attribute header, nested ones included; a zero synproxy) and lets any
    other byte through, and a big-endian struct that reads the values and skips the rest."""

    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.pattern: list[bytes] = []
        self.fmt: list[str] = []
        self.count = 0  # values the struct yields so far

    def literal(self, raw: bytes) -> None:
        self.pattern.append(re.escape(raw))
        self.fmt.append(f"{len(raw)}x")

    def header(self, off: int) -> None:
        self.literal(bytes(self.buf[off : off + 4]))

    def free(self, size: int) -> None:
        """Bytes the walk never reads (padding, attributes it ignores)."""
        if size:
            self.pattern.append(b"." * size)
            self.fmt.append(f"{size}x")

    def value(self, code: str, size: int) -> int:
        """A value of the struct (``code``, ``size`` bytes); returns its index."""
        self.pattern.append(b"." * size)
        self.fmt.append(code)
        self.count += 1
        return self.count - 1

    def ports_tuple(self, off: int, size: int) -> int:
        """A canonical ports tuple attribute at ``off`` (see _T_V4_PORTS): five values,
        src dst proto sport dport; returns the first one's index."""
        header = self.header
        header(off)  # CTA_TUPLE_*
        header(off + 4)  # CTA_TUPLE_IP
        header(off + 8)  # CTA_IP_*_SRC
        first = self.value(f"{size}s", size)
        o = off + 12 + size
        header(o)  # CTA_IP_*_DST
        self.value(f"{size}s", size)
        o += 4 + size
        header(o)  # CTA_TUPLE_PROTO
        header(o + 4)  # CTA_PROTO_NUM
        self.value("B", 1)
        self.free(3)
        header(o + 12)  # CTA_PROTO_SRC_PORT
        self.value("2s", 2)
        self.free(2)
        header(o + 20)  # CTA_PROTO_DST_PORT
        self.value("2s", 2)
        self.free(2)
        return first


class _Layout:
    """One message layout the kernel sends: a regular expression checks that a message has
    exactly the learned attribute headers, then one big-endian struct reads its values.

    Learned only from layouts made of attributes it can take apart at fixed offsets (the
    IPv4/IPv6 ports tuples, the u32 fields, TCP protoinfo in its full and its DESTROY
    form, a zero synproxy, attributes the cache ignores), each at most once; a message
    that does not match is parsed the slow way.
    """

    __slots__ = (
        "_match",
        "_orig",
        "_reply",
        "_tcp",
        "_tcp_state",
        "_u32",
        "_unpack",
        "key_struct",
        "kind",
        "present",
    )  # fmt: skip

    def __init__(self, b: _LayoutBuilder, size: int, orig: int, reply: int, u32: list[int],
                 tcp: int, tcp_state: int, present: int) -> None:  # fmt: skip
        self._match = re.compile(b"".join(b.pattern), re.DOTALL).fullmatch
        self._unpack = struct.Struct(">" + " ".join(b.fmt)).unpack_from
        self._orig = orig
        self._reply = reply
        self._u32 = tuple(u32)
        self._tcp = tcp
        self._tcp_state = tcp_state
        self.present = present
        self.kind = KEY_V4_PORTS if size == 4 else KEY_V6_PORTS
        self.key_struct = _K_V4_PORTS if size == 4 else _K_V6_PORTS

    @classmethod
    def learn(cls, buf: Buffer, start: int, end: int) -> _Layout | None:
        b = _LayoutBuilder(buf)
        size = orig = reply = tcp = tcp_state = -1
        u32 = [-1, -1, -1, -1]  # status, timeout, mark, id
        present = 0
        seen: set[int] = set()
        off = start
        while off + 4 <= end:
            alen, atype = _unpack_nla(buf, off)
            if alen < 4 or off + alen > end:
                return None
            pad = -alen & 3
            t = atype & 0x3FFF
            if t in seen:
                return None  # the walk keeps the last one (or all, for rare ones)
            seen.add(t)
            if t in (nl.CTA_TUPLE_ORIG, nl.CTA_TUPLE_REPLY):
                compact = _compact_tuple(buf, off + 4, off + alen)
                if compact is None or compact[0] not in (KEY_V4_PORTS, KEY_V6_PORTS):
                    return None
                tsize = 4 if compact[0] == KEY_V4_PORTS else 16
                if size not in (-1, tsize):
                    return None
                size = tsize
                first = b.ports_tuple(off, tsize)
                if t == nl.CTA_TUPLE_ORIG:
                    orig = first
                else:
                    reply = first
            elif t in _FIXED_U32 and alen == 8:
                b.header(off)
                u32[_U32_SLOT[t]] = b.value("I", 4)
                present |= _FIXED_U32[t]
            elif t == nl.CTA_PROTOINFO and alen == 48:
                v = _P_TCP.unpack_from(buf, off + 4)
                if (v[0], v[1], v[3], v[5], v[7], v[10]) != _H_P_TCP:
                    return None
                b.header(off)  # CTA_PROTOINFO
                b.header(off + 4)  # CTA_PROTOINFO_TCP
                b.header(off + 8)  # state
                tcp = b.value("B", 1)
                b.free(3)
                b.header(off + 16)  # window scale, original
                b.value("B", 1)
                b.free(3)
                b.header(off + 24)  # window scale, reply
                b.value("B", 1)
                b.free(3)
                b.header(off + 32)  # flags and mask, original
                b.value("B", 1)
                b.value("B", 1)
                b.free(2)
                b.header(off + 40)  # flags and mask, reply
                b.value("B", 1)
                b.value("B", 1)
                b.free(2)
                present |= P_PROTO
            elif t == nl.CTA_PROTOINFO and alen == 16:
                v = _P_TCP_STATE.unpack_from(buf, off + 4)
                if (v[0], v[1]) != _H_P_TCP_STATE:
                    return None
                b.header(off)  # CTA_PROTOINFO
                b.header(off + 4)  # CTA_PROTOINFO_TCP
                b.header(off + 8)  # state, nothing else: a DESTROY event
                tcp_state = b.value("B", 1)
                b.free(3)
                present |= P_PROTO
            elif t == nl.CTA_SYNPROXY and alen == 28:
                # Only a zero synproxy is dropped by the walk: match it byte for byte.
                if bytes(buf[off : off + 28]) != _ZERO_SYNPROXY:
                    return None
                b.literal(_ZERO_SYNPROXY)
            elif t in _SKIPPED_TYPES:
                b.header(off)
                b.free(alen - 4 + pad)
            else:
                return None
            off += alen + pad
        if orig < 0 or off != end:
            return None
        return cls(b, size, orig, reply, u32, tcp, tcp_state, present)

    def parse(self, buf: Buffer, start: int, end: int) -> Parsed | None:
        if self._match(buf, start, end) is None:
            return None
        v = self._unpack(buf, start)
        o = self._orig
        proto = v[o + 2]
        if proto not in PORT_PROTOCOLS:
            return None  # the walk keeps such a tuple raw
        r = self._reply
        if r >= 0 and v[r + 2] != proto:
            return None  # odd reply: the walk decides what to keep of it
        i_status, i_timeout, i_mark, i_id = self._u32
        status = v[i_status] if i_status >= 0 else 0
        key = self.key_struct.pack(self.kind, v[o], v[o + 1], proto, v[o + 3], v[o + 4])
        flags = 0
        proto_bytes = b""
        t = self._tcp
        if t >= 0:
            flags = VAL_TCP
            proto_bytes = _TCP.pack(v[t], v[t + 1], v[t + 2], v[t + 3], v[t + 4], v[t + 5],
                                    v[t + 6])  # fmt: skip
        elif self._tcp_state >= 0:
            flags = VAL_TCP
            proto_bytes = _TCP_STATE_ONLY[v[self._tcp_state]]
        tail = b""
        if r >= 0 and status & _NAT_MASK:
            tail = v[r] + v[r + 1] + v[r + 3] + v[r + 4]
            flags |= VAL_REPLY
        return (
            key,
            self.present,
            status,
            v[i_timeout] if i_timeout >= 0 else 0,
            v[i_mark] if i_mark >= 0 else 0,
            v[i_id] if i_id >= 0 else 0,
            flags,
            proto_bytes,
            tail,
        )


def _pack_protoinfo(info: TcpInfo | SctpInfo | DccpInfo) -> tuple[int, bytes]:
    if isinstance(info, TcpInfo):
        return VAL_TCP, _TCP.pack(
            info.state,
            info.wscale_orig or 0,
            info.wscale_reply or 0,
            info.flags_orig or 0,
            info.mask_orig or 0,
            info.flags_reply or 0,
            info.mask_reply or 0,
        )
    if isinstance(info, SctpInfo):
        return VAL_SCTP, _SCTP.pack(info.state, info.vtag_orig or 0, info.vtag_reply or 0)
    return VAL_DCCP, _DCCP.pack(info.state, info.role or 0, info.handshake_seq or 0)


_PROTO_SIZES: Final = {0: 0, VAL_TCP: _TCP.size, VAL_SCTP: _SCTP.size, VAL_DCCP: _DCCP.size}
_PROTO_MASK: Final = VAL_TCP | VAL_SCTP | VAL_DCCP


def build_value(
    status: int,
    timeout: int,
    mark: int,
    ct_id: int,
    proto_flag: int,
    proto_bytes: bytes,
    tail: bytes,
) -> bytes:
    return _FIXED.pack(proto_flag, status, timeout, mark, ct_id) + proto_bytes + tail


_pack_fixed = _FIXED.pack


def value_from_parts(parts: Parsed) -> bytes:
    """The record value of a freshly parsed entry."""
    return _pack_fixed(parts[6], parts[2], parts[3], parts[4], parts[5]) + parts[7] + parts[8]


def merge_value(old: bytes, parts: Parsed) -> bytes:
    """The value of a cached entry after a (possibly partial) update event.

    Fields the update did not carry keep their old value; rare attributes it carried
    replace the old ones of the same type; the compact reply never changes once known.
    """
    key, present, status, timeout, mark, ct_id, proto_flag, proto_bytes, tail = parts
    o_flags, o_status, o_timeout, o_mark, o_id = _FIXED.unpack_from(old, 0)
    if present != P_ALL_FIXED:
        if not present & P_STATUS:
            status = o_status
        if not present & P_TIMEOUT:
            timeout = o_timeout
        if not present & P_MARK:
            mark = o_mark
        if not present & P_ID:
            ct_id = o_id
    o_proto_len = _PROTO_SIZES[o_flags & _PROTO_MASK]
    o_tail = old[FIXED_SIZE + o_proto_len :]
    if not present & P_PROTO:
        proto_bytes = old[FIXED_SIZE : FIXED_SIZE + o_proto_len]
        new_flags = (o_flags & _PROTO_MASK) | (proto_flag & ~_PROTO_MASK)
    else:
        new_flags = proto_flag
    if tail == o_tail:
        new_flags |= o_flags & (VAL_REPLY | VAL_RARE)
        new_tail = o_tail
    elif not tail and not o_flags & VAL_RARE:
        # An update without NAT info: keep the compact reply we know.
        new_flags |= o_flags & VAL_REPLY
        new_tail = o_tail
    else:
        reply_size = reply_size_of(key)
        new_tail, extra = _merge_tail(o_flags, o_tail, proto_flag, tail, reply_size)
        new_flags = (new_flags & ~(VAL_REPLY | VAL_RARE)) | extra
    return _pack_fixed(new_flags, status, timeout, mark, ct_id) + proto_bytes + new_tail


def _merge_tail(
    o_flags: int, o_tail: bytes, n_flags: int, n_tail: bytes, reply_size: int
) -> tuple[bytes, int]:
    reply_len_o = reply_size if o_flags & VAL_REPLY else 0
    reply_len_n = reply_size if n_flags & VAL_REPLY else 0
    if len(o_tail) < reply_len_o or len(n_tail) < reply_len_n:
        raise CtnetlinkError("record tail shorter than its compact reply")
    reply = n_tail[:reply_len_n] if reply_len_n else o_tail[:reply_len_o]
    flags = VAL_REPLY if reply else 0
    rare: dict[int, bytes] = {}
    for tail, start in ((o_tail, reply_len_o), (n_tail, reply_len_n)):
        for atype, raw in _iter_tlvs(tail, start):
            rare[atype] = raw
    if rare:
        flags |= VAL_RARE
    ordered = b"".join(rare[t] for t in sorted(rare, key=_type_order))
    return reply + ordered, flags


def _type_order(atype: int) -> int:
    return _RARE_TYPES.index(atype) if atype in _RARE_SET else len(_RARE_TYPES) + atype


def reply_size_of(key: bytes) -> int:
    """Size of the compact reply a record with this key may hold (0: none possible)."""
    st = _REPLY_STRUCTS.get(key[0] & ~KEY_ZONE) if key else None
    return 0 if st is None else st.size


def _iter_tlvs(tail: bytes, start: int) -> list[tuple[int, bytes]]:
    out = []
    off = start
    n = len(tail)
    while off + 4 <= n:
        alen, atype = _unpack_nla(tail, off)
        if alen < 4 or off + alen > n:
            raise CtnetlinkError("malformed rare attribute in a record")
        step = (alen + 3) & ~3
        out.append((atype & 0x3FFF, tail[off : off + step]))
        off += step
    return out


# --- conversions ------------------------------------------------------------------------

KEY_STRUCTS: Final = {
    KEY_V4_PORTS: _K_V4_PORTS,
    KEY_V6_PORTS: _K_V6_PORTS,
    KEY_V4_ICMP: _K_V4_ICMP,
    KEY_V6_ICMP: _K_V6_ICMP,
}
_REPLY_STRUCTS: Final = {
    KEY_V4_PORTS: _R_V4_PORTS,
    KEY_V6_PORTS: _R_V6_PORTS,
    KEY_V4_ICMP: _R_V4_ICMP,
    KEY_V6_ICMP: _R_V6_ICMP,
}


def key_kind(key: bytes) -> int:
    return key[0] & ~KEY_ZONE


def decode_key(key: bytes) -> tuple[CtTuple, int | None]:
    """The original tuple and zone of a record key. Raises CtnetlinkError on garbage."""
    if not key:
        raise CtnetlinkError("empty record key")
    kind = key[0] & ~KEY_ZONE
    zone = None
    body_end = len(key)
    if key[0] & KEY_ZONE:
        if len(key) < 3:
            raise CtnetlinkError("record key too short for a zone")
        zone = _ZONE.unpack_from(key, len(key) - 2)[0]
        body_end -= 2
    if kind == KEY_RAW:
        return nl.decode_tuple(key, 1, body_end), zone
    st = KEY_STRUCTS.get(kind)
    if st is None or body_end != st.size:
        raise CtnetlinkError(f"record key of unknown kind {kind} or wrong size {len(key)}")
    v = st.unpack_from(key, 0)
    if kind == KEY_V4_PORTS:
        t = CtTuple(AF_INET, v[3], v[1], v[2], _port(v[4]), _port(v[5]))
    elif kind == KEY_V6_PORTS:
        t = CtTuple(AF_INET6, v[3], v[1], v[2], _port(v[4]), _port(v[5]))
    elif kind == KEY_V4_ICMP:
        t = CtTuple(
            AF_INET, IPPROTO_ICMP, v[1], v[2], icmp_id=_port(v[3]), icmp_type=v[4], icmp_code=v[5]
        )
    else:
        t = CtTuple(
            AF_INET6,
            IPPROTO_ICMPV6,
            v[1],
            v[2],
            icmp_id=_port(v[3]),
            icmp_type=v[4],
            icmp_code=v[5],
        )
    return t, zone


def _port(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def key_from_tuple(t: CtTuple, zone: int | None = None) -> bytes:
    """The record key of an original tuple (the same bytes parse_ct builds from the kernel)."""
    payload = nl.encode_tuple_payload(t)
    compact = _compact_tuple(payload, 0, len(payload))
    key = bytes((KEY_RAW,)) + payload if compact is None else compact[1]
    if zone:
        key = bytes((key[0] | KEY_ZONE,)) + key[1:] + _ZONE.pack(zone)
    return key


def _compact_reply(kind: int, t: CtTuple) -> bytes:
    st = _REPLY_STRUCTS[kind]
    if kind in (KEY_V4_PORTS, KEY_V6_PORTS):
        return st.pack(t.src, t.dst, t.sport.to_bytes(2, "big"), t.dport.to_bytes(2, "big"))
    return st.pack(t.src, t.dst, t.icmp_id.to_bytes(2, "big"), t.icmp_type, t.icmp_code)


def value_fields(value: bytes) -> tuple[int, int, int, int, int]:
    """(flags, status, timeout, mark, id) of a record value."""
    if len(value) < FIXED_SIZE:
        raise CtnetlinkError("record value too short")
    flags, status, timeout, mark, ct_id = _FIXED.unpack_from(value, 0)
    return flags, status, timeout, mark, ct_id


def to_entry(key: bytes, value: bytes) -> Entry:
    """Rebuild the full Entry a record stands for. Raises CtnetlinkError on garbage."""
    orig, zone = decode_key(key)
    flags, status, timeout, mark, ct_id = value_fields(value)
    off = FIXED_SIZE
    proto_kind = flags & _PROTO_MASK
    info: TcpInfo | SctpInfo | DccpInfo | None = None
    try:
        if proto_kind == VAL_TCP:
            t = _TCP.unpack_from(value, off)
            info = TcpInfo(t[0], t[1], t[2], t[3], t[4], t[5], t[6])
        elif proto_kind == VAL_SCTP:
            sc = _SCTP.unpack_from(value, off)
            info = SctpInfo(sc[0], sc[1], sc[2])
        elif proto_kind == VAL_DCCP:
            dc = _DCCP.unpack_from(value, off)
            info = DccpInfo(dc[0], dc[1], dc[2])
        elif proto_kind:
            raise CtnetlinkError(f"record with several protocol blocks ({flags:#x})")
        off += _PROTO_SIZES[proto_kind]
        reply = orig.inverted()
        kind = key[0] & ~KEY_ZONE
        if flags & VAL_REPLY:
            st = _REPLY_STRUCTS.get(kind)
            if st is None:
                raise CtnetlinkError("compact reply on a raw-key record")
            r = st.unpack_from(value, off)
            off += st.size
            if kind in (KEY_V4_PORTS, KEY_V6_PORTS):
                reply = CtTuple(orig.family, orig.proto, r[0], r[1], _port(r[2]), _port(r[3]))
            else:
                reply = CtTuple(
                    orig.family,
                    orig.proto,
                    r[0],
                    r[1],
                    icmp_id=_port(r[2]),
                    icmp_type=r[3],
                    icmp_code=r[4],
                )
    except struct.error as exc:
        raise CtnetlinkError(f"truncated record value: {exc}") from exc
    entry = Entry(orig, reply, status, timeout, mark, zone=zone, id=ct_id, protoinfo=info)
    if flags & VAL_RARE:
        # The rare tail is plain ctnetlink attributes: decode them with the codec.
        attrs = nl.encode_tuple(nl.CTA_TUPLE_ORIG, orig) + value[off:]
        entry = entry.merged(nl.decode_entry(attrs, 0, len(attrs)))
    elif off != len(value):
        raise CtnetlinkError("trailing bytes in a record value")
    return entry


def from_entry(entry: Entry) -> tuple[bytes, bytes]:
    """The (key, value) record of an Entry (the inverse of :func:`to_entry`)."""
    key = key_from_tuple(entry.orig, entry.zone)
    kind = key[0] & ~KEY_ZONE
    flags = 0
    proto_bytes = b""
    if entry.protoinfo is not None:
        flags, proto_bytes = _pack_protoinfo(entry.protoinfo)
    tail = b""
    rare: list[bytes] = []
    status = entry.status or 0
    if entry.reply is not None:
        if kind == KEY_RAW or entry.reply.zone is not None:
            rare.append(nl.encode_tuple(nl.CTA_TUPLE_REPLY, entry.reply))
        elif entry.reply != entry.orig.inverted():
            tail = _compact_reply(kind, entry.reply)
            flags |= VAL_REPLY
    only_rare = Entry(
        entry.orig,
        labels=entry.labels,
        helper=entry.helper,
        seq_adj_orig=entry.seq_adj_orig,
        seq_adj_reply=entry.seq_adj_reply,
        synproxy=entry.synproxy
        if entry.synproxy and any((entry.synproxy.isn, entry.synproxy.its, entry.synproxy.tsoff))
        else None,
        secctx=entry.secctx,
        master=entry.master,
    )
    attrs = nl.encode_entry_attrs(only_rare)
    orig_len = len(nl.encode_tuple(nl.CTA_TUPLE_ORIG, entry.orig))
    rare_blob = attrs[orig_len:]
    if rare_blob:
        rare.extend(raw for _, raw in _iter_tlvs(rare_blob, 0))
    if rare:
        flags |= VAL_RARE
        ordered: list[bytes] = sorted(rare, key=_rare_order)
        tail += b"".join(ordered)
    value = build_value(
        status, entry.timeout or 0, entry.mark or 0, entry.id or 0, flags, proto_bytes, tail
    )
    return key, value


def key_proto(key: bytes) -> int:
    """The IP protocol number of a record key (cheap, for filters)."""
    kind = key[0] & ~KEY_ZONE
    if kind == KEY_V4_PORTS:
        return key[9]
    if kind == KEY_V6_PORTS:
        return key[33]
    if kind == KEY_V4_ICMP:
        return IPPROTO_ICMP
    if kind == KEY_V6_ICMP:
        return IPPROTO_ICMPV6
    return decode_key(key)[0].proto


def key_addresses(key: bytes) -> tuple[bytes, bytes]:
    """(orig src, orig dst) raw addresses of a record key (cheap, for filters)."""
    kind = key[0] & ~KEY_ZONE
    if kind in (KEY_V4_PORTS, KEY_V4_ICMP):
        return key[1:5], key[5:9]
    if kind in (KEY_V6_PORTS, KEY_V6_ICMP):
        return key[1:17], key[17:33]
    t = decode_key(key)[0]
    return t.src, t.dst


def reply_src(key: bytes, value: bytes) -> bytes:
    """The reply direction's source address (the real server behind DNAT)."""
    flags = value[0]
    if flags & VAL_REPLY:
        off = FIXED_SIZE + _PROTO_SIZES[flags & _PROTO_MASK]
        size = 4 if key[0] & ~KEY_ZONE in (KEY_V4_PORTS, KEY_V4_ICMP) else 16
        return value[off : off + size]
    if key[0] & ~KEY_ZONE == KEY_RAW:
        entry = to_entry(key, value)
        return entry.reply.src if entry.reply else entry.orig.dst
    return key_addresses(key)[1]


def tcp_state(value: bytes) -> int | None:
    """The TCP state byte of a record value, or None for other protocols."""
    if value[0] & VAL_TCP:
        return value[FIXED_SIZE]
    return None
