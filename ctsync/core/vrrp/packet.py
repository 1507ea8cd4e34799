"""VRRP advertisements on the wire (RFC 3768 v2, RFC 5798 v3), as keepalived 2.2.7 sends them.

Pure codec: bytes in, :class:`Advert` out, or :class:`VrrpPacketError` (whatever the bytes).
The layout, checksums and receive checks follow ``reference/vrrp-keepalived.md`` §2-§6:

* v2 is IPv4 only and always carries 8 bytes of authentication data; its checksum is a
  plain Internet checksum over the message.
* v3/IPv4 sums a pseudo-header with the packet's destination (224.0.0.18, or the peer for
  unicast). keepalived up to 1.3.6 put 224.0.0.18 there even for unicast; 2.2.7 accepts
  that "old" form and then switches its own transmit form: :func:`decode_advert_ex` says
  which form matched so the runner can do the same.
* v3/IPv6 uses the standard IPv6 pseudo-header (the kernel fills and verifies it when the
  socket sets ``IPV6_CHECKSUM``; computing it here keeps the codec testable).

Decoding checks structure (exact length, version, type, checksum); :func:`check_advert`
then applies keepalived's per-instance checks, in keepalived's order, with its wording.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

VRRP_PROTO: Final = 112
MCAST_V4: Final = bytes((224, 0, 0, 18))
MCAST_V6: Final = bytes.fromhex("ff020000000000000000000000000012")
TOS: Final = 0xC0
TTL: Final = 255  # sent always; required on receive for multicast (RFC 3768/5798, C3)

ADVERTISEMENT: Final = 1  # the only VRRP packet type
HEADER_LEN: Final = 8
AUTH_LEN: Final = 8  # v2/IPv4 only
AUTH_NONE: Final = 0
AUTH_PASS: Final = 1
AUTH_AH: Final = 2
V3_MAX_INTERVAL_CS: Final = 0x0FFF  # 12-bit field
IPV4_HEADER_LEN: Final = 20

_PSEUDO_V4 = struct.Struct("!4s4sBBH")
_PSEUDO_V6 = struct.Struct("!16s16sI3xB")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")


class VrrpPacketError(ValueError):
    """An advert (or its IP packet) we refuse; ``reason`` is a short, stable counter name.

    Reasons: too-short, length, ip-header, version, type, checksum (decoding); vrid, ttl,
    auth-type, auth-pass, interval, count, addresses, multicast (:func:`check_advert`).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Advert:
    """One VRRP advertisement.

    ``interval_cs`` is the advert interval in centiseconds: v3's 12-bit field as is, v2's
    whole seconds times 100, so timers use one unit. ``addresses`` are packed (4 or 16
    bytes each), in packet order. ``auth_data`` is v2/IPv4's 8 bytes (b"" for v3).
    """

    version: int
    vrid: int
    priority: int
    interval_cs: int
    addresses: tuple[bytes, ...]
    auth_type: int = AUTH_NONE
    auth_data: bytes = b""

    @property
    def family(self) -> int:
        return 4 if len(self.addresses[0]) == 4 else 6


@dataclass(frozen=True)
class Expect:
    """What one instance accepts (built by the runner from its configuration).

    ``auth_data`` is the 8 bytes a v2 PASS advert must carry (the password NUL padded);
    ``multicast`` is False for a unicast instance (no TTL check, reference C3).
    """

    version: int
    vrid: int
    family: int
    addresses: frozenset[bytes]
    interval_cs: int
    auth_type: int = AUTH_NONE
    auth_data: bytes = bytes(AUTH_LEN)
    multicast: bool = True


def pass_auth_data(password: str) -> bytes:
    """The 8 auth bytes of a v2 PASS advert: keepalived NUL pads and truncates to 8."""
    return password.encode()[:AUTH_LEN].ljust(AUTH_LEN, b"\0")


# --- checksums ------------------------------------------------------------------------


def _sum16(data: bytes, acc: int = 0) -> int:
    """One's complement sum of 16-bit big-endian words (odd length padded with a zero)."""
    if len(data) % 2:
        data += b"\0"
    acc += sum(struct.unpack(f"!{len(data) // 2}H", data))
    while acc > 0xFFFF:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def internet_checksum(data: bytes, acc: int = 0) -> int:
    """RFC 1071 checksum of ``data`` (``acc``: a pseudo-header's partial sum)."""
    return ~_sum16(data, acc) & 0xFFFF


def _pseudo_sum(version: int, src: bytes, dst: bytes, length: int) -> int:
    """Partial sum of the pseudo-header the message's checksum covers (0 for v2/IPv4)."""
    if len(src) == 16:
        return _sum16(_PSEUDO_V6.pack(src, dst, length, VRRP_PROTO))
    if version == 2:
        return 0
    return _sum16(_PSEUDO_V4.pack(src, dst, 0, VRRP_PROTO, length))


def _checksum_ok(msg: bytes, version: int, src: bytes, dst: bytes) -> bool:
    return _sum16(msg, _pseudo_sum(version, src, dst, len(msg))) == 0xFFFF


def _check_pair(src: bytes, dst: bytes) -> int:
    if len(src) not in (4, 16) or len(dst) != len(src):
        raise ValueError("src and dst must both be packed IPv4 (4 bytes) or IPv6 (16 bytes)")
    return 4 if len(src) == 4 else 6


# --- the VRRP message -----------------------------------------------------------------


def encode_advert(adv: Advert, *, src: bytes, dst: bytes, old_checksum: bool = False) -> bytes:
    """The VRRP message (no IP header) with its checksum.

    ``src``/``dst`` are the packet's addresses (they enter the v3 and IPv6 pseudo-headers);
    ``old_checksum`` puts 224.0.0.18 in the v3/IPv4 pseudo-header whatever ``dst`` is (the
    pre-1.3.6 unicast form a peer may require). Invalid fields raise ValueError: they
    are the caller's bug, not a peer's packet.
    """
    family = _check_pair(src, dst)
    if not adv.addresses or len(adv.addresses) > 255:
        raise ValueError("an advert carries 1..255 addresses")
    size = 4 if family == 4 else 16
    if any(len(a) != size for a in adv.addresses):
        raise ValueError(f"addresses must all be IPv{family}")
    if not 1 <= adv.vrid <= 255 or not 0 <= adv.priority <= 255:
        raise ValueError("vrid must be 1..255 and priority 0..255")
    if adv.version == 2:
        if family != 4:
            raise ValueError("VRRPv2 is IPv4 only")
        seconds, rest = divmod(adv.interval_cs, 100)
        if rest or not 1 <= seconds <= 255:
            raise ValueError("a VRRPv2 interval is 1..255 whole seconds")
        if not 0 <= adv.auth_type <= 255 or len(adv.auth_data) > AUTH_LEN:
            raise ValueError("auth_type is one byte and auth_data at most 8 bytes")
        head = bytes((0x21, adv.vrid, adv.priority, len(adv.addresses), adv.auth_type, seconds))
        tail = adv.auth_data.ljust(AUTH_LEN, b"\0")
    elif adv.version == 3:
        if not 1 <= adv.interval_cs <= V3_MAX_INTERVAL_CS:
            raise ValueError("a VRRPv3 interval is 1..4095 centiseconds")
        head = bytes((0x31, adv.vrid, adv.priority, len(adv.addresses))) + struct.pack(
            "!H", adv.interval_cs
        )
        tail = b""
    else:
        raise ValueError(f"VRRP version {adv.version} is not 2 or 3")
    body = b"".join(adv.addresses) + tail
    length = HEADER_LEN + len(body)
    pseudo_dst = MCAST_V4 if old_checksum and family == 4 else dst
    acc = _pseudo_sum(adv.version, src, pseudo_dst, length)
    csum = internet_checksum(head + b"\0\0" + body, acc)
    return head + struct.pack("!H", csum) + body


def decode_advert(msg: bytes, *, src: bytes, dst: bytes) -> Advert:
    """Parse a VRRP message received from ``src`` for ``dst``, or raise VrrpPacketError."""
    return decode_advert_ex(msg, src=src, dst=dst)[0]


def decode_advert_ex(
    msg: bytes, *, src: bytes, dst: bytes, verify_ipv6_checksum: bool = True
) -> tuple[Advert, bool]:
    """Like :func:`decode_advert`, also saying whether the old v3/IPv4 checksum matched.

    The second value is True when the v3/IPv4 checksum only matched with 224.0.0.18 in
    the pseudo-header although the packet went elsewhere (keepalived's auto-detection:
    "Setting unicast VRRPv3 checksum to old version"; the runner then sends that form).
    ``verify_ipv6_checksum=False`` skips IPv6's check, which the kernel already made.
    """
    family = _check_pair(src, dst)
    if len(msg) < HEADER_LEN:
        raise VrrpPacketError("too-short", f"IPv{family} VRRP packet too short - {len(msg)} bytes")
    version, ptype = msg[0] >> 4, msg[0] & 0x0F
    if version not in (2, 3):
        raise VrrpPacketError("version", f"unsupported VRRP version {version}")
    if version == 2 and family == 6:
        # keepalived-only mode (reference §4): ctsync speaks v3 over IPv6.
        raise VrrpPacketError("version", "VRRPv2 over IPv6 is not supported")
    count = msg[3]
    size = 4 if family == 4 else 16
    expected = HEADER_LEN + count * size + (AUTH_LEN if version == 2 else 0)
    if len(msg) != expected:
        kind = "long" if len(msg) > expected else "short"
        raise VrrpPacketError(
            "length", f"vrrp packet too {kind}, length {len(msg)} and expect {expected}"
        )
    if ptype != ADVERTISEMENT:
        raise VrrpPacketError("type", f"Invalid packet type. {ptype} and expect {ADVERTISEMENT}")
    if count == 0:
        raise VrrpPacketError("count", "advert carries no address")
    old = False
    checked = family == 4 or verify_ipv6_checksum
    if checked and not _checksum_ok(msg, version, src, dst):
        # keepalived's auto-compat: a unicast v3/IPv4 advert summed with 224.0.0.18.
        old = version == 3 and family == 4 and dst != MCAST_V4
        if not (old and _checksum_ok(msg, 3, src, MCAST_V4)):
            raise VrrpPacketError("checksum", f"Invalid VRRPv{version} checksum")
    addresses = tuple(
        msg[HEADER_LEN + i * size : HEADER_LEN + (i + 1) * size] for i in range(count)
    )
    if version == 2:
        adv = Advert(
            version=2,
            vrid=msg[1],
            priority=msg[2],
            interval_cs=msg[5] * 100,
            addresses=addresses,
            auth_type=msg[4],
            auth_data=msg[-AUTH_LEN:],
        )
    else:
        adv = Advert(
            version=3,
            vrid=msg[1],
            priority=msg[2],
            interval_cs=struct.unpack_from("!H", msg, 4)[0] & V3_MAX_INTERVAL_CS,
            addresses=addresses,
        )
    return adv, old


# --- receive checks ---------------------------------------------------------------------


def _text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def check_advert(adv: Advert, expect: Expect, *, ttl: int | None, dst: bytes | None = None) -> None:
    """keepalived's per-instance receive checks (reference §6), in its order.

    ``ttl`` is the IPv4 TTL / IPv6 hop limit (None: unknown, not checked, as keepalived
    when the kernel gives none); ``dst``, when given, must be multicast exactly when the
    instance is (C14; normally the socket binding already guarantees it).
    """
    if adv.vrid != expect.vrid:  # D2: the dispatcher's business
        raise VrrpPacketError("vrid", f"Unknown VRID({adv.vrid}) received. ignoring...")
    if expect.multicast and ttl is not None and ttl != TTL:  # C3
        raise VrrpPacketError("ttl", f"invalid TTL/HL. Received {ttl} and expect {TTL}")
    if adv.version != expect.version:  # C4
        raise VrrpPacketError(
            "version", f"wrong version. Received {adv.version} and expect {expect.version}"
        )
    if adv.version == 2:
        if adv.auth_type not in (AUTH_NONE, AUTH_PASS, AUTH_AH):  # C5
            raise VrrpPacketError("auth-type", f"Invalid auth type: {adv.auth_type}")
        if adv.auth_type != expect.auth_type:  # C6
            raise VrrpPacketError(
                "auth-type",
                f"received a {adv.auth_type} auth, expecting {expect.auth_type}!",
            )
        if expect.auth_type == AUTH_PASS and not hmac.compare_digest(  # C7
            adv.auth_data, expect.auth_data
        ):
            raise VrrpPacketError("auth-pass", "received an invalid passwd!")
        if adv.interval_cs != expect.interval_cs:  # C9
            raise VrrpPacketError(
                "interval",
                f"advertisement interval mismatch mine={expect.interval_cs // 100} sec"
                f" rcv'd={adv.interval_cs // 100} sec",
            )
    elif adv.interval_cs == 0:
        # keepalived would take 0 and time out at once; no speaker sends it (min 1 cs).
        raise VrrpPacketError("interval", "advertisement interval 0 centi-sec")
    # C10 (type) is structural: decode_advert only returns advertisements.
    if dst is not None and _is_multicast(dst) != expect.multicast:  # C14
        want, got = ("mult", "un") if expect.multicast else ("un", "mult")
        raise VrrpPacketError(
            "multicast", f"Expected {want}icast packet but received {got}icast packet"
        )
    if len(adv.addresses) != len(expect.addresses):  # C11
        raise VrrpPacketError(
            "count",
            f"received an unexpected ip number count {len(adv.addresses)},"
            f" expected {len(expect.addresses)}!",
        )
    present = set(adv.addresses)
    for addr in sorted(expect.addresses):  # C15: every own VIP, in any order
        if addr not in present:
            raise VrrpPacketError(
                "addresses",
                f"ip address associated with VRID {expect.vrid} not present in MASTER"
                f" advert: {_text(addr)}",
            )


def _is_multicast(addr: bytes) -> bool:
    return addr[0] >> 4 == 0xE if len(addr) == 4 else addr[0] == 0xFF


# --- the IPv4 header (IP_HDRINCL) -----------------------------------------------------


def build_ipv4_header(
    *, src: bytes, dst: bytes, payload_len: int, ident: int, ttl: int = TTL
) -> bytes:
    """The 20-byte header keepalived builds: TOS 0xC0, no DF, protocol 112, checksummed."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses are 4 bytes")
    total = IPV4_HEADER_LEN + payload_len
    if total > 0xFFFF or not 0 <= ident <= 0xFFFF or not 0 <= ttl <= 255:
        raise ValueError("payload_len, ident or ttl out of range")
    header = _IPV4.pack(0x45, TOS, total, ident, 0, ttl, VRRP_PROTO, 0, src, dst)
    csum = internet_checksum(header)
    return header[:10] + struct.pack("!H", csum) + header[12:]


def parse_ipv4(packet: bytes) -> tuple[bytes, bytes, int, bytes]:
    """(src, dst, ttl, VRRP message) of a packet read from a raw IPv4 socket.

    The header's options are skipped (IHL); ``tot_len`` must equal what was received
    (C12: the kernel already strips Ethernet padding) and the protocol must be VRRP.
    """
    if len(packet) < IPV4_HEADER_LEN:
        raise VrrpPacketError("too-short", f"IPv4 VRRP packet too short - {len(packet)} bytes")
    ver_ihl, _tos, total, _id, _frag, ttl, proto, _csum, src, dst = _IPV4.unpack_from(packet)
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < IPV4_HEADER_LEN:
        raise VrrpPacketError("ip-header", f"not an IPv4 header (0x{ver_ihl:02x})")
    if len(packet) < ihl + HEADER_LEN:
        raise VrrpPacketError("too-short", f"IPv4 VRRP packet too short - {len(packet)} bytes")
    if total != len(packet):
        raise VrrpPacketError(
            "length",
            f"ip_tot_len mismatch against received length. {total} and received {len(packet)}",
        )
    if proto != VRRP_PROTO:
        raise VrrpPacketError("ip-header", f"IP protocol {proto} is not VRRP ({VRRP_PROTO})")
    return src, dst, ttl, packet[ihl:]


# --- timers (reference §5.1) ------------------------------------------------------------
# keepalived counts in integer microseconds (vrrp.h VRRP_TIMER_SKEW_CALC): v2's skew is
# (256-prio)/256 s whatever the interval; v3's is (256-prio)*interval/256, computed as
# (256-prio)*cs*625/16 µs to stay in 32 bits. The truncation is kept so our deadlines fall
# on the same microsecond as keepalived's (e.g. prio 100 @ 0.1 s: 60937 µs, not 60937.5).

DOWN_TIMER_ADVERTS: Final = 3


def skew_us(version: int, priority: int, interval_cs: int) -> int:
    """Skew_Time in µs for an effective ``priority`` and a Master_Adver_Interval in cs."""
    if version == 2:
        return (256 - priority) * 1_000_000 // 256
    return (256 - priority) * interval_cs * 625 // 16


def master_down_us(version: int, priority: int, interval_cs: int) -> int:
    """Master_Down_Interval in µs: 3 * Master_Adver_Interval + Skew_Time."""
    return DOWN_TIMER_ADVERTS * interval_cs * 10_000 + skew_us(version, priority, interval_cs)


def skew(version: int, priority: int, interval_cs: int) -> float:
    """Skew_Time in seconds (prio 100: 0.609375 s at 1 s for v2 and v3, 0.060937 at 0.1 s)."""
    return skew_us(version, priority, interval_cs) / 1_000_000


def master_down(version: int, priority: int, interval_cs: int) -> float:
    """Master_Down_Interval in seconds (prio 100 @ 1 s: 3.609375)."""
    return master_down_us(version, priority, interval_cs) / 1_000_000
