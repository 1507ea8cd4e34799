"""Virtual addresses and what goes with them: add/remove, announce, link state.

* Addresses go through rtnetlink (pyroute2's ``AsyncIPRoute``: the synchronous ``IPRoute``
  runs its own event loop and cannot be used inside the agent's). Adding and removing are
  idempotent: an address already there (EEXIST) or already gone (EADDRNOTAVAIL) is fine.
  IPv6 addresses are added with ``IFA_F_NODAD`` so they are usable at once: a new master
  that waited for duplicate address detection would drop the traffic it just took over.
* Gratuitous ARP exactly as keepalived sends it (reference §4.3): an ARP *request*,
  Ethernet broadcast, sender and target IP the VIP, target MAC ff:ff:ff:ff:ff:ff.
* Unsolicited neighbour advertisement as keepalived's: from the VIP to ff02::1, hop limit
  255, Override set, Router set when the interface forwards IPv6, with the target
  link-layer address option.
* Link state: rtnetlink link events (``RTMGRP_LINK``) on a plain netlink socket read by
  the event loop; an interface is up when it is ``IFF_UP`` and ``IFF_RUNNING`` (keepalived's
  rule), and the callback runs only when that changes. The same socket can report that
  addresses changed (``RTMGRP_IPV4_IFADDR`` / ``RTMGRP_IPV6_IFADDR``): the speaker waits
  for the address it sends from, which may come after the agent started.

Everything acts on the network namespace the process (or the thread that opens the
socket) is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("ctsync.vrrp")

IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
_IFF_UP = 0x1
_IFF_RUNNING = 0x40
_SIOCGIFFLAGS = 0x8913
_IFREQ_SIZE = 40

_ETH_P_ARP = 0x0806
_ETH_P_IP = 0x0800
_BROADCAST_MAC = b"\xff" * 6
_ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
_ND_NEIGHBOR_ADVERT = 136
_NA_FLAG_ROUTER = 0x80
_NA_FLAG_OVERRIDE = 0x20
_ND_OPT_TARGET_LL = 2

_RTMGRP_LINK = 0x1
_RTMGRP_IPV4_IFADDR = 0x10
_RTMGRP_IPV6_IFADDR = 0x100
_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_RTM_NEWADDR = 20
_RTM_DELADDR = 21
_NLMSG_HDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFLA_IFNAME = 3
_NLMSG_ERROR = 2
_NLMSG_OVERRUN = 4


class AddressError(Exception):
    """An address operation failed for a reason other than 'already done'."""


@dataclass(frozen=True, slots=True)
class Vip:
    """A virtual address: packed address, prefix length and IP version."""

    address: bytes
    prefixlen: int
    family: int

    @classmethod
    def parse(cls, text: str) -> Vip:
        """``"192.0.2.100/24"``; without a prefix the address alone (/32 or /128)."""
        iface = ipaddress.ip_interface(text)
        return cls(iface.ip.packed, iface.network.prefixlen, iface.version)

    @property
    def text(self) -> str:
        return str(ipaddress.ip_address(self.address))

    def __str__(self) -> str:
        return f"{self.text}/{self.prefixlen}"


def _af(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _strerror(code: object) -> str:
    return os.strerror(code) if isinstance(code, int) else str(code)


def _flags(msg: Any) -> int:
    value = msg.get("IFA_FLAGS")
    return int(value if value is not None else msg["flags"])


def usable(flags: int) -> bool:
    """An address packets can be sent from: not failed, and past DAD (or optimistic);
    the kernel refuses a tentative IPv6 source (EINVAL), as keepalived's log shows."""
    if flags & IFA_F_DADFAILED:
        return False
    return not flags & IFA_F_TENTATIVE or bool(flags & IFA_F_OPTIMISTIC)


class Addresses:
    """rtnetlink access for the speaker: interface lookups and virtual addresses.

    ``await open()`` in the namespace to act on, ``await close()`` at the end.
    """

    def __init__(self) -> None:
        self._ipr: Any = None

    async def open(self) -> None:
        if self._ipr is None:
            ipr = AsyncIPRoute()
            await ipr.setup_endpoint()
            self._ipr = ipr

    async def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            with contextlib.suppress(Exception):
                ipr.close()

    def _need(self) -> Any:
        if self._ipr is None:
            raise AddressError("rtnetlink socket is not open")
        return self._ipr

    async def ifindex(self, ifname: str) -> int | None:
        found = await self._need().link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    async def list(self, ifindex: int | None, family: int) -> list[tuple[bytes, int, int]]:
        """``(packed address, prefixlen, flags)`` of the interface (None: of every
        interface), in kernel order."""
        out = []
        kwargs: dict[str, Any] = {} if ifindex is None else {"index": ifindex}
        async for msg in await self._need().addr("dump", family=_af(family), **kwargs):
            text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            if text is None or (ifindex is not None and msg["index"] != ifindex):
                continue
            out.append((socket.inet_pton(_af(family), text), int(msg["prefixlen"]), _flags(msg)))
        return out

    async def primary_ipv4(self, ifindex: int, exclude: Iterable[bytes] = ()) -> bytes | None:
        """The interface's primary IPv4 address (first non-secondary), never a VIP."""
        skip = set(exclude)
        for addr, _plen, flags in await self.list(ifindex, 4):
            if not flags & IFA_F_SECONDARY and addr not in skip:
                return addr
        return None

    async def link_local(self, ifindex: int) -> bytes | None:
        """The interface's first usable link-local IPv6 address (None while DAD runs)."""
        for addr, _plen, flags in await self.list(ifindex, 6):
            if addr[:2] == b"\xfe\x80" and usable(flags):
                return addr
        return None

    async def present(self, address: bytes, ifindex: int | None = None) -> bool:
        """Whether *address* is a usable address of the interface (None: of the host)."""
        family = 4 if len(address) == 4 else 6
        return any(
            addr == address and usable(flags)
            for addr, _plen, flags in await self.list(ifindex, family)
        )

    async def has(self, ifindex: int, vip: Vip) -> bool:
        return any(addr == vip.address for addr, _p, _f in await self.list(ifindex, vip.family))

    async def add(self, ifindex: int, vip: Vip) -> bool:
        """Add *vip*; True if it was added, False if it was already there."""
        kwargs: dict[str, Any] = {}
        if vip.family == 6:
            kwargs["flags"] = IFA_F_NODAD
        try:
            await self._need().addr(
                "add", index=ifindex, address=vip.text, prefixlen=vip.prefixlen, **kwargs
            )
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise AddressError(f"add {vip}: {_strerror(exc.code)}") from exc
        return True

    async def remove(self, ifindex: int, vip: Vip) -> bool:
        """Remove *vip*; True if it was removed, False if it was not there."""
        try:
            await self._need().addr("del", index=ifindex, address=vip.text, prefixlen=vip.prefixlen)
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                return False
            raise AddressError(f"remove {vip}: {_strerror(exc.code)}") from exc
        return True


# --------------------------------------------------------------------------- announcements


def interface_mac(sock: socket.socket) -> bytes:
    """The hardware address of the interface an AF_PACKET socket is bound to."""
    return bytes(sock.getsockname()[4])[:6]


def garp_frame(mac: bytes, address: bytes) -> bytes:
    """keepalived's gratuitous ARP: a broadcast request for *address* from *address*."""
    eth = _BROADCAST_MAC + mac + struct.pack("!H", _ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, _ETH_P_IP, 6, 4, 1)
    return eth + arp + mac + address + _BROADCAST_MAC + address


def send_garp(ifname: str, addresses: Iterable[bytes], count: int) -> int:
    """*count* gratuitous ARPs for each address, back to back; returns how many went out."""
    sent = 0
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK)
    except OSError as exc:
        log.warning("gratuitous ARP on %s: %s", ifname, exc.strerror or exc)
        return 0
    with sock:
        try:
            sock.bind((ifname, _ETH_P_ARP))
            mac = interface_mac(sock)
            for address in addresses:
                frame = garp_frame(mac, address)
                for _ in range(count):
                    sock.send(frame)
                    sent += 1
        except OSError as exc:
            log.warning("gratuitous ARP on %s: %s", ifname, exc.strerror or exc)
    return sent


def na_message(address: bytes, mac: bytes, *, router: bool) -> bytes:
    """Unsolicited NA for *address* (the kernel fills the ICMPv6 checksum)."""
    flags = _NA_FLAG_OVERRIDE | (_NA_FLAG_ROUTER if router else 0)
    head = struct.pack("!BBHB3x", _ND_NEIGHBOR_ADVERT, 0, 0, flags)
    option = struct.pack("!BB", _ND_OPT_TARGET_LL, 1) + mac
    return head + address + option


def ipv6_forwarding(ifname: str) -> bool:
    """Whether the interface forwards IPv6 (then NAs carry the Router flag, as keepalived's)."""
    path = Path("/proc/sys/net/ipv6/conf") / ifname / "forwarding"
    try:
        return path.read_text().strip() not in ("", "0")
    except OSError:
        return False


def send_unsolicited_na(ifname: str, ifindex: int, addresses: Iterable[bytes], count: int) -> int:
    """*count* unsolicited NAs for each address (source: the address itself)."""
    sent = 0
    router = ipv6_forwarding(ifname)
    try:
        packet = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK)
        icmp = socket.socket(
            socket.AF_INET6, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.IPPROTO_ICMPV6
        )
    except OSError as exc:
        log.warning("unsolicited NA on %s: %s", ifname, exc.strerror or exc)
        return 0
    with packet, icmp:
        try:
            packet.bind((ifname, 0))
            mac = interface_mac(packet)
            icmp.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            icmp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
            dst = (socket.inet_ntop(socket.AF_INET6, _ALL_NODES), 0, 0, ifindex)
            for address in addresses:
                message = na_message(address, mac, router=router)
                pktinfo = struct.pack("=16sI", address, ifindex)
                cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)]
                for _ in range(count):
                    icmp.sendmsg([message], cmsg, 0, dst)
                    sent += 1
        except OSError as exc:
            log.warning("unsolicited NA on %s: %s", ifname, exc.strerror or exc)
    return sent


# --------------------------------------------------------------------------- link state


def link_is_up(ifname: str) -> bool | None:
    """UP and RUNNING (keepalived's test); None if there is no such interface."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            ifreq = struct.pack("16sH", ifname.encode()[:15], 0).ljust(_IFREQ_SIZE, b"\0")
            result = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, ifreq)
    except OSError:
        return None
    (flags,) = struct.unpack_from("H", result, 16)
    return bool(flags & _IFF_UP and flags & _IFF_RUNNING)


#: on_link(ifname, up)
LinkHandler = Callable[[str, bool], None]


class LinkWatcher:
    """Calls ``on_link(ifname, up)`` when a watched interface goes up or down, and
    ``on_addresses()`` (if given) when any address of the host was added or removed.

    Reads rtnetlink events from the event loop; after an overrun (ENOBUFS: events were
    lost) it re-reads every watched interface's flags instead, and reports the addresses
    as changed (the receiver reads them itself: the events only say "look again").
    """

    def __init__(
        self,
        interfaces: Iterable[str],
        on_link: LinkHandler,
        on_addresses: Callable[[], None] | None = None,
    ) -> None:
        self.on_link = on_link
        self.on_addresses = on_addresses
        self.state: dict[str, bool] = {}
        # ifindex -> watched name: an interface renamed or moved to another namespace
        # (how `docker network disconnect` takes it away) is reported under its old index
        # with another name, or deleted, and must count as down.
        self.index: dict[int, str] = {}
        for ifname in interfaces:
            self.state[ifname] = bool(link_is_up(ifname))
            with contextlib.suppress(OSError):
                self.index[socket.if_nametoindex(ifname)] = ifname
        self.sock: socket.socket | None = None
        self.events = 0
        self.overruns = 0

    def start(self) -> None:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.NETLINK_ROUTE
        )
        groups = _RTMGRP_LINK
        if self.on_addresses is not None:
            groups |= _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, groups))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        self.rescan()  # anything that changed between __init__ and the subscription

    def close(self) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None

    def _set(self, ifname: str, up: bool) -> None:
        if ifname not in self.state or self.state[ifname] == up:
            return
        self.state[ifname] = up
        try:
            self.on_link(ifname, up)
        except Exception:
            log.exception("link handler failed for %s", ifname)

    def rescan(self) -> None:
        for ifname in list(self.state):
            self._set(ifname, bool(link_is_up(ifname)))

    def _addresses_changed(self) -> None:
        if self.on_addresses is None:
            return
        try:
            self.on_addresses()
        except Exception:
            log.exception("address handler failed")

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    log.warning("link events were lost (ENOBUFS); re-reading link states")
                    self.rescan()
                    self._addresses_changed()
                    continue
                log.warning("link events: %s", exc.strerror or exc)
                return
            if self.on_addresses is not None and has_address_events(data):
                self.events += 1
                self._addresses_changed()
            for index, ifname, up in parse_link_events(data):
                self.events += 1
                old = self.index.get(index)
                if old is not None and old != ifname:  # renamed away, or moved out
                    del self.index[index]
                    self._set(old, False)
                if ifname in self.state:
                    if up:
                        self.index[index] = ifname
                    self._set(ifname, up)


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(type, body offset, end)`` of each whole netlink message in a datagram."""
    off = 0
    while off + _NLMSG_HDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data, off)
        if length < _NLMSG_HDR.size or off + length > len(data):
            return
        yield kind, off + _NLMSG_HDR.size, off + length
        off += (length + 3) & ~3


def parse_link_events(data: bytes) -> list[tuple[int, str, bool]]:
    """``(ifindex, ifname, up)`` of each RTM_NEWLINK / RTM_DELLINK in a netlink datagram."""
    out: list[tuple[int, str, bool]] = []
    for kind, body, end in _messages(data):
        if kind in (_RTM_NEWLINK, _RTM_DELLINK) and body + _IFINFOMSG.size <= end:
            _family, _type, index, ifflags, _change = _IFINFOMSG.unpack_from(data, body)
            name = _attr(data, body + _IFINFOMSG.size, end, _IFLA_IFNAME)
            if name is not None:
                up = kind == _RTM_NEWLINK and bool(ifflags & _IFF_UP and ifflags & _IFF_RUNNING)
                out.append((index, name.split(b"\0", 1)[0].decode(errors="replace"), up))
    return out


def has_address_events(data: bytes) -> bool:
    """Whether a netlink datagram holds an RTM_NEWADDR or RTM_DELADDR."""
    return any(kind in (_RTM_NEWADDR, _RTM_DELADDR) for kind, _b, _e in _messages(data))


def _attr(data: bytes, start: int, end: int, wanted: int) -> bytes | None:
    off = start
    while off + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, off)
        if alen < 4:
            return None
        if atype & 0x3FFF == wanted:
            return data[off + 4 : off + alen]
        off += (alen + 3) & ~3
    return None
