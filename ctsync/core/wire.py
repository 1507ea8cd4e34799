"""The sync wire format: msgpack datagrams with a keyed MAC.

Every datagram is ``body || mac``:

- ``body`` is one msgpack array ``[version, type, node, epoch, packet, payload]``:
  ``node`` the sender's node id, ``epoch`` its boot epoch (milliseconds since 1970 when it
  started: a restart always moves it forward), ``packet`` a per-epoch counter that grows by
  one per datagram (the replay window works on it), ``payload`` depends on ``type``;
- ``mac`` is 16 bytes of keyed BLAKE2b over ``body`` with the pre-shared key.

Entries travel as the compact cache records (``ctsync.core.record``): ``[key, value]``
pairs of bytes, so the receiver stores them as they are, and a resend re-reads the
sender's cache (the current state, never stale bytes).

:func:`decode` either returns a :class:`Datagram` or raises :class:`WireError` — never
anything else, whatever the bytes (fuzz-tested). Authentication is checked before the
body is parsed, so unauthenticated bytes never reach msgpack.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import msgpack

VERSION: Final = 1
MAC_SIZE: Final = 16
MIN_KEY_SIZE: Final = 32
# UDP payload that fits a 1500-byte MTU over IPv6 without fragmentation (1500-40-8).
DEFAULT_MAX_DATAGRAM: Final = 1452


class WireError(ValueError):
    """A datagram we refuse: malformed, unauthenticated, or of an unknown version."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # a short counter name: malformed, auth, version, type


class MsgType(IntEnum):
    HELLO = 1  # [nonce, echoes: [[node, epoch, nonce]...], caps]: proves a (node, epoch) is live
    ALIVE = 2  # [next_data_seq]: heartbeat; lets receivers see a lost tail
    DATA = 3  # [data_seq, flags, updates: [[key, value]...], destroys: [key...]]
    ACK = 4  # [target_node, target_epoch, acked_upto, nack_ranges: [[first, last]...]]
    RESYNC = 5  # [target_node]: please send me your whole internal cache
    DIGEST = 6  # [data_seq, buckets: [crc32 per bucket]]: anti-entropy, as of data_seq
    REPAIR = 7  # [target_node, target_epoch, bucket ids]: please resend these buckets
    GONE = 8  # [target_node, target_epoch, first, last]: those data seqs cannot be resent


# DATA flags
DATA_BULK_BEGIN: Final = 0x01  # receiver: a full transfer starts (mark everything)
DATA_BULK_END: Final = 0x02  # receiver: the full transfer ended (sweep what was not sent)
DATA_REPAIR: Final = 0x04  # carries whole buckets; ``destroys`` then lists bucket ids
DATA_RESEND: Final = 0x08  # a resend (for statistics only)


@dataclass(frozen=True, slots=True)
class Datagram:
    type: MsgType
    node: int
    epoch: int
    packet: int
    payload: list[Any]


class Authenticator:
    """Keyed BLAKE2b (RFC 7693 keyed mode) over each datagram body.

    ``key=None`` is the explicit unauthenticated opt-out: datagrams then carry a zero MAC
    and every datagram is accepted (the agent warns about it at start).
    """

    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) < MIN_KEY_SIZE:
            raise ValueError(f"the sync key must have at least {MIN_KEY_SIZE} bytes")
        # BLAKE2b keys are at most 64 bytes: longer key material is hashed down first.
        self._key = hashlib.blake2b(key).digest() if key and len(key) > 64 else key
        # The keyed state after the key block, copied per datagram: the same MAC as
        # blake2b(body, key=key) without compressing the key block every time.
        self._keyed = (
            None if self._key is None else hashlib.blake2b(key=self._key, digest_size=MAC_SIZE)
        )

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def sign(self, body: bytes) -> bytes:
        if self._keyed is None:
            return bytes(MAC_SIZE)
        h = self._keyed.copy()
        h.update(body)
        return h.digest()

    def verify(self, body: bytes | memoryview, mac: bytes | memoryview) -> bool:
        if self._keyed is None:
            return True
        h = self._keyed.copy()
        h.update(body)
        return hmac.compare_digest(h.digest(), bytes(mac))


def encode(auth: Authenticator, mtype: MsgType, node: int, epoch: int, packet: int,
           payload: list[Any]) -> bytes:  # fmt: skip
    body: bytes = msgpack.packb(
        [VERSION, int(mtype), node, epoch, packet, payload], use_bin_type=True
    )
    return body + auth.sign(body)


class Encoder:
    """:func:`encode` for one sender, with a reused msgpack ``Packer`` (the same bytes as
    ``packb``, without building a packer per datagram). Not thread-safe: one per session."""

    def __init__(self, auth: Authenticator) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._sign = auth.sign

    def encode(
        self, mtype: MsgType, node: int, epoch: int, packet: int, payload: list[Any]
    ) -> bytes:
        body: bytes = self._pack([VERSION, int(mtype), node, epoch, packet, payload])
        return body + self._sign(body)


_MAX_UINT = (1 << 64) - 1
_SHAPES: Final[dict[MsgType, tuple[type | tuple[type, ...], ...]]] = {
    MsgType.HELLO: (bytes, list, dict),
    MsgType.ALIVE: (int,),
    MsgType.DATA: (int, int, list, list),
    MsgType.ACK: (int, int, int, list),
    MsgType.RESYNC: (int,),
    MsgType.DIGEST: (int, list),
    MsgType.REPAIR: (int, int, list),
    MsgType.GONE: (int, int, int, int),
}


def decode(auth: Authenticator, data: bytes) -> Datagram:
    """Authenticate and parse one datagram. Raises WireError (with ``reason``) otherwise."""
    if len(data) <= MAC_SIZE:
        raise WireError("malformed", f"datagram of {len(data)} bytes is too short")
    body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not auth.verify(body, mac):
        raise WireError("auth", "MAC does not match")
    try:
        # unpackb bounds every str/bin/array/map length by len(body) by default.
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several types; all mean "malformed"
        raise WireError("malformed", f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, list) or len(obj) != 6:
        raise WireError("malformed", "header is not a 6-element array")
    version, mtype, node, epoch, packet, payload = obj
    if version != VERSION:
        raise WireError("version", f"protocol version {version!r}, we speak {VERSION}")
    for name, value in (("type", mtype), ("node", node), ("epoch", epoch), ("packet", packet)):
        if type(value) is not int or not 0 <= value <= _MAX_UINT:
            raise WireError("malformed", f"header field {name} is not an unsigned integer")
    try:
        kind = MsgType(mtype)
    except ValueError:
        raise WireError("type", f"unknown message type {mtype}") from None
    shape = _SHAPES[kind]
    if not isinstance(payload, list) or len(payload) != len(shape):
        raise WireError("malformed", f"{kind.name} payload has the wrong length")
    for value, want in zip(payload, shape, strict=True):
        if not isinstance(value, want) or (type(value) is bool):
            raise WireError("malformed", f"{kind.name} payload field of the wrong type")
    if kind is MsgType.DATA:
        _check_data(payload)
    elif kind in (MsgType.DIGEST, MsgType.REPAIR):
        ints = payload[1] if kind is MsgType.DIGEST else payload[2]
        if not all(type(v) is int and 0 <= v <= 0xFFFFFFFF for v in ints):
            raise WireError("malformed", f"{kind.name} list holds a non-u32")
    elif kind is MsgType.HELLO:
        for item in payload[1]:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and all(type(v) is int and 0 <= v <= _MAX_UINT for v in item[:2])
                and isinstance(item[2], bytes)
            ):
                raise WireError("malformed", "HELLO echo is not [node, epoch, nonce]")
    elif kind is MsgType.ACK:
        for item in payload[3]:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and all(type(v) is int and v >= 0 for v in item)
            ):
                raise WireError("malformed", "ACK nack range is not [first, last]")
    return Datagram(kind, node, epoch, packet, payload)


def _check_data(payload: list[Any]) -> None:
    _seq, flags, updates, destroys = payload
    for item in updates:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], bytes)
            and isinstance(item[1], bytes)
            and item[0]
        ):
            raise WireError("malformed", "DATA update is not [key, value]")
    if flags & DATA_REPAIR:
        if not all(type(b) is int and 0 <= b <= 0xFFFFFFFF for b in destroys):
            raise WireError("malformed", "DATA repair bucket id is not a u32")
    elif not all(isinstance(k, bytes) and k for k in destroys):
        raise WireError("malformed", "DATA destroy is not a key")


class ReplayWindow:
    """Accept each (epoch, packet) once: a 64-packet sliding window per sender epoch.

    A packet older than the window, or seen before, is a replay (or a duplicate, which the
    network may make: either way it must not be applied twice). An older epoch is refused.
    """

    SIZE: Final = 64

    def __init__(self) -> None:
        self.epoch = -1
        self._top = -1
        self._bits = 0

    def check(self, epoch: int, packet: int) -> bool:
        """True (and remembered) if (epoch, packet) is new."""
        if epoch < self.epoch:
            return False
        if epoch > self.epoch:
            self.epoch, self._top, self._bits = epoch, packet, 1
            return True
        if packet > self._top:
            shift = packet - self._top
            # A jump past the window clears it (never build a `shift`-bit integer).
            bits = self._bits << shift if shift < self.SIZE else 0
            self._bits = (bits | 1) & ((1 << self.SIZE) - 1)
            self._top = packet
            return True
        offset = self._top - packet
        if offset >= self.SIZE or self._bits >> offset & 1:
            return False
        self._bits |= 1 << offset
        return True


def entry_size(key: bytes, value: bytes) -> int:
    """An upper bound of the msgpack bytes one [key, value] pair adds to a DATA list."""
    return len(key) + len(value) + 7


# A DATA datagram's fixed part: header, data seq, flags, list headers, MAC.
DATA_OVERHEAD: Final = 64
