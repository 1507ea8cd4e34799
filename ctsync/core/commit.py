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
from dataclasses import replace
from typing import Final

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
_PAD3 = b"\0\0\0"


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
# Constant runs of a ports tuple: [outer+IP+SRC hdrs] src [DST hdr] dst [PROTO+NUM hdrs,
# proto, pad, SPORT hdr] sport [pad, DPORT hdr] dport [pad].
_TUPLE_HEADS = {
    size: (
        _H_TUPLE_ORIG[size] + _H_IP[size] + _H_SRC[size],
        _H_TUPLE_REPLY[size] + _H_IP[size] + _H_SRC[size],
        _H_DST[size],
    )
    for size in (4, 16)
}
_PROTO_SPORT = [_H_PROTO_PORTS + _H_NUM + bytes((p,)) + _PAD3 + _H_SPORT for p in range(256)]
_PAD2_DPORT = _PAD2 + _H_DPORT


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
    """:func:`commit_message` without keyword arguments, for the commit loop."""
    if key and value and key[0] in _FAST_KINDS and not value[0] & _SLOW_VALUE_FLAGS:
        fast = _fast_ports_message(key, value, seq, timeout, flags, with_nat)
        if fast is not None:
            return fast
    entry = commit_entry(rec.to_entry(key, value), timeout, with_nat=with_nat)
    return nl.encode_ct_message(nl.CT_NEW, flags, seq, entry)


_FAST_KINDS: Final = frozenset({rec.KEY_V4_PORTS, rec.KEY_V6_PORTS})
_SLOW_VALUE_FLAGS: Final = rec.VAL_RARE | rec.VAL_SCTP | rec.VAL_DCCP
_FIXED_ATTRS_BE = struct.Struct(">HHIHHIHHI")
_NFGEN = {4: struct.pack("=BBH", AF_INET, 0, 0), 16: struct.pack("=BBH", AF_INET6, 0, 0)}


def _swapped(length: int, atype: int) -> tuple[int, int]:
    """An attribute header as the two big-endian u16 that pack to its native bytes."""
    raw = _NLA.pack(length, atype)
    return int.from_bytes(raw[:2], "big"), int.from_bytes(raw[2:], "big")


_HS_STATUS = _swapped(8, nl.CTA_STATUS)
_HS_TIMEOUT = _swapped(8, nl.CTA_TIMEOUT)
_HS_MARK = _swapped(8, nl.CTA_MARK)
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


def _fast_ports_message(
    key: bytes, value: bytes, seq: int, timeout: int | None, flags: int, with_nat: bool
) -> bytes | None:
    """CT_NEW for the commonest records: v4/v6, TCP or portless-info protocol, no rare
    attributes. None when the record does not fit (the caller takes the generic path)."""
    size = 4 if key[0] == rec.KEY_V4_PORTS else 16
    st = rec.KEY_STRUCTS[key[0]]
    if len(key) != st.size or len(value) < rec.FIXED_SIZE:
        return None
    _, src, dst, proto, sport, dport = st.unpack(key)
    vflags, status, ct_timeout, mark, _ = _unpack_fixed(value)
    head_o, head_r, h_dst = _TUPLE_HEADS[size]
    proto_sport = _PROTO_SPORT[proto]
    if timeout is None:
        timeout = ct_timeout or 1
    parts = [
        _NFGEN[size],
        head_o, src, h_dst, dst, proto_sport, sport, _PAD2_DPORT, dport, _PAD2,
        head_r, dst, h_dst, src, proto_sport, dport, _PAD2_DPORT, sport, _PAD2,
        _FIXED_ATTRS_BE.pack(
            *_HS_STATUS, (status & _SETTABLE_STATUS) | _CONFIRMED,
            *_HS_TIMEOUT, timeout,
            *_HS_MARK, mark,
        ),
    ]  # fmt: skip
    off = _FIXED_SIZE
    if vflags & 1:  # VAL_TCP
        parts.append(_tcp_attr(value[off : off + 7]))
        off += 7
    if vflags & 8:  # VAL_REPLY: rebuild the NAT bindings from the real reply tuple
        end = off + 2 * size + 4
        if len(value) != end:
            return None
        if with_nat:  # same order as encode_entry_attrs: SNAT, then DNAT
            r_src = value[off : off + size]
            r_dst = value[off + size : off + 2 * size]
            r_sport = value[end - 4 : end - 2]
            r_dport = value[end - 2 : end]
            if r_dst != src or r_dport != sport:
                parts.append(_nat_attr(nl.CTA_NAT_SRC, size, r_dst, r_dport))
            if r_src != dst or r_sport != dport:
                parts.append(_nat_attr(nl.CTA_NAT_DST, size, r_src, r_sport))
    elif len(value) != off:
        return None
    body = b"".join(parts)
    return _NLMSGHDR.pack(16 + len(body), _CT_NEW, flags, seq, 0) + body


_unpack_fixed = rec.value_fields
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
