"""ctnetlink message codec: bytes <-> entries, pure and struct-based.

Covers IPCTNL_MSG_CT_* (new/get/delete, dumps and events) and IPCTNL_MSG_EXP_* for every
attribute a sync daemon needs. Decoding skips unknown attributes; malformed input raises
:class:`CtnetlinkError` and nothing else (the fuzz invariant, tested with hypothesis).

Layout reminders (include/uapi/linux/netfilter/nfnetlink_conntrack.h):
netlink header and attribute headers are host byte order; every value inside a ctnetlink
attribute is network byte order. Nested attributes carry NLA_F_NESTED, which we set when
encoding and mask off when decoding.

Cache keys come from :func:`tuple_key`: the raw payload of CTA_TUPLE_ORIG exactly as the
kernel encodes it (our encoder emits the same canonical layout), plus the raw CTA_ZONE
attribute when the entry lives in a non-default zone. Taking a slice is the cheapest key
there is, and the key stays a parseable attribute stream (:func:`decode_key`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from ctsync.core.entry import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    IPPROTO_DCCP,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    PORT_PROTOCOLS,
    Counters,
    CtTuple,
    DccpInfo,
    Entry,
    Expectation,
    ExpectNat,
    NatRange,
    SctpInfo,
    SeqAdj,
    Synproxy,
    TcpInfo,
)


class CtnetlinkError(ValueError):
    """Malformed or unexpected ctnetlink bytes. The only exception the decoders raise."""


# --- netlink framing -------------------------------------------------------------------

NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4

NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_ACK: Final = 0x04
NLM_F_ECHO: Final = 0x08
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_ROOT: Final = 0x100
NLM_F_MATCH: Final = 0x200
NLM_F_DUMP: Final = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE: Final = 0x100
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400

NLA_F_NESTED: Final = 0x8000
NLA_TYPE_MASK: Final = 0x3FFF

NFNL_SUBSYS_CTNETLINK: Final = 1
NFNL_SUBSYS_CTNETLINK_EXP: Final = 2
NFNETLINK_V0: Final = 0

IPCTNL_MSG_CT_NEW: Final = 0
IPCTNL_MSG_CT_GET: Final = 1
IPCTNL_MSG_CT_DELETE: Final = 2
IPCTNL_MSG_CT_GET_CTRZERO: Final = 3
IPCTNL_MSG_CT_GET_STATS_CPU: Final = 4
IPCTNL_MSG_CT_GET_STATS: Final = 5

IPCTNL_MSG_EXP_NEW: Final = 0
IPCTNL_MSG_EXP_GET: Final = 1
IPCTNL_MSG_EXP_DELETE: Final = 2

CT_NEW: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
CT_GET: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET
CT_DELETE: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE
CT_GET_STATS: Final = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET_STATS
EXP_NEW: Final = NFNL_SUBSYS_CTNETLINK_EXP << 8 | IPCTNL_MSG_EXP_NEW
EXP_GET: Final = NFNL_SUBSYS_CTNETLINK_EXP << 8 | IPCTNL_MSG_EXP_GET
EXP_DELETE: Final = NFNL_SUBSYS_CTNETLINK_EXP << 8 | IPCTNL_MSG_EXP_DELETE

# Multicast groups (NFNLGRP_*); bind() takes the bitmask 1 << (group - 1).
NFNLGRP_CONNTRACK_NEW: Final = 1
NFNLGRP_CONNTRACK_UPDATE: Final = 2
NFNLGRP_CONNTRACK_DESTROY: Final = 3
NFNLGRP_CONNTRACK_EXP_NEW: Final = 4
NFNLGRP_CONNTRACK_EXP_UPDATE: Final = 5
NFNLGRP_CONNTRACK_EXP_DESTROY: Final = 6

# --- attribute numbers ------------------------------------------------------------------

CTA_TUPLE_ORIG: Final = 1
CTA_TUPLE_REPLY: Final = 2
CTA_STATUS: Final = 3
CTA_PROTOINFO: Final = 4
CTA_HELP: Final = 5
CTA_NAT_SRC: Final = 6
CTA_TIMEOUT: Final = 7
CTA_MARK: Final = 8
CTA_COUNTERS_ORIG: Final = 9
CTA_COUNTERS_REPLY: Final = 10
CTA_USE: Final = 11
CTA_ID: Final = 12
CTA_NAT_DST: Final = 13
CTA_TUPLE_MASTER: Final = 14
CTA_SEQ_ADJ_ORIG: Final = 15
CTA_SEQ_ADJ_REPLY: Final = 16
CTA_SECMARK: Final = 17
CTA_ZONE: Final = 18
CTA_SECCTX: Final = 19
CTA_TIMESTAMP: Final = 20
CTA_MARK_MASK: Final = 21
CTA_LABELS: Final = 22
CTA_LABELS_MASK: Final = 23
CTA_SYNPROXY: Final = 24
CTA_FILTER: Final = 25
CTA_STATUS_MASK: Final = 26
CTA_TIMESTAMP_EVENT: Final = 27

CTA_TUPLE_IP: Final = 1
CTA_TUPLE_PROTO: Final = 2
CTA_TUPLE_ZONE: Final = 3

CTA_IP_V4_SRC: Final = 1
CTA_IP_V4_DST: Final = 2
CTA_IP_V6_SRC: Final = 3
CTA_IP_V6_DST: Final = 4

CTA_PROTO_NUM: Final = 1
CTA_PROTO_SRC_PORT: Final = 2
CTA_PROTO_DST_PORT: Final = 3
CTA_PROTO_ICMP_ID: Final = 4
CTA_PROTO_ICMP_TYPE: Final = 5
CTA_PROTO_ICMP_CODE: Final = 6
CTA_PROTO_ICMPV6_ID: Final = 7
CTA_PROTO_ICMPV6_TYPE: Final = 8
CTA_PROTO_ICMPV6_CODE: Final = 9

CTA_PROTOINFO_TCP: Final = 1
CTA_PROTOINFO_DCCP: Final = 2
CTA_PROTOINFO_SCTP: Final = 3

CTA_PROTOINFO_TCP_STATE: Final = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: Final = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY: Final = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: Final = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY: Final = 5

CTA_PROTOINFO_DCCP_STATE: Final = 1
CTA_PROTOINFO_DCCP_ROLE: Final = 2
CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ: Final = 3

CTA_PROTOINFO_SCTP_STATE: Final = 1
CTA_PROTOINFO_SCTP_VTAG_ORIGINAL: Final = 2
CTA_PROTOINFO_SCTP_VTAG_REPLY: Final = 3

CTA_COUNTERS_PACKETS: Final = 1
CTA_COUNTERS_BYTES: Final = 2
CTA_COUNTERS32_PACKETS: Final = 3
CTA_COUNTERS32_BYTES: Final = 4

CTA_TIMESTAMP_START: Final = 1
CTA_TIMESTAMP_STOP: Final = 2

CTA_NAT_V4_MINIP: Final = 1
CTA_NAT_V4_MAXIP: Final = 2
CTA_NAT_PROTO: Final = 3
CTA_NAT_V6_MINIP: Final = 4
CTA_NAT_V6_MAXIP: Final = 5

CTA_PROTONAT_PORT_MIN: Final = 1
CTA_PROTONAT_PORT_MAX: Final = 2

CTA_SEQADJ_CORRECTION_POS: Final = 1
CTA_SEQADJ_OFFSET_BEFORE: Final = 2
CTA_SEQADJ_OFFSET_AFTER: Final = 3

CTA_HELP_NAME: Final = 1
CTA_SECCTX_NAME: Final = 1

CTA_SYNPROXY_ISN: Final = 1
CTA_SYNPROXY_ITS: Final = 2
CTA_SYNPROXY_TSOFF: Final = 3

CTA_EXPECT_MASTER: Final = 1
CTA_EXPECT_TUPLE: Final = 2
CTA_EXPECT_MASK: Final = 3
CTA_EXPECT_TIMEOUT: Final = 4
CTA_EXPECT_ID: Final = 5
CTA_EXPECT_HELP_NAME: Final = 6
CTA_EXPECT_ZONE: Final = 7
CTA_EXPECT_FLAGS: Final = 8
CTA_EXPECT_CLASS: Final = 9
CTA_EXPECT_NAT: Final = 10
CTA_EXPECT_FN: Final = 11

CTA_EXPECT_NAT_DIR: Final = 1
CTA_EXPECT_NAT_TUPLE: Final = 2

# --- struct helpers ---------------------------------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")
_U8 = struct.Struct("B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_ERRNO = struct.Struct("=i")
_TCP_FLAGS = struct.Struct("BB")

NLMSG_HDRLEN: Final = _NLMSGHDR.size  # 16
NFGEN_HDRLEN: Final = _NFGENMSG.size  # 4
PAYLOAD_OFFSET: Final = NLMSG_HDRLEN + NFGEN_HDRLEN

_unpack_nla = _NLA.unpack_from
_unpack_be16 = _BE16.unpack_from
_unpack_be32 = _BE32.unpack_from
_unpack_be64 = _BE64.unpack_from

Buffer = bytes | bytearray | memoryview


# --- framing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NlMessage:
    """One netlink message inside a datagram: header fields and the payload's byte range.

    ``start``..``end`` cover the ctnetlink attributes (after the nfgenmsg header).
    """

    type: int
    flags: int
    seq: int
    pid: int
    family: int
    start: int
    end: int


def iter_messages(
    buf: Buffer, length: int | None = None
) -> Iterator[tuple[int, int, int, int, int, int]]:
    """Split a netlink datagram into (type, flags, seq, pid, start, end) per message.

    ``start``/``end`` delimit the message body after the netlink header (for ctnetlink
    messages: nfgenmsg + attributes). Raises CtnetlinkError on a truncated header.
    """
    end_all = len(buf) if length is None else length
    off = 0
    unpack = _NLMSGHDR.unpack_from
    while off + NLMSG_HDRLEN <= end_all:
        mlen, mtype, flags, seq, pid = unpack(buf, off)
        if mlen < NLMSG_HDRLEN or off + mlen > end_all:
            raise CtnetlinkError(f"netlink message length {mlen} at offset {off} is out of bounds")
        yield mtype, flags, seq, pid, off + NLMSG_HDRLEN, off + mlen
        off += (mlen + 3) & ~3
    if off < end_all and end_all - off >= 4:
        raise CtnetlinkError(f"{end_all - off} trailing bytes after the last netlink message")


def decode_error(buf: Buffer, start: int, end: int) -> tuple[int, int]:
    """The (errno, seq of the failed request) of an NLMSG_ERROR body; errno 0 is an ACK."""
    if end - start < 4 + NLMSG_HDRLEN:
        raise CtnetlinkError("truncated NLMSG_ERROR")
    (err,) = _ERRNO.unpack_from(buf, start)
    seq = _NLMSGHDR.unpack_from(buf, start + 4)[3]
    return -err, seq


def message_header(mtype: int, flags: int, seq: int, family: int, body_len: int) -> bytes:
    return _NLMSGHDR.pack(PAYLOAD_OFFSET + body_len, mtype, flags, seq, 0) + _NFGENMSG.pack(
        family, NFNETLINK_V0, 0
    )


# --- attribute encoding -----------------------------------------------------------------


def attr(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _NLA.pack(n, atype) + payload + b"\0" * (-n & 3)


def nest(atype: int, *parts: bytes) -> bytes:
    return attr(atype | NLA_F_NESTED, b"".join(parts))


def attr_u8(atype: int, value: int) -> bytes:
    return attr(atype, _U8.pack(value))


def attr_be16(atype: int, value: int) -> bytes:
    return attr(atype, _BE16.pack(value))


def attr_be32(atype: int, value: int) -> bytes:
    return attr(atype, _BE32.pack(value & 0xFFFFFFFF))


def attr_be64(atype: int, value: int) -> bytes:
    return attr(atype, _BE64.pack(value))


def attr_str(atype: int, value: str) -> bytes:
    return attr(atype, value.encode() + b"\0")


def encode_tuple_payload(t: CtTuple) -> bytes:
    """The body of a CTA_TUPLE_* nest, in the kernel's own attribute order."""
    if t.family == AF_INET:
        if len(t.src) != 4 or len(t.dst) != 4:
            raise ValueError("IPv4 tuple needs 4-byte addresses")
        ip = nest(CTA_TUPLE_IP, attr(CTA_IP_V4_SRC, t.src), attr(CTA_IP_V4_DST, t.dst))
    elif t.family == AF_INET6:
        if len(t.src) != 16 or len(t.dst) != 16:
            raise ValueError("IPv6 tuple needs 16-byte addresses")
        ip = nest(CTA_TUPLE_IP, attr(CTA_IP_V6_SRC, t.src), attr(CTA_IP_V6_DST, t.dst))
    else:
        raise ValueError(f"unsupported address family {t.family}")
    proto = [attr_u8(CTA_PROTO_NUM, t.proto)]
    if t.proto == IPPROTO_ICMP:
        proto += [
            attr_be16(CTA_PROTO_ICMP_ID, t.icmp_id),
            attr_u8(CTA_PROTO_ICMP_TYPE, t.icmp_type),
            attr_u8(CTA_PROTO_ICMP_CODE, t.icmp_code),
        ]
    elif t.proto == IPPROTO_ICMPV6:
        proto += [
            attr_be16(CTA_PROTO_ICMPV6_ID, t.icmp_id),
            attr_u8(CTA_PROTO_ICMPV6_TYPE, t.icmp_type),
            attr_u8(CTA_PROTO_ICMPV6_CODE, t.icmp_code),
        ]
    elif t.proto in PORT_PROTOCOLS and (t.proto != IPPROTO_DCCP or t.sport or t.dport):
        # Kernels since 6.16 track DCCP as a generic protocol, without ports; port 0 is
        # not a valid DCCP port, so zero ports mean "the kernel sent none".
        proto += [attr_be16(CTA_PROTO_SRC_PORT, t.sport), attr_be16(CTA_PROTO_DST_PORT, t.dport)]
    parts = [ip, nest(CTA_TUPLE_PROTO, *proto)]
    if t.zone is not None:
        parts.append(attr_be16(CTA_TUPLE_ZONE, t.zone))
    return b"".join(parts)


def encode_tuple(atype: int, t: CtTuple) -> bytes:
    return nest(atype, encode_tuple_payload(t))


def tuple_key(t: CtTuple, zone: int | None = None) -> bytes:
    """The cache key of an entry with original tuple ``t`` in ``zone`` (see module doc)."""
    key = encode_tuple_payload(t)
    if zone:
        key += attr_be16(CTA_ZONE, zone)
    return key


def _encode_nat(atype: int, family: int, nat: NatRange) -> bytes:
    if family == AF_INET:
        parts = [attr(CTA_NAT_V4_MINIP, nat.min_ip), attr(CTA_NAT_V4_MAXIP, nat.max_ip)]
    else:
        parts = [attr(CTA_NAT_V6_MINIP, nat.min_ip), attr(CTA_NAT_V6_MAXIP, nat.max_ip)]
    if nat.min_port is not None:
        max_port = nat.min_port if nat.max_port is None else nat.max_port
        parts.append(
            nest(
                CTA_NAT_PROTO,
                attr_be16(CTA_PROTONAT_PORT_MIN, nat.min_port),
                attr_be16(CTA_PROTONAT_PORT_MAX, max_port),
            )
        )
    return nest(atype, *parts)


def _encode_protoinfo(info: TcpInfo | SctpInfo | DccpInfo) -> bytes:
    if isinstance(info, TcpInfo):
        parts = [attr_u8(CTA_PROTOINFO_TCP_STATE, info.state)]
        if info.wscale_orig is not None:
            parts.append(attr_u8(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, info.wscale_orig))
        if info.wscale_reply is not None:
            parts.append(attr_u8(CTA_PROTOINFO_TCP_WSCALE_REPLY, info.wscale_reply))
        if info.flags_orig is not None:
            mask = info.flags_orig if info.mask_orig is None else info.mask_orig
            parts.append(
                attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, _TCP_FLAGS.pack(info.flags_orig, mask))
            )
        if info.flags_reply is not None:
            mask = info.flags_reply if info.mask_reply is None else info.mask_reply
            parts.append(
                attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, _TCP_FLAGS.pack(info.flags_reply, mask))
            )
        return nest(CTA_PROTOINFO, nest(CTA_PROTOINFO_TCP, *parts))
    if isinstance(info, SctpInfo):
        parts = [attr_u8(CTA_PROTOINFO_SCTP_STATE, info.state)]
        if info.vtag_orig is not None:
            parts.append(attr_be32(CTA_PROTOINFO_SCTP_VTAG_ORIGINAL, info.vtag_orig))
        if info.vtag_reply is not None:
            parts.append(attr_be32(CTA_PROTOINFO_SCTP_VTAG_REPLY, info.vtag_reply))
        return nest(CTA_PROTOINFO, nest(CTA_PROTOINFO_SCTP, *parts))
    parts = [attr_u8(CTA_PROTOINFO_DCCP_STATE, info.state)]
    if info.role is not None:
        parts.append(attr_u8(CTA_PROTOINFO_DCCP_ROLE, info.role))
    if info.handshake_seq is not None:
        parts.append(attr_be64(CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ, info.handshake_seq))
    return nest(CTA_PROTOINFO, nest(CTA_PROTOINFO_DCCP, *parts))


def _encode_seqadj(atype: int, adj: SeqAdj) -> bytes:
    return nest(
        atype,
        attr_be32(CTA_SEQADJ_CORRECTION_POS, adj.correction_pos),
        attr_be32(CTA_SEQADJ_OFFSET_BEFORE, adj.offset_before),
        attr_be32(CTA_SEQADJ_OFFSET_AFTER, adj.offset_after),
    )


def encode_entry_attrs(entry: Entry) -> bytes:
    """Every attribute of ``entry`` that is set, as a ctnetlink attribute stream.

    Attributes the kernel only reports (use, counters, timestamps) are encoded too, so the
    codec round-trips; the commit path builds its messages from a prepared entry instead
    (see ``ctsync.core.commit``).
    """
    parts = [encode_tuple(CTA_TUPLE_ORIG, entry.orig)]
    if entry.reply is not None:
        parts.append(encode_tuple(CTA_TUPLE_REPLY, entry.reply))
    if entry.zone is not None:
        parts.append(attr_be16(CTA_ZONE, entry.zone))
    if entry.status is not None:
        parts.append(attr_be32(CTA_STATUS, entry.status))
    if entry.timeout is not None:
        parts.append(attr_be32(CTA_TIMEOUT, entry.timeout))
    if entry.mark is not None:
        parts.append(attr_be32(CTA_MARK, entry.mark))
    if entry.mark_mask is not None:
        parts.append(attr_be32(CTA_MARK_MASK, entry.mark_mask))
    if entry.protoinfo is not None:
        parts.append(_encode_protoinfo(entry.protoinfo))
    if entry.helper is not None:
        parts.append(nest(CTA_HELP, attr_str(CTA_HELP_NAME, entry.helper)))
    if entry.nat_src is not None:
        parts.append(_encode_nat(CTA_NAT_SRC, entry.family, entry.nat_src))
    if entry.nat_dst is not None:
        parts.append(_encode_nat(CTA_NAT_DST, entry.family, entry.nat_dst))
    if entry.master is not None:
        parts.append(encode_tuple(CTA_TUPLE_MASTER, entry.master))
    if entry.seq_adj_orig is not None:
        parts.append(_encode_seqadj(CTA_SEQ_ADJ_ORIG, entry.seq_adj_orig))
    if entry.seq_adj_reply is not None:
        parts.append(_encode_seqadj(CTA_SEQ_ADJ_REPLY, entry.seq_adj_reply))
    if entry.labels is not None:
        parts.append(attr(CTA_LABELS, entry.labels))
    if entry.labels_mask is not None:
        parts.append(attr(CTA_LABELS_MASK, entry.labels_mask))
    if entry.synproxy is not None:
        sp = entry.synproxy
        parts.append(
            nest(
                CTA_SYNPROXY,
                attr_be32(CTA_SYNPROXY_ISN, sp.isn),
                attr_be32(CTA_SYNPROXY_ITS, sp.its),
                attr_be32(CTA_SYNPROXY_TSOFF, sp.tsoff),
            )
        )
    if entry.id is not None:
        parts.append(attr_be32(CTA_ID, entry.id))
    if entry.use is not None:
        parts.append(attr_be32(CTA_USE, entry.use))
    for atype, counters in (
        (CTA_COUNTERS_ORIG, entry.counters_orig),
        (CTA_COUNTERS_REPLY, entry.counters_reply),
    ):
        if counters is not None:
            parts.append(
                nest(
                    atype,
                    attr_be64(CTA_COUNTERS_PACKETS, counters.packets),
                    attr_be64(CTA_COUNTERS_BYTES, counters.bytes),
                )
            )
    if entry.timestamp_start is not None or entry.timestamp_stop is not None:
        ts = []
        if entry.timestamp_start is not None:
            ts.append(attr_be64(CTA_TIMESTAMP_START, entry.timestamp_start))
        if entry.timestamp_stop is not None:
            ts.append(attr_be64(CTA_TIMESTAMP_STOP, entry.timestamp_stop))
        parts.append(nest(CTA_TIMESTAMP, *ts))
    if entry.timestamp_event is not None:
        parts.append(attr_be64(CTA_TIMESTAMP_EVENT, entry.timestamp_event))
    if entry.secctx is not None:
        parts.append(nest(CTA_SECCTX, attr_str(CTA_SECCTX_NAME, entry.secctx)))
    return b"".join(parts)


def encode_ct_message(
    mtype: int, flags: int, seq: int, entry: Entry, family: int | None = None
) -> bytes:
    body = encode_entry_attrs(entry)
    return (
        message_header(mtype, flags, seq, entry.family if family is None else family, len(body))
        + body
    )


def encode_dump_request(
    seq: int,
    family: int = 0,
    *,
    mark: int | None = None,
    mark_mask: int = 0xFFFFFFFF,
    zone: int | None = None,
    expectations: bool = False,
) -> bytes:
    """A GET dump request; family 0 dumps IPv4 and IPv6. Mark and zone filter in the kernel."""
    parts = []
    if mark is not None:
        parts += [attr_be32(CTA_MARK, mark), attr_be32(CTA_MARK_MASK, mark_mask)]
    if zone is not None:
        parts.append(attr_be16(CTA_ZONE, zone))
    body = b"".join(parts)
    mtype = EXP_GET if expectations else CT_GET
    return message_header(mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, family, len(body)) + body


def encode_delete(
    seq: int,
    orig: CtTuple,
    zone: int | None = None,
    ct_id: int | None = None,
    flags: int = NLM_F_REQUEST | NLM_F_ACK,
) -> bytes:
    """Delete one entry by its original tuple (and, with ``ct_id``, only that incarnation)."""
    parts = [encode_tuple(CTA_TUPLE_ORIG, orig)]
    if zone is not None:
        parts.append(attr_be16(CTA_ZONE, zone))
    if ct_id is not None:
        parts.append(attr_be32(CTA_ID, ct_id))
    body = b"".join(parts)
    return message_header(CT_DELETE, flags, seq, orig.family, len(body)) + body


def encode_flush(
    seq: int,
    family: int = 0,
    *,
    mark: int | None = None,
    mark_mask: int = 0xFFFFFFFF,
    expectations: bool = False,
) -> bytes:
    """Flush the table (or only entries with ``mark``/``mark_mask``).

    The kernel ignores the family on flush unless a CTA_FILTER is present or the nfgenmsg
    version is non-zero, so a per-family flush is done with a dump + delete instead
    (see ``ctsync.io.netlink``); here family 0 means both.
    """
    parts = []
    if mark is not None:
        parts += [attr_be32(CTA_MARK, mark), attr_be32(CTA_MARK_MASK, mark_mask)]
    body = b"".join(parts)
    mtype = EXP_DELETE if expectations else CT_DELETE
    return message_header(mtype, NLM_F_REQUEST | NLM_F_ACK, seq, family, len(body)) + body


def encode_expectation(mtype: int, flags: int, seq: int, exp: Expectation) -> bytes:
    parts = [
        encode_tuple(CTA_EXPECT_MASTER, exp.master),
        encode_tuple(CTA_EXPECT_TUPLE, exp.tuple),
        encode_tuple(CTA_EXPECT_MASK, exp.mask),
    ]
    if exp.timeout is not None:
        parts.append(attr_be32(CTA_EXPECT_TIMEOUT, exp.timeout))
    if exp.id is not None:
        parts.append(attr_be32(CTA_EXPECT_ID, exp.id))
    if exp.helper is not None:
        parts.append(attr_str(CTA_EXPECT_HELP_NAME, exp.helper))
    if exp.zone is not None:
        parts.append(attr_be16(CTA_EXPECT_ZONE, exp.zone))
    if exp.flags is not None:
        parts.append(attr_be32(CTA_EXPECT_FLAGS, exp.flags))
    if exp.klass is not None:
        parts.append(attr_be32(CTA_EXPECT_CLASS, exp.klass))
    if exp.nat is not None:
        parts.append(
            nest(
                CTA_EXPECT_NAT,
                attr_be32(CTA_EXPECT_NAT_DIR, exp.nat.direction),
                encode_tuple(CTA_EXPECT_NAT_TUPLE, exp.nat.tuple),
            )
        )
    if exp.function is not None:
        parts.append(attr_str(CTA_EXPECT_FN, exp.function))
    body = b"".join(parts)
    return message_header(mtype, flags, seq, exp.master.family, len(body)) + body


# --- attribute decoding -----------------------------------------------------------------


def _walk(buf: Buffer, off: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of each attribute in buf[off:end]."""
    while off + 4 <= end:
        alen, atype = _unpack_nla(buf, off)
        if alen < 4 or off + alen > end:
            raise CtnetlinkError(f"attribute length {alen} at offset {off} is out of bounds")
        yield atype & NLA_TYPE_MASK, off + 4, off + alen
        off += (alen + 3) & ~3


def _need(start: int, end: int, size: int, what: str) -> None:
    if end - start < size:
        raise CtnetlinkError(f"{what}: {end - start} bytes, need {size}")


def _get_u8(buf: Buffer, start: int, end: int, what: str) -> int:
    _need(start, end, 1, what)
    return buf[start]


def _get_be16(buf: Buffer, start: int, end: int, what: str) -> int:
    _need(start, end, 2, what)
    value: int = _unpack_be16(buf, start)[0]
    return value


def _get_be32(buf: Buffer, start: int, end: int, what: str) -> int:
    _need(start, end, 4, what)
    value: int = _unpack_be32(buf, start)[0]
    return value


def _get_be64(buf: Buffer, start: int, end: int, what: str) -> int:
    _need(start, end, 8, what)
    value: int = _unpack_be64(buf, start)[0]
    return value


def _get_str(buf: Buffer, start: int, end: int) -> str:
    raw = bytes(buf[start:end]).split(b"\0", 1)[0]
    return raw.decode("utf-8", "replace")


def decode_tuple(buf: Buffer, start: int, end: int) -> CtTuple:
    """Decode the body of a CTA_TUPLE_* nest."""
    family = 0
    src = dst = b""
    proto = -1
    sport = dport = icmp_id = icmp_type = icmp_code = 0
    zone: int | None = None
    for atype, s, e in _walk(buf, start, end):
        if atype == CTA_TUPLE_IP:
            for itype, s2, e2 in _walk(buf, s, e):
                if itype in (CTA_IP_V4_SRC, CTA_IP_V4_DST):
                    _need(s2, e2, 4, "CTA_IP_V4")
                    family = AF_INET
                    value = bytes(buf[s2 : s2 + 4])
                elif itype in (CTA_IP_V6_SRC, CTA_IP_V6_DST):
                    _need(s2, e2, 16, "CTA_IP_V6")
                    family = AF_INET6
                    value = bytes(buf[s2 : s2 + 16])
                else:
                    continue
                if itype in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = value
                else:
                    dst = value
        elif atype == CTA_TUPLE_PROTO:
            for ptype, s2, e2 in _walk(buf, s, e):
                if ptype == CTA_PROTO_NUM:
                    proto = _get_u8(buf, s2, e2, "CTA_PROTO_NUM")
                elif ptype == CTA_PROTO_SRC_PORT:
                    sport = _get_be16(buf, s2, e2, "CTA_PROTO_SRC_PORT")
                elif ptype == CTA_PROTO_DST_PORT:
                    dport = _get_be16(buf, s2, e2, "CTA_PROTO_DST_PORT")
                elif ptype in (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMPV6_ID):
                    icmp_id = _get_be16(buf, s2, e2, "CTA_PROTO_ICMP_ID")
                elif ptype in (CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMPV6_TYPE):
                    icmp_type = _get_u8(buf, s2, e2, "CTA_PROTO_ICMP_TYPE")
                elif ptype in (CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMPV6_CODE):
                    icmp_code = _get_u8(buf, s2, e2, "CTA_PROTO_ICMP_CODE")
        elif atype == CTA_TUPLE_ZONE:
            zone = _get_be16(buf, s, e, "CTA_TUPLE_ZONE")
    if not src or not dst or len(src) != len(dst):
        raise CtnetlinkError("tuple without both source and destination address of one family")
    if proto < 0:
        raise CtnetlinkError("tuple without CTA_PROTO_NUM")
    return CtTuple(family, proto, src, dst, sport, dport, icmp_id, icmp_type, icmp_code, zone)


def decode_protoinfo(buf: Buffer, start: int, end: int) -> TcpInfo | SctpInfo | DccpInfo | None:
    for ptype, s, e in _walk(buf, start, end):
        if ptype == CTA_PROTOINFO_TCP:
            state = -1
            ws_o = ws_r = fl_o = mk_o = fl_r = mk_r = None
            for t, s2, e2 in _walk(buf, s, e):
                if t == CTA_PROTOINFO_TCP_STATE:
                    state = _get_u8(buf, s2, e2, "TCP state")
                elif t == CTA_PROTOINFO_TCP_WSCALE_ORIGINAL:
                    ws_o = _get_u8(buf, s2, e2, "TCP wscale")
                elif t == CTA_PROTOINFO_TCP_WSCALE_REPLY:
                    ws_r = _get_u8(buf, s2, e2, "TCP wscale")
                elif t == CTA_PROTOINFO_TCP_FLAGS_ORIGINAL:
                    _need(s2, e2, 2, "TCP flags")
                    fl_o, mk_o = buf[s2], buf[s2 + 1]
                elif t == CTA_PROTOINFO_TCP_FLAGS_REPLY:
                    _need(s2, e2, 2, "TCP flags")
                    fl_r, mk_r = buf[s2], buf[s2 + 1]
            if state < 0:
                raise CtnetlinkError("TCP protoinfo without state")
            return TcpInfo(state, ws_o, ws_r, fl_o, mk_o, fl_r, mk_r)
        if ptype == CTA_PROTOINFO_SCTP:
            state = -1
            vt_o = vt_r = None
            for t, s2, e2 in _walk(buf, s, e):
                if t == CTA_PROTOINFO_SCTP_STATE:
                    state = _get_u8(buf, s2, e2, "SCTP state")
                elif t == CTA_PROTOINFO_SCTP_VTAG_ORIGINAL:
                    vt_o = _get_be32(buf, s2, e2, "SCTP vtag")
                elif t == CTA_PROTOINFO_SCTP_VTAG_REPLY:
                    vt_r = _get_be32(buf, s2, e2, "SCTP vtag")
            if state < 0:
                raise CtnetlinkError("SCTP protoinfo without state")
            return SctpInfo(state, vt_o, vt_r)
        if ptype == CTA_PROTOINFO_DCCP:
            state = -1
            role = hs = None
            for t, s2, e2 in _walk(buf, s, e):
                if t == CTA_PROTOINFO_DCCP_STATE:
                    state = _get_u8(buf, s2, e2, "DCCP state")
                elif t == CTA_PROTOINFO_DCCP_ROLE:
                    role = _get_u8(buf, s2, e2, "DCCP role")
                elif t == CTA_PROTOINFO_DCCP_HANDSHAKE_SEQ:
                    hs = _get_be64(buf, s2, e2, "DCCP handshake seq")
            if state < 0:
                raise CtnetlinkError("DCCP protoinfo without state")
            return DccpInfo(state, role, hs)
    return None


def _decode_counters(buf: Buffer, start: int, end: int) -> Counters:
    packets = nbytes = 0
    for t, s, e in _walk(buf, start, end):
        if t == CTA_COUNTERS_PACKETS:
            packets = _get_be64(buf, s, e, "counter")
        elif t == CTA_COUNTERS_BYTES:
            nbytes = _get_be64(buf, s, e, "counter")
        elif t == CTA_COUNTERS32_PACKETS:
            packets = _get_be32(buf, s, e, "counter")
        elif t == CTA_COUNTERS32_BYTES:
            nbytes = _get_be32(buf, s, e, "counter")
    return Counters(packets, nbytes)


def _decode_seqadj(buf: Buffer, start: int, end: int) -> SeqAdj:
    pos = before = after = 0
    for t, s, e in _walk(buf, start, end):
        if t == CTA_SEQADJ_CORRECTION_POS:
            pos = _get_be32(buf, s, e, "seqadj")
        elif t == CTA_SEQADJ_OFFSET_BEFORE:
            before = _get_be32(buf, s, e, "seqadj")
        elif t == CTA_SEQADJ_OFFSET_AFTER:
            after = _get_be32(buf, s, e, "seqadj")
    return SeqAdj(pos, before, after)


def _decode_nat(buf: Buffer, start: int, end: int) -> NatRange:
    min_ip = max_ip = b""
    min_port = max_port = None
    for t, s, e in _walk(buf, start, end):
        if t in (CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP):
            _need(s, e, 4, "CTA_NAT_V4")
            value = bytes(buf[s : s + 4])
        elif t in (CTA_NAT_V6_MINIP, CTA_NAT_V6_MAXIP):
            _need(s, e, 16, "CTA_NAT_V6")
            value = bytes(buf[s : s + 16])
        elif t == CTA_NAT_PROTO:
            for pt, s2, e2 in _walk(buf, s, e):
                if pt == CTA_PROTONAT_PORT_MIN:
                    min_port = _get_be16(buf, s2, e2, "NAT port")
                elif pt == CTA_PROTONAT_PORT_MAX:
                    max_port = _get_be16(buf, s2, e2, "NAT port")
            continue
        else:
            continue
        if t in (CTA_NAT_V4_MINIP, CTA_NAT_V6_MINIP):
            min_ip = value
        else:
            max_ip = value
    if not min_ip:
        raise CtnetlinkError("NAT range without a minimum address")
    return NatRange(min_ip, max_ip or min_ip, min_port, max_port)


def _decode_nested_string(buf: Buffer, start: int, end: int, want: int) -> str | None:
    for t, s, e in _walk(buf, start, end):
        if t == want:
            return _get_str(buf, s, e)
    return None


def decode_entry(buf: Buffer, start: int, end: int) -> Entry:
    """Decode the attributes of a CT_NEW/CT_DELETE message body (after nfgenmsg)."""
    orig: CtTuple | None = None
    fields: dict[str, object] = {}
    try:
        for atype, s, e in _walk(buf, start, end):
            if atype == CTA_TUPLE_ORIG:
                orig = decode_tuple(buf, s, e)
            elif atype == CTA_TUPLE_REPLY:
                fields["reply"] = decode_tuple(buf, s, e)
            elif atype == CTA_STATUS:
                fields["status"] = _get_be32(buf, s, e, "CTA_STATUS")
            elif atype == CTA_TIMEOUT:
                fields["timeout"] = _get_be32(buf, s, e, "CTA_TIMEOUT")
            elif atype == CTA_MARK:
                fields["mark"] = _get_be32(buf, s, e, "CTA_MARK")
            elif atype == CTA_MARK_MASK:
                fields["mark_mask"] = _get_be32(buf, s, e, "CTA_MARK_MASK")
            elif atype == CTA_ID:
                fields["id"] = _get_be32(buf, s, e, "CTA_ID")
            elif atype == CTA_USE:
                fields["use"] = _get_be32(buf, s, e, "CTA_USE")
            elif atype == CTA_ZONE:
                fields["zone"] = _get_be16(buf, s, e, "CTA_ZONE")
            elif atype == CTA_PROTOINFO:
                fields["protoinfo"] = decode_protoinfo(buf, s, e)
            elif atype == CTA_HELP:
                fields["helper"] = _decode_nested_string(buf, s, e, CTA_HELP_NAME)
            elif atype == CTA_LABELS:
                fields["labels"] = bytes(buf[s:e])
            elif atype == CTA_LABELS_MASK:
                fields["labels_mask"] = bytes(buf[s:e])
            elif atype == CTA_COUNTERS_ORIG:
                fields["counters_orig"] = _decode_counters(buf, s, e)
            elif atype == CTA_COUNTERS_REPLY:
                fields["counters_reply"] = _decode_counters(buf, s, e)
            elif atype == CTA_SEQ_ADJ_ORIG:
                fields["seq_adj_orig"] = _decode_seqadj(buf, s, e)
            elif atype == CTA_SEQ_ADJ_REPLY:
                fields["seq_adj_reply"] = _decode_seqadj(buf, s, e)
            elif atype == CTA_TIMESTAMP:
                for t, s2, e2 in _walk(buf, s, e):
                    if t == CTA_TIMESTAMP_START:
                        fields["timestamp_start"] = _get_be64(buf, s2, e2, "timestamp")
                    elif t == CTA_TIMESTAMP_STOP:
                        fields["timestamp_stop"] = _get_be64(buf, s2, e2, "timestamp")
            elif atype == CTA_TIMESTAMP_EVENT:
                fields["timestamp_event"] = _get_be64(buf, s, e, "CTA_TIMESTAMP_EVENT")
            elif atype == CTA_SECCTX:
                fields["secctx"] = _decode_nested_string(buf, s, e, CTA_SECCTX_NAME)
            elif atype == CTA_SYNPROXY:
                isn = its = tsoff = 0
                for t, s2, e2 in _walk(buf, s, e):
                    if t == CTA_SYNPROXY_ISN:
                        isn = _get_be32(buf, s2, e2, "synproxy")
                    elif t == CTA_SYNPROXY_ITS:
                        its = _get_be32(buf, s2, e2, "synproxy")
                    elif t == CTA_SYNPROXY_TSOFF:
                        tsoff = _get_be32(buf, s2, e2, "synproxy")
                fields["synproxy"] = Synproxy(isn, its, tsoff)
            elif atype == CTA_TUPLE_MASTER:
                fields["master"] = decode_tuple(buf, s, e)
            elif atype == CTA_NAT_SRC:
                fields["nat_src"] = _decode_nat(buf, s, e)
            elif atype == CTA_NAT_DST:
                fields["nat_dst"] = _decode_nat(buf, s, e)
    except (struct.error, IndexError) as exc:  # defensive: the checks above should catch all
        raise CtnetlinkError(f"malformed ctnetlink attributes: {exc}") from exc
    if orig is None:
        raise CtnetlinkError("conntrack message without CTA_TUPLE_ORIG")
    return Entry(orig, **fields)  # type: ignore[arg-type]


def decode_expectation(buf: Buffer, start: int, end: int) -> Expectation:
    """Decode the attributes of an EXP_NEW/EXP_DELETE message body (after nfgenmsg)."""
    master = tup = mask = None
    fields: dict[str, object] = {}
    try:
        for atype, s, e in _walk(buf, start, end):
            if atype == CTA_EXPECT_MASTER:
                master = decode_tuple(buf, s, e)
            elif atype == CTA_EXPECT_TUPLE:
                tup = decode_tuple(buf, s, e)
            elif atype == CTA_EXPECT_MASK:
                mask = _decode_mask_tuple(buf, s, e)
            elif atype == CTA_EXPECT_TIMEOUT:
                fields["timeout"] = _get_be32(buf, s, e, "CTA_EXPECT_TIMEOUT")
            elif atype == CTA_EXPECT_ID:
                fields["id"] = _get_be32(buf, s, e, "CTA_EXPECT_ID")
            elif atype == CTA_EXPECT_HELP_NAME:
                fields["helper"] = _get_str(buf, s, e)
            elif atype == CTA_EXPECT_ZONE:
                fields["zone"] = _get_be16(buf, s, e, "CTA_EXPECT_ZONE")
            elif atype == CTA_EXPECT_FLAGS:
                fields["flags"] = _get_be32(buf, s, e, "CTA_EXPECT_FLAGS")
            elif atype == CTA_EXPECT_CLASS:
                fields["klass"] = _get_be32(buf, s, e, "CTA_EXPECT_CLASS")
            elif atype == CTA_EXPECT_FN:
                fields["function"] = _get_str(buf, s, e)
            elif atype == CTA_EXPECT_NAT:
                direction = 0
                nat_tuple = None
                for t, s2, e2 in _walk(buf, s, e):
                    if t == CTA_EXPECT_NAT_DIR:
                        direction = _get_be32(buf, s2, e2, "CTA_EXPECT_NAT_DIR")
                    elif t == CTA_EXPECT_NAT_TUPLE:
                        nat_tuple = _decode_mask_tuple(buf, s2, e2)
                if nat_tuple is not None:
                    fields["nat"] = ExpectNat(direction, nat_tuple)
    except (struct.error, IndexError) as exc:
        raise CtnetlinkError(f"malformed expectation attributes: {exc}") from exc
    if master is None or tup is None or mask is None:
        raise CtnetlinkError("expectation without master, tuple and mask")
    return Expectation(master, tup, mask, **fields)  # type: ignore[arg-type]


def _decode_mask_tuple(buf: Buffer, start: int, end: int) -> CtTuple:
    """Like decode_tuple, but the kernel may omit the protocol number in masks/NAT tuples."""
    try:
        return decode_tuple(buf, start, end)
    except CtnetlinkError:
        pass
    # Re-decode leniently: a mask tuple carries its family's addresses and maybe ports.
    family = 0
    src = dst = b""
    sport = dport = 0
    for atype, s, e in _walk(buf, start, end):
        if atype == CTA_TUPLE_IP:
            for itype, s2, e2 in _walk(buf, s, e):
                if itype in (CTA_IP_V4_SRC, CTA_IP_V4_DST) and e2 - s2 >= 4:
                    family, value = AF_INET, bytes(buf[s2 : s2 + 4])
                elif itype in (CTA_IP_V6_SRC, CTA_IP_V6_DST) and e2 - s2 >= 16:
                    family, value = AF_INET6, bytes(buf[s2 : s2 + 16])
                else:
                    continue
                if itype in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = value
                else:
                    dst = value
        elif atype == CTA_TUPLE_PROTO:
            for ptype, s2, e2 in _walk(buf, s, e):
                if ptype == CTA_PROTO_SRC_PORT:
                    sport = _get_be16(buf, s2, e2, "port")
                elif ptype == CTA_PROTO_DST_PORT:
                    dport = _get_be16(buf, s2, e2, "port")
    if not family:
        raise CtnetlinkError("mask tuple without an address")
    size = 4 if family == AF_INET else 16
    return CtTuple(family, 0, src or bytes(size), dst or bytes(size), sport, dport)


def decode_key(key: bytes) -> tuple[CtTuple, int | None]:
    """The original tuple and zone a cache key (:func:`tuple_key`) stands for."""
    zone = None
    for atype, s, e in _walk(key, 0, len(key)):
        if atype == CTA_ZONE:
            zone = _get_be16(key, s, e, "CTA_ZONE")
    return decode_tuple(key, 0, len(key)), zone


def is_icmp(t: CtTuple) -> bool:
    return t.proto in ICMP_PROTOCOLS
