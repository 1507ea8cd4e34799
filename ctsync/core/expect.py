"""Expectation records: how ctsync holds a conntrack expectation (an FTP/SIP data channel
a helper announces) in its caches and on the sync wire.

Expectations live in the same caches as conntrack entries, as records whose key kind is
:data:`~ctsync.core.record.KEY_EXPECT`, a kind no conntrack key uses. The sync session,
the wire, the resend queue, full transfers and the anti-entropy digest treat records as
opaque (key, value) bytes, so all of them carry expectations without a change; only the
places that interpret a record (commit, show, filters) look at the kind.

Key (identifies the expectation as the kernel does: its tuple and zone)::

    KEY_EXPECT [| KEY_ZONE] | CTA_EXPECT_TUPLE payload (canonical encoding) | [zone be16]

Value::

    version u8 (1) | timeout be32 | attributes

``attributes`` are the kernel's own TLVs, kept verbatim (the mask and the NAT tuple may
lack fields our decoder would fill with guesses): CTA_EXPECT_MASTER, CTA_EXPECT_MASK,
CTA_EXPECT_HELP_NAME, CTA_EXPECT_FLAGS, CTA_EXPECT_CLASS, CTA_EXPECT_NAT, CTA_EXPECT_FN, in
that order. Not kept: the id (each kernel makes its own), the timeout inside the TLVs (it
is in the fixed part, so a record that only counted down compares equal), the zone (key).

Expectations are rare (one per FTP transfer), so this module favours clarity over speed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from ctsync.core import ctnetlink as nl
from ctsync.core import record
from ctsync.core.ctnetlink import Buffer, CtnetlinkError
from ctsync.core.entry import CtTuple, Expectation, family_name, proto_name, tuple_to_json

KEY_EXPECT: Final = record.KEY_EXPECT
VALUE_VERSION: Final = 1
_HEAD = struct.Struct(">BI")
HEAD_SIZE: Final = _HEAD.size
_ZONE = struct.Struct(">H")
_NLA = struct.Struct("=HH")

# Attributes kept in the value, in this order (also the order a commit sends them).
_KEPT: Final = (
    nl.CTA_EXPECT_MASTER,
    nl.CTA_EXPECT_MASK,
    nl.CTA_EXPECT_HELP_NAME,
    nl.CTA_EXPECT_FLAGS,
    nl.CTA_EXPECT_CLASS,
    nl.CTA_EXPECT_NAT,
    nl.CTA_EXPECT_FN,
)
_KEPT_ORDER: Final = {atype: i for i, atype in enumerate(_KEPT)}

# CTA_EXPECT_FLAGS bits (nf_conntrack_common.h).
NF_CT_EXPECT_PERMANENT: Final = 0x1
NF_CT_EXPECT_INACTIVE: Final = 0x2
NF_CT_EXPECT_USERSPACE: Final = 0x4


class ParsedExpectation(NamedTuple):
    """An EXP_NEW/EXP_DELETE message as the kernel-table reader needs it."""

    key: bytes
    value: bytes
    helper: str | None
    master_key: bytes  # the record key of the master conntrack entry


def is_expectation_key(key: bytes) -> bool:
    return bool(key) and key[0] & ~record.KEY_ZONE == KEY_EXPECT


def make_key(exp: Expectation) -> bytes:
    """The record key of an expectation (its tuple and zone)."""
    key = bytes((KEY_EXPECT,)) + nl.encode_tuple_payload(exp.tuple)
    if exp.zone:
        key = bytes((KEY_EXPECT | record.KEY_ZONE,)) + key[1:] + _ZONE.pack(exp.zone)
    return key


def master_key(exp: Expectation) -> bytes:
    """The record key of the expectation's master conntrack entry."""
    return record.key_from_tuple(exp.master, exp.zone)


def decode_key(key: bytes) -> tuple[CtTuple, int | None]:
    """(tuple, zone) of an expectation key. Raises CtnetlinkError on garbage."""
    if not is_expectation_key(key):
        raise CtnetlinkError("not an expectation record key")
    end = len(key)
    zone = None
    if key[0] & record.KEY_ZONE:
        if end < 3:
            raise CtnetlinkError("expectation key too short for a zone")
        end -= 2
        zone = _ZONE.unpack_from(key, end)[0]
    return nl.decode_tuple(key, 1, end), zone


def _walk(buf: Buffer, off: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each attribute; raises CtnetlinkError on bad framing."""
    out = []
    while off + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4 or off + alen > end:
            raise CtnetlinkError(f"attribute length {alen} at offset {off} is out of bounds")
        out.append((atype & nl.NLA_TYPE_MASK, off + 4, off + alen))
        off += (alen + 3) & ~3
    if off < end:
        raise CtnetlinkError(f"{end - off} stray bytes after the last attribute")
    return out


def parse_expectation(buf: Buffer, start: int, end: int) -> ParsedExpectation:
    """Parse an EXP_NEW/EXP_DELETE body (after nfgenmsg) into an expectation record.

    Raises CtnetlinkError on malformed input (the whole message is validated by the
    codec's decoder first)."""
    exp = nl.decode_expectation(buf, start, end)
    kept: list[tuple[int, bytes]] = []
    for t, s, e in _walk(buf, start, end):
        if t in _KEPT_ORDER:
            kept.append((_KEPT_ORDER[t], nl.attr(_NLA.unpack_from(buf, s - 4)[1], bytes(buf[s:e]))))
    kept.sort(key=lambda item: item[0])
    value = _HEAD.pack(VALUE_VERSION, exp.timeout or 0) + b"".join(raw for _, raw in kept)
    return ParsedExpectation(make_key(exp), value, exp.helper, master_key(exp))


def from_expectation(exp: Expectation) -> tuple[bytes, bytes]:
    """The (key, value) record of an Expectation (the inverse of :func:`to_expectation`)."""
    body = nl.encode_expectation(nl.EXP_NEW, 0, 0, exp)[nl.PAYLOAD_OFFSET :]
    parsed = parse_expectation(body, 0, len(body))
    return parsed.key, parsed.value


def value_fields(value: bytes) -> tuple[int, int]:
    """(version, timeout) of an expectation record value."""
    if len(value) < HEAD_SIZE:
        raise CtnetlinkError("expectation record value too short")
    version, timeout = _HEAD.unpack_from(value, 0)
    if version != VALUE_VERSION:
        raise CtnetlinkError(f"expectation record of unknown version {version}")
    return version, timeout


def _attributes(key: bytes, value: bytes) -> tuple[int, bytes]:
    """(family, CTA_EXPECT_* attributes) a record stands for, tuple and timeout included.

    The kernel does not care about attribute order. The kept TLVs are checked (framing,
    master and mask present) so that a malformed record from a peer fails here."""
    tup, zone = decode_key(key)
    _, timeout = value_fields(value)
    attrs = value[HEAD_SIZE:]
    types = {t for t, _s, _e in _walk(attrs, 0, len(attrs))}
    if not {nl.CTA_EXPECT_MASTER, nl.CTA_EXPECT_MASK} <= types:
        raise CtnetlinkError("expectation record without master and mask")
    parts = [nl.encode_tuple(nl.CTA_EXPECT_TUPLE, tup), attrs]
    parts.append(nl.attr_be32(nl.CTA_EXPECT_TIMEOUT, timeout))
    if zone is not None:
        parts.append(nl.attr_be16(nl.CTA_EXPECT_ZONE, zone))
    return tup.family, b"".join(parts)


def to_expectation(key: bytes, value: bytes) -> Expectation:
    """Rebuild the Expectation a record stands for. Raises CtnetlinkError on garbage."""
    _, attrs = _attributes(key, value)
    return nl.decode_expectation(attrs, 0, len(attrs))


def helper_of(value: bytes) -> str | None:
    """The helper name in a record value (None when the kernel sent none)."""
    attrs = value[HEAD_SIZE:]
    for atype, s, e in _walk(attrs, 0, len(attrs)):
        if atype == nl.CTA_EXPECT_HELP_NAME:
            return bytes(attrs[s:e]).split(b"\0", 1)[0].decode("utf-8", "replace")
    return None


def same_but_timeout(old: bytes, new: bytes) -> bool:
    """Whether two values differ at most in the timeout (it counts down in the kernel)."""
    return old[:1] == new[:1] and old[HEAD_SIZE:] == new[HEAD_SIZE:]


COMMIT_FLAGS: Final = nl.NLM_F_REQUEST | nl.NLM_F_CREATE


def commit_message(key: bytes, value: bytes, seq: int, flags: int = COMMIT_FLAGS) -> bytes:
    """The EXP_NEW that creates the expectation in a kernel (its master must be there).

    Create-or-update, as for conntrack entries: without NLM_F_EXCL the kernel refreshes
    the timeout of an expectation that exists already. The timeout sent is the record's
    (at least 1 s); a helper's policy timeout overrides it in the kernel anyway.
    Raises CtnetlinkError if the record is malformed (a record from a peer can be)."""
    family, attrs = _attributes(key, _with_min_timeout(value))
    return nl.message_header(nl.EXP_NEW, flags, seq, family, len(attrs)) + attrs


def _with_min_timeout(value: bytes) -> bytes:
    _, timeout = value_fields(value)
    return value if timeout else _HEAD.pack(VALUE_VERSION, 1) + value[HEAD_SIZE:]


def delete_message(key: bytes, seq: int, flags: int = nl.NLM_F_REQUEST | nl.NLM_F_ACK) -> bytes:
    """The EXP_DELETE that removes exactly this expectation (by tuple and zone).

    Always carries the tuple: an EXP_DELETE without one flushes the whole table."""
    tup, zone = decode_key(key)
    parts = [nl.encode_tuple(nl.CTA_EXPECT_TUPLE, tup)]
    if zone is not None:
        parts.append(nl.attr_be16(nl.CTA_EXPECT_ZONE, zone))
    body = b"".join(parts)
    return nl.message_header(nl.EXP_DELETE, flags, seq, tup.family, len(body)) + body


def split_records(
    records: Iterable[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(conntrack records, expectation records), each in the given order."""
    conntrack: list[tuple[bytes, bytes]] = []
    expectations: list[tuple[bytes, bytes]] = []
    for item in records:
        (expectations if is_expectation_key(item[0]) else conntrack).append(item)
    return conntrack, expectations


def expectation_to_json(exp: Expectation) -> dict[str, Any]:
    """An expectation as JSON-ready values (``show cache`` output), marked as such."""
    out: dict[str, Any] = {
        "type": "expectation",
        "family": family_name(exp.master.family),
        "protocol": proto_name(exp.tuple.proto),
        "protocol_number": exp.tuple.proto,
        "master": tuple_to_json(exp.master),
        "tuple": tuple_to_json(exp.tuple),
        "mask": tuple_to_json(exp.mask),
    }
    for name in ("timeout", "helper", "zone", "flags", "klass", "function"):
        field_value = getattr(exp, name)
        if field_value is not None:
            out["class" if name == "klass" else name] = field_value
    if exp.nat is not None:
        out["nat"] = {"direction": exp.nat.direction, "tuple": tuple_to_json(exp.nat.tuple)}
    return out
