"""Raw VRRP sockets: one per (interface, family, multicast or unicast source), as keepalived.

Sending (reference §1-§3):

* IPv4 uses ``IP_HDRINCL``: the header is ours (core ``build_ipv4_header``: TTL 255, TOS
  0xC0, an IP id counting from 1 and skipping 0), the source is the interface's primary
  address (or ``unicast_src``), never a virtual address.
* IPv6 lets the kernel build the header: hop limit 255, traffic class 0xC0, the checksum
  at VRRP offset 6 (``IPV6_CHECKSUM``), the link-local source and the interface given per
  packet in an ``IPV6_PKTINFO`` control message.

Receiving (reference §6, D5/D6/D8): the socket is bound to its device; a multicast socket
joins the VRRP group on that interface only and, for IPv4, is bound to the group, so
unicast VRRP never reaches it; a unicast socket is bound to its own source address, so
multicast never reaches it. Our own multicast is not looped back, and groups other
sockets joined are not delivered (``IP_MULTICAST_ALL`` 0). The TTL / hop limit and the
destination of every packet are handed up with it: the checks belong to the core.

Errors never reach the event loop: a packet that cannot be parsed, a failed send or a
failed receive is counted (and logged once per kind and minute); the caller gets no
exception after :meth:`VrrpChannel.open`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ctsync.core.vrrp.packet import (
    MCAST_V4,
    MCAST_V6,
    VRRP_PROTO,
    VrrpPacketError,
    build_ipv4_header,
    parse_ipv4,
)

log = logging.getLogger("ctsync.vrrp")

# Not (all) exported by the socket module.
IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29
_TOS_INTERNETCONTROL = 0xC0
_HOPS = 255
_VRRP_CHECKSUM_OFFSET = 6
_RECV_BURST = 64  # packets handled per wakeup, so one busy socket cannot starve the loop
_MAX_PACKET = 65535
_LOG_EVERY = 60.0  # seconds between two log lines of the same kind

#: A send that fails with one of these is an interface problem, not ours (counted).
_LINK_ERRNOS = frozenset(
    {errno.ENETDOWN, errno.ENODEV, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.ENXIO}
)


class VrrpSocketError(Exception):
    """A channel cannot be opened (no raw sockets, no such interface, no source address...)."""


def check_raw_socket(family: int) -> None:
    """Raise :class:`VrrpSocketError` if this process cannot open a raw VRRP socket.

    The speaker opens its channels only once their interface and source address exist,
    which may be long after the start; a missing privilege must not wait that long.
    """
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    try:
        socket.socket(af, socket.SOCK_RAW, VRRP_PROTO).close()
    except OSError as exc:
        raise VrrpSocketError(f"raw IPv{family} VRRP socket: {exc.strerror or exc}") from exc


@dataclass(frozen=True, slots=True)
class Received:
    """One VRRP packet as the network delivered it.

    ``message`` starts at the VRRP header; ``ttl`` is the IPv4 TTL or IPv6 hop limit
    (None if the kernel did not say); ``src``/``dst`` are packed addresses.
    """

    src: bytes
    dst: bytes
    ttl: int | None
    message: bytes


#: on_packet(channel, packet)
PacketHandler = Callable[["VrrpChannel", Received], None]


@dataclass(frozen=True, slots=True)
class ChannelKey:
    """What makes two instances share a socket (keepalived's socket pool key).

    ``unicast_src`` is the packed source address of a unicast channel, None for multicast.
    """

    interface: str
    family: int  # 4 or 6
    unicast_src: bytes | None = None


class RateLimitedLog:
    """At most one line per key and :data:`_LOG_EVERY` seconds; says how many it held back."""

    def __init__(self, logger: logging.Logger, every: float = _LOG_EVERY) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[object, float] = {}
        self._held: Counter[object] = Counter()

    def __call__(
        self, level: int, key: object, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] += 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (%d more like this since the last report)"
            args = (*args, held)
        self.logger.log(level, msg, *args, exc_info=exc_info)


def _text(family: int, addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, addr)


class VrrpChannel:
    """One raw VRRP socket: sends adverts from ``source`` and hands up what arrives.

    Open it in the network namespace it must live in (the socket keeps that namespace).
    ``source`` is packed (4 or 16 bytes); for a multicast channel the destination of every
    advert is the VRRP group, for a unicast one each configured peer in turn (the caller
    encodes one message per peer: the v3 IPv4 checksum covers the destination).
    """

    def __init__(
        self, key: ChannelKey, *, ifindex: int, source: bytes, on_packet: PacketHandler
    ) -> None:
        if key.family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {key.family}")
        if len(source) != (4 if key.family == 4 else 16):
            raise ValueError("source address does not match the family")
        self.key = key
        self.ifindex = ifindex
        self.source = source
        self.on_packet = on_packet
        self.sock: socket.socket | None = None
        self._ident = 0
        self._reading = False
        self.sent = 0
        self.send_errors = 0
        self.received = 0
        self.receive_errors = 0
        self.malformed: Counter[str] = Counter()
        self._log = RateLimitedLog(log)

    @property
    def multicast(self) -> bool:
        return self.key.unicast_src is None

    @property
    def family(self) -> int:
        return self.key.family

    @property
    def group(self) -> bytes:
        return MCAST_V4 if self.family == 4 else MCAST_V6

    def describe(self) -> str:
        mode = "multicast" if self.multicast else f"unicast from {_text(self.family, self.source)}"
        return f"{self.key.interface} IPv{self.family} {mode}"

    # --- lifecycle --------------------------------------------------------------------

    def open(self) -> None:
        """Create and configure the socket (raises :class:`VrrpSocketError`)."""
        if self.sock is not None:
            return
        af = socket.AF_INET if self.family == 4 else socket.AF_INET6
        try:
            sock = socket.socket(af, socket.SOCK_RAW | socket.SOCK_NONBLOCK, VRRP_PROTO)
        except OSError as exc:
            raise VrrpSocketError(f"{self.describe()}: raw socket: {exc.strerror}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.key.interface.encode())
            if self.family == 4:
                self._setup_v4(sock)
            else:
                self._setup_v6(sock)
        except OSError as exc:
            sock.close()
            raise VrrpSocketError(f"{self.describe()}: {exc.strerror or exc}") from exc
        self.sock = sock

    def _setup_v4(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, _HOPS)
        # struct ip_mreqn: the interface by index, whatever its addresses.
        mreqn = struct.pack("=4s4si", MCAST_V4, b"\0\0\0\0", self.ifindex)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
        if self.multicast:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            sock.bind((_text(4, MCAST_V4), 0))  # D5: unicast VRRP never reaches this socket
        else:
            sock.bind((_text(4, self.source), 0))  # D6: nor multicast this one

    def _setup_v6(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, _VRRP_CHECKSUM_OFFSET)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, _HOPS)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, _HOPS)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _TOS_INTERNETCONTROL)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self.ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if self.multicast:
            mreq = struct.pack("=16sI", MCAST_V6, self.ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            sock.bind(self._sockaddr6(self.source))

    def _sockaddr6(self, addr: bytes) -> tuple[str, int, int, int]:
        # Link-local and link-scope multicast addresses need the interface as scope.
        ip = ipaddress.IPv6Address(addr)
        scoped = ip.is_link_local or (ip.is_multicast and (addr[1] & 0x0F) <= 2)
        return (str(ip), 0, 0, self.ifindex if scoped else 0)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start handing received packets to ``on_packet`` (opens the socket if needed)."""
        self.open()
        assert self.sock is not None
        if not self._reading:
            (loop or asyncio.get_running_loop()).add_reader(self.sock.fileno(), self._readable)
            self._reading = True

    def adopt_counters(self, old: VrrpChannel) -> None:
        """Carry the counters of the channel this one replaces (same interface, reopened)."""
        self.sent += old.sent
        self.send_errors += old.send_errors
        self.received += old.received
        self.receive_errors += old.receive_errors
        self.malformed.update(old.malformed)
        self._ident = old._ident

    def close(self) -> None:
        if self.sock is None:
            return
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()
        self.sock = None

    # --- sending ----------------------------------------------------------------------

    def next_ident(self) -> int:
        """keepalived's IP id: 1, 2, ... 65535, 1 (0 skipped)."""
        self._ident = self._ident % 0xFFFF + 1
        return self._ident

    def send(self, message: bytes, dst: bytes | None = None) -> bool:
        """Send one VRRP message to *dst* (default: the group); False (counted) on failure."""
        sock = self.sock
        if sock is None:
            self.send_errors += 1
            return False
        target = self.group if dst is None else dst
        try:
            if self.family == 4:
                header = build_ipv4_header(
                    src=self.source, dst=target, payload_len=len(message), ident=self.next_ident()
                )
                sock.sendto(header + message, (_text(4, target), 0))
            else:
                pktinfo = struct.pack("=16sI", self.source, self.ifindex)
                sock.sendmsg(
                    [message],
                    [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)],
                    0,
                    self._sockaddr6(target),
                )
        except OSError as exc:
            self.send_errors += 1
            kind = "link" if exc.errno in _LINK_ERRNOS else "other"
            self._log(
                logging.WARNING,
                ("send", kind),
                "VRRP %s: send to %s failed: %s",
                self.describe(),
                _text(self.family, target),
                exc.strerror or exc,
            )
            return False
        self.sent += 1
        return True

    # --- receiving --------------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(_RECV_BURST):
            try:
                packet = self._recv_one()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.receive_errors += 1
                self._log(
                    logging.WARNING,
                    "recv",
                    "VRRP %s: receive failed: %s",
                    self.describe(),
                    exc.strerror or exc,
                )
                return
            if packet is None:
                continue
            self.received += 1
            try:
                self.on_packet(self, packet)
            except Exception:
                # The handler is the speaker's; a bug there must not stop the socket.
                self._log(
                    logging.ERROR,
                    "handler",
                    "VRRP %s: packet handler failed",
                    self.describe(),
                    exc_info=True,
                )

    def _recv_one(self) -> Received | None:
        """One packet off the socket, or None (counted) if it is not usable."""
        assert self.sock is not None
        if self.family == 4:
            data = self.sock.recv(_MAX_PACKET)
            try:
                src, dst, ttl, payload = parse_ipv4(data)
            except VrrpPacketError as exc:
                self._malformed(exc.reason)
                return None
            return Received(src=src, dst=dst, ttl=ttl, message=bytes(payload))
        data, ancdata, _flags, addr = self.sock.recvmsg(_MAX_PACKET, 256)
        hops: int | None = None
        dst6: bytes | None = None
        for level, kind, value in ancdata:
            if level != socket.IPPROTO_IPV6:
                continue
            if kind == socket.IPV6_HOPLIMIT and len(value) >= 4:
                (hops,) = struct.unpack("=i", value[:4])
            elif kind == socket.IPV6_PKTINFO and len(value) >= 20:
                dst6 = bytes(value[:16])
        try:
            src6 = socket.inet_pton(socket.AF_INET6, str(addr[0]).split("%", 1)[0])
        except (OSError, IndexError, ValueError):
            self._malformed("bad_source")
            return None
        if dst6 is None:
            self._malformed("no_destination")
            return None
        if self.multicast and dst6 != MCAST_V6:
            # D4: a unicast packet on a multicast channel (the socket is not bound).
            self._malformed("not_multicast")
            return None
        return Received(src=src6, dst=dst6, ttl=hops, message=bytes(data))

    def _malformed(self, reason: str) -> None:
        self.malformed[reason] += 1
        self._log(
            logging.INFO,
            ("malformed", reason),
            "VRRP %s: dropped a packet: %s",
            self.describe(),
            reason,
        )

    def stats(self) -> dict[str, object]:
        return {
            "channel": self.describe(),
            "source": _text(self.family, self.source),
            "sent": self.sent,
            "send_errors": self.send_errors,
            "received": self.received,
            "receive_errors": self.receive_errors,
            "malformed": dict(self.malformed),
        }
