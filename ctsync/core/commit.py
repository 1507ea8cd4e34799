"""Turn cache records into the CT_NEW messages that commit them into a kernel table.

The kernel's rules (reference/ctnetlink-facts.md §4.6-7), which conntrackd follows too:
- status always carries CONFIRMED (else EBUSY) and never EXPECTED; the kernel ignores NAT
  bits in it, so NAT is restored by sending the reply tuple as the inverse of the original
  plus explicit CTA_NAT_SRC / CTA_NAT_DST bindings derived from the real reply tuple;
- a timeout is always sent (else EINVAL);
- TCP entries carry their state, window scales and BE_LIBERAL (+ SACK_PERM, and
  WINDOW_SCALE when the connection negotiated it), so mid-stream packets after a failover
  are not dropped as INVALID;
- create-or-update (NLM_F_CREATE without EXCL); an update must not carry NAT (EOPNOTSUPP),
  so the adapter retries a failed NAT create as a plain update.

Building a message is on the failover critical path, so the common layouts (IPv4/IPv6 with
ports or ICMP, no rare attributes) use precomputed attribute headers and a few joins.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from ctsync.core import ctnetlink as nl
from ctsync.core import record as rec
from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    TCP_FLAG_BE_LIBERAL,
    TCP_FLAG_CLOSE_INIT,
    TCP_FLAG_SACK_PERM,
    TCP_FLAG_WINDOW_SCALE,
    CtTuple,
    Entry,
    NatRange,
    Status,
    TcpInfo,
    TcpState,
)

COMMIT_FLAGS: Final = nl.NLM_F_REQUEST | nl.NLM_F_CREATE
UPDATE_FLAGS: Final = nl.NLM_F_REQUEST

# Status bits a commit may set: the kernel refuses or ignores the others on create.
_SETTABLE_STATUS: Final = int(Status.SEEN_REPLY | Status.ASSURED | Status.FIXED_TIMEOUT)
_CONFIRMED: Final = int(Status.CONFIRMED)

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_PAD2 = b"\0\0"


def _h(length: int, atype: int) -> bytes:
    return _NLA.pack(length, atype)


_N = nl.NLA_F_NESTED
_H_TUPLE_ORIG = {4: _h(52, _N | nl.CTA_TUPLE_ORIG), 16: _h(76, _N | nl.CTA_TUPLE_ORIG)}
_H_TUPLE_REPLY = {4: _h(52, _N | nl.CTA_TUPLE_REPLY), 16: _h(76, _N | nl.CTA_TUPLE_REPLY)}
_H_IP = {4: _h(20, _N | nl.CTA_TUPLE_IP), 16: _h(44, _N | nl.CTA_TUPLE_IP)}
_H_SRC = {4: _h(8, nl.CTA_IP_V4_SRC), 16: _h(20, nl.CTA_IP_V6_SRC)}
_H_DST = {4: _h(8, nl.CTA_IP_V4_DST), 16: _h(20, nl.CTA_IP_V6_DST)}
_H_PROTO_PORTS = _h(28, _N | nl.CTA_TUPLE_PROTO)
_H_NUM = _h(5, nl.CTA_PROTO_NUM)
_H_SPORT = _h(6, nl.CTA_PROTO_SRC_PORT)
_H_DPORT = _h(6, nl.CTA_PROTO_DST_PORT)
_TCP_PROTOINFO = struct.Struct("=HH HH HHB3x HHB3x HHB3x HHBB2x HHBB2x")
# The first constant runs of a ports tuple: [outer+IP+SRC headers] src [DST header] dst
# (the rest is in _message_struct).
_TUPLE_HEADS = {
    size: (
        _H_TUPLE_ORIG[size] + _H_IP[size] + _H_SRC[size],
        _H_TUPLE_REPLY[size] + _H_IP[size] + _H_SRC[size],
        _H_DST[size],
    )
    for size in (4, 16)
}


def tcp_commit_info(info: TcpInfo) -> TcpInfo:
    """The TCP protoinfo a committed entry gets: state and scales kept, tracking relaxed."""
    flags = TCP_FLAG_BE_LIBERAL | TCP_FLAG_SACK_PERM
    if info.state >= TcpState.TIME_WAIT:
        flags |= TCP_FLAG_CLOSE_INIT
    flags_o = flags | ((info.flags_orig or 0) & TCP_FLAG_WINDOW_SCALE)
    flags_r = flags | ((info.flags_reply or 0) & TCP_FLAG_WINDOW_SCALE)
    return TcpInfo(
        info.state,
        info.wscale_orig or 0,
        info.wscale_reply or 0,
        flags_o,
        flags_o,
        flags_r,
        flags_r,
    )


def nat_bindings(orig: CtTuple, reply: CtTuple) -> tuple[NatRange | None, NatRange | None]:
    """(SNAT, DNAT) bindings that make the kernel rebuild ``reply`` from ``orig``."""
    snat = dnat = None
    if orig.proto in ICMP_PROTOCOLS:
        if reply.src != orig.dst:
            dnat = NatRange(reply.src, reply.src)
        if reply.dst != orig.src or reply.icmp_id != orig.icmp_id:
            port = reply.icmp_id if reply.icmp_id != orig.icmp_id else None
            snat = NatRange(reply.dst, reply.dst, port, port)
        return snat, dnat
    if reply.src != orig.dst or reply.sport != orig.dport:
        dnat = NatRange(reply.src, reply.src, reply.sport, reply.sport)
    if reply.dst != orig.src or reply.dport != orig.sport:
        snat = NatRange(reply.dst, reply.dst, reply.dport, reply.dport)
    return snat, dnat


def commit_entry(entry: Entry, timeout: int | None = None, *, with_nat: bool = True) -> Entry:
    """The Entry to send to the kernel for ``entry`` (the generic, slower path)."""
    orig = entry.orig
    reply = entry.reply or orig.inverted()
    snat, dnat = nat_bindings(orig, reply) if with_nat else (None, None)
    info = entry.protoinfo
    if isinstance(info, TcpInfo):
        info = tcp_commit_info(info)
    status = ((entry.status or 0) & _SETTABLE_STATUS) | _CONFIRMED
    return Entry(
        orig,
        replace(orig.inverted(), zone=reply.zone),  # NAT comes from the bindings
        status=status,
        timeout=timeout if timeout is not None else max(entry.timeout or 0, 1),
        mark=entry.mark or 0,
        zone=entry.zone,
        labels=entry.labels,
        protoinfo=info,
        helper=entry.helper,
        seq_adj_orig=entry.seq_adj_orig,
        seq_adj_reply=entry.seq_adj_reply,
        synproxy=entry.synproxy,
        nat_src=snat,
        nat_dst=dnat,
    )


def commit_message(
    key: bytes,
    value: bytes,
    seq: int,
    *,
    timeout: int | None = None,
    flags: int = COMMIT_FLAGS,
    with_nat: bool = True,
) -> bytes:
    """One CT_NEW message committing a cached record (create-or-update by default).

    Raises CtnetlinkError if the record is malformed (a record from a peer can be).
    """
    return commit_message_positional(key, value, seq, timeout, flags, with_nat)


def commit_message_positional(
    key: bytes, value: bytes, seq: int, timeout: int | None, flags: int, with_nat: bool
) -> bytes:
    """:func:`commit_message` without keyword arguments, for the commit loop.

    The commonest records (v4/v6, TCP or a protocol without protocol info, no rare
    attributes) are packed here directly; the rest take the generic encoder."""
    layout = _PORTS_LAYOUTS.get(key[0]) if key and value else None
    if layout is not None and not value[0] & _SLOW_VALUE_FLAGS:
        unpack_key, key_size, pack, size, nfgen, head_o, head_r, h_dst, addr = layout
        if len(key) == key_size and len(value) >= _FIXED_SIZE:
            _, src, dst, proto, sport, dport = unpack_key(key)
            vflags = value[0]
            # The value's status, timeout and mark are big-endian already: sliced, not
            # unpacked and packed again.
            if timeout is None:
                ct_timeout = value[5:9]
                if ct_timeout == _ZERO_BE:
                    ct_timeout = _ONE_BE
            else:
                ct_timeout = timeout.to_bytes(4, "big")
            tail = b""
            off = _FIXED_SIZE
            if vflags & 1:  # VAL_TCP
                packed = value[off : off + 7]
                tail = _tcp_attr_cache.get(packed) or _tcp_attr(packed)
                off += 7
            if vflags & 8:  # VAL_REPLY: rebuild the NAT bindings from the real reply tuple
                end = off + 2 * addr + 4
                fits = len(value) == end
                if fits and with_nat:  # same order as encode_entry_attrs: SNAT, then DNAT
                    r_src = value[off : off + addr]
                    r_dst = value[off + addr : off + 2 * addr]
                    r_sport = value[end - 4 : end - 2]
                    r_dport = value[end - 2 : end]
                    if r_dst != src or r_dport != sport:
                        tail += _nat_attr(nl.CTA_NAT_SRC, addr, r_dst, r_dport)
                    if r_src != dst or r_sport != dport:
                        tail += _nat_attr(nl.CTA_NAT_DST, addr, r_src, r_sport)
            else:
                fits = len(value) == off
            if fits:
                raw_status = value[1:5]
                status = _status_cache.get(raw_status) or _commit_status(raw_status)
                front = pack(
                    size + len(tail), _CT_NEW, flags, seq, 0, nfgen,
                    head_o, src, h_dst, dst, _PROTO_NUM_HEADS, proto, _H_SPORT, sport,
                    _H_DPORT, dport,
                    head_r, dst, h_dst, src, _PROTO_NUM_HEADS, proto, _H_SPORT, dport,
                    _H_DPORT, sport,
                    _H_STATUS, status,
                    _H_TIMEOUT, ct_timeout,
                    _H_MARK, value[9:13],
                )  # fmt: skip
                return front + tail if tail else front
    entry = commit_entry(rec.to_entry(key, value), timeout, with_nat=with_nat)
    return nl.encode_ct_message(nl.CT_NEW, flags, seq, entry)


_SLOW_VALUE_FLAGS: Final = rec.VAL_RARE | rec.VAL_SCTP | rec.VAL_DCCP


def _message_struct(size: int) -> struct.Struct:
    """The fixed front of a ports-record CT_NEW as one struct (``size``: address bytes).

    nlmsghdr, nfgenmsg, both tuples, status, timeout and mark: the constant attribute
    headers travel as ready-made byte runs, the variable fields in between. One ``pack``
    per message instead of a join of twenty pieces: the commit loop builds 100k of them
    on a failover's critical path."""
    a = f"{size}s"
    tuple_fmt = f"12s{a}4s{a} 8sB3x 4s2s 2x4s2s 2x"  # one tuple: heads, addresses, ports
    return struct.Struct(f"=IHHII 4s {tuple_fmt} {tuple_fmt} 4s4s 4s4s 4s4s")


_PROTO_NUM_HEADS = _H_PROTO_PORTS + _H_NUM
_H_STATUS = _h(8, nl.CTA_STATUS)
_H_TIMEOUT = _h(8, nl.CTA_TIMEOUT)
_H_MARK = _h(8, nl.CTA_MARK)
_ONE_BE = (1).to_bytes(4, "big")
_ZERO_BE = bytes(4)
_NFGEN = {4: struct.pack("=BBH", AF_INET, 0, 0), 16: struct.pack("=BBH", AF_INET6, 0, 0)}
_PortsLayout = tuple[
    Callable[[bytes], tuple[Any, ...]], int, Callable[..., bytes], int, bytes, bytes, bytes,
    bytes, int,
]  # fmt: skip


def _ports_layout(kind: int, size: int) -> _PortsLayout:
    """Everything the fast path needs for one key kind, in one tuple (one lookup)."""
    key_struct, message = rec.KEY_STRUCTS[kind], _message_struct(size)
    head_o, head_r, h_dst = _TUPLE_HEADS[size]
    return (key_struct.unpack, key_struct.size, message.pack, message.size, _NFGEN[size],
            head_o, head_r, h_dst, size)  # fmt: skip


_PORTS_LAYOUTS: Final = {
    rec.KEY_V4_PORTS: _ports_layout(rec.KEY_V4_PORTS, 4),
    rec.KEY_V6_PORTS: _ports_layout(rec.KEY_V6_PORTS, 16),
}
_status_cache: dict[bytes, bytes] = {}


def _commit_status(raw: bytes) -> bytes:
    """A record's big-endian status as a commit sets it (memoised: few distinct)."""
    status = _status_cache.get(raw)
    if status is None:
        value = (int.from_bytes(raw, "big") & _SETTABLE_STATUS) | _CONFIRMED
        status = value.to_bytes(4, "big")
        if len(_status_cache) < 4096:
            _status_cache[bytes(raw)] = status
    return status


_tcp_attr_cache: dict[bytes, bytes] = {}


def _tcp_attr(packed: bytes) -> bytes:
    """The CTA_PROTOINFO attribute for a record's 7 TCP bytes (memoised: few distinct)."""
    attr = _tcp_attr_cache.get(packed)
    if attr is None:
        state, ws_o, ws_r, fl_o, _, fl_r, _ = packed
        base = TCP_FLAG_BE_LIBERAL | TCP_FLAG_SACK_PERM
        if state >= TcpState.TIME_WAIT:
            base |= TCP_FLAG_CLOSE_INIT
        f_o = base | (fl_o & TCP_FLAG_WINDOW_SCALE)
        f_r = base | (fl_r & TCP_FLAG_WINDOW_SCALE)
        attr = _TCP_PROTOINFO.pack(
            48, _N | nl.CTA_PROTOINFO, 44, _N | nl.CTA_PROTOINFO_TCP,
            5, nl.CTA_PROTOINFO_TCP_STATE, state,
            5, nl.CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, ws_o,
            5, nl.CTA_PROTOINFO_TCP_WSCALE_REPLY, ws_r,
            6, nl.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, f_o, f_o,
            6, nl.CTA_PROTOINFO_TCP_FLAGS_REPLY, f_r, f_r,
        )  # fmt: skip
        if len(_tcp_attr_cache) < 4096:
            _tcp_attr_cache[bytes(packed)] = attr
    return attr


_FIXED_SIZE: Final = rec.FIXED_SIZE
_CT_NEW: Final = nl.CT_NEW


def _nat_prefix(atype: int, size: int) -> tuple[bytes, bytes, bytes]:
    """Constant pieces of a CTA_NAT_* nest around (address, address, port, port)."""
    if size == 4:
        h_min, h_max = _h(8, nl.CTA_NAT_V4_MINIP), _h(8, nl.CTA_NAT_V4_MAXIP)
    else:
        h_min, h_max = _h(20, nl.CTA_NAT_V6_MINIP), _h(20, nl.CTA_NAT_V6_MAXIP)
    length = 4 + 2 * (4 + size) + 20
    head = _h(length, _N | atype) + h_min
    mid = _h(20, _N | nl.CTA_NAT_PROTO) + _h(6, nl.CTA_PROTONAT_PORT_MIN)
    return head, h_max, mid


_NAT_PIECES = {
    (atype, size): _nat_prefix(atype, size)
    for atype in (nl.CTA_NAT_SRC, nl.CTA_NAT_DST)
    for size in (4, 16)
}
_PAD2_PORT_MAX = _PAD2 + _h(6, nl.CTA_PROTONAT_PORT_MAX)


def _nat_attr(atype: int, size: int, address: bytes, port: bytes) -> bytes:
    head, h_max, mid = _NAT_PIECES[atype, size]
    return b"".join((head, address, h_max, address, mid, port, _PAD2_PORT_MAX, port, _PAD2))


def timeout_message(key: bytes, seq: int, timeout: int, flags: int = UPDATE_FLAGS) -> bytes:
    """An update that sets only the timeout of the entry ``key`` identifies.

    What conntrackd's -t does to every entry on leaving MASTER: entries that still carry
    traffic are refreshed by it, the others expire. Nothing else is written, so the live
    state (TCP windows, NAT) of an entry that is still in use is left as the kernel has it.
    Raises CtnetlinkError for a malformed key. Without NLM_F_ACK (the default) only a
    failure is answered; a batch sender asks for an ACK on its last message.
    """
    orig, zone = rec.decode_key(key)
    entry = Entry(orig=orig, zone=zone, timeout=timeout)
    return nl.encode_ct_message(nl.CT_NEW, flags, seq, entry)
