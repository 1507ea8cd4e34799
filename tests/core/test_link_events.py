"""Link events as the VRRP speaker's LinkWatcher reads them (crafted rtnetlink bytes)."""

from __future__ import annotations

import struct

from ctsync.io import vip
from ctsync.io.vip import LinkWatcher, parse_link_events

UP_RUNNING = 0x1 | 0x40


def link_message(kind: int, index: int, name: str, flags: int) -> bytes:
    raw = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(raw), 3) + raw
    attr += b"\0" * (-len(attr) % 4)
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0xFFFFFFFF) + attr
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_parse_link_events() -> None:
    data = link_message(16, 7, "eth0", UP_RUNNING) + link_message(16, 8, "eth1", 0x1)
    data += link_message(17, 9, "veth9", UP_RUNNING)  # deleted: never up
    assert parse_link_events(data) == [(7, "eth0", True), (8, "eth1", False), (9, "veth9", False)]
    assert parse_link_events(data[:-3]) == [(7, "eth0", True), (8, "eth1", False)]
    assert parse_link_events(b"\xff" * 7) == []


class FakeSocket:
    def __init__(self, *datagrams: bytes) -> None:
        self.datagrams = list(datagrams)

    def recv(self, size: int) -> bytes:
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0)


def watcher(seen: list[tuple[str, bool]]) -> LinkWatcher:
    w = LinkWatcher([], lambda name, up: seen.append((name, up)))
    w.state = {"lan0": True, "wan0": True}
    w.index = {4: "lan0", 5: "wan0"}
    return w


def test_a_renamed_or_moved_interface_counts_as_down() -> None:
    """`docker network disconnect` (or a move to another namespace) renames the device
    under its old index; watching by name alone would never see it go."""
    seen: list[tuple[str, bool]] = []
    w = watcher(seen)
    w.sock = FakeSocket(link_message(16, 4, "tmp123", UP_RUNNING))  # type: ignore[assignment]
    w._readable()
    assert seen == [("lan0", False)] and 4 not in w.index
    # A new device with the old name comes up: up again, under its new index.
    w.sock = FakeSocket(link_message(16, 11, "lan0", UP_RUNNING))  # type: ignore[assignment]
    w._readable()
    assert seen == [("lan0", False), ("lan0", True)] and w.index[11] == "lan0"
    # Plain down/up of a watched interface, and events of others, as before.
    w.sock = FakeSocket(  # type: ignore[assignment]
        link_message(16, 5, "wan0", 0x1), link_message(16, 6, "other", UP_RUNNING)
    )
    w._readable()
    assert seen[-1] == ("wan0", False) and len(seen) == 3
    assert vip.link_is_up("no-such-if0") is None
