#!/usr/bin/env python3
"""Per-event cost of the master's event path, stage by stage (scenario A's fw1 work).

Fills a private network namespace's conntrack table with N entries exactly as the shared
harness's writer does (scenario A's burst), captures the kernel's CT_NEW events as they
arrive on an event socket, then replays the captured datagrams through the agent's code
with no other load, timing each stage cumulatively:

  recv     read the datagrams from a real event socket (a second fill; syscalls only)
  parse    record.parse_ct on every event
  cache    + Cache.update (filter, value, digest) as the internal cache does it
  session  + SyncSession.local_change, flush per read batch, datagrams packed and MACed
  agent    KernelTable.read_events over the captured datagrams (header loop, sink, flush)
  preparsed  agent with the parsing done beforehand (what a free parser would leave)
  destroy  record.parse_ct on the CT_DELETE events of `conntrack -F` over those entries
  dagent   KernelTable.read_events over those CT_DELETE events (cache holding the entries)

Usage (root): bench/event_path_bench.py [--entries 100000] [--reps 5]
Prints microseconds per event (best and median of the repetitions) for each stage.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctnetlink_bench import harness  # noqa: E402 (this directory: the shared harness, loaded once)


def _fill(cb, start: int, n: int) -> None:  # type: ignore[no-untyped-def]
    """Insert n entries as the harness writer's fill mode does (batches of its default)."""
    link = cb.CtNetlink()
    batch = 100
    seq = 1
    for b0 in range(start, start + n, batch):
        msgs = []
        for i in range(b0, min(b0 + batch, start + n)):
            msgs.append(cb.msg_create(seq, i, 4, 0, 600))
            seq += 1
        link.send(msgs)
    link.s.close()


def _capture(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def _recv_all(sock: socket.socket, buf: bytearray) -> int:
    count = 0
    recv_into = sock.recv_into
    while True:
        try:
            recv_into(buf)
        except BlockingIOError:
            return count
        count += 1


class _ReplaySocket:
    """Serves captured datagrams to KernelTable.read_events as its socket would."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self._it = iter(datagrams)

    def recv_into(self, buf: bytearray) -> int:
        try:
            data = next(self._it)
        except StopIteration:
            raise BlockingIOError from None
        buf[: len(data)] = data
        return len(data)


def child(entries: int, reps: int) -> None:
    from ctsync.core import record
    from ctsync.core.cache import Cache
    from ctsync.core.filter import NO_EXPECTATIONS, EntryFilter
    from ctsync.core.sync.session import SyncSession
    from ctsync.core.sync.state import SessionConfig
    from ctsync.core.wire import Authenticator
    from ctsync.io import netlink

    cb = harness()
    netlink.set_conntrack_events(True)
    sock = netlink.open_socket(netlink.CT_GROUPS, 512 << 20)
    _fill(cb, 0, entries)
    datagrams = _capture(sock)
    events = len(datagrams)
    if events < entries:
        sys.exit(f"captured {events} events for {entries} entries: the event socket overran")
    # The flush's DESTROY events (CT_DELETE: a TCP entry's protoinfo is its state alone).
    subprocess.run(["conntrack", "-F"], check=True, capture_output=True)
    destroy_datagrams = _capture(sock)
    destroys = len(destroy_datagrams)
    if destroys < entries:
        sys.exit(f"captured {destroys} DESTROY events for {entries} entries")
    # recv: a second fill (other keys) read back with the agent's recv_into loop
    recv_times = []
    buf = bytearray(65536)
    for rep in range(reps):
        _fill(cb, (rep + 1) * entries * 2, entries)
        t0 = time.perf_counter()
        got = _recv_all(sock, buf)
        recv_times.append((time.perf_counter() - t0) / max(got, 1))
        subprocess.run(["conntrack", "-F"], check=True, capture_output=True)
        _capture(sock)
    sock.close()

    entry_filter = EntryFilter.build(
        accept_protocols=(),
        ignore_addresses=["127.0.0.1", "::1", "198.51.100.0/24"],
        tcp_states=(),
    )

    def bodies(grams: list[bytes]) -> list[tuple[bytes, int, int]]:
        out = []
        for data in grams:
            mlen = int.from_bytes(data[0:4], sys.byteorder)
            out.append((data, 20, mlen))
        return out

    parsed_input = bodies(datagrams)
    destroy_input = bodies(destroy_datagrams)

    def stage_parse() -> None:
        parse = record.parse_ct
        for data, start, end in parsed_input:
            parse(data, start, end)

    def stage_cache() -> None:
        parse = record.parse_ct
        cache = Cache("internal", entry_filter, digest=True)
        update = cache.update
        for data, start, end in parsed_input:
            update(parse(data, start, end))

    def new_session(cache: Cache) -> SyncSession:
        return SyncSession(1, 1, Authenticator(b"k" * 32), cache, SessionConfig(), os.urandom)

    def stage_session() -> None:
        parse = record.parse_ct
        cache = Cache("internal", entry_filter, digest=True)
        session = new_session(cache)
        update = cache.update
        local_change = session.local_change
        for i, (data, start, end) in enumerate(parsed_input):
            parts = parse(data, start, end)
            if update(parts):
                local_change(parts[0])
            if i % 4096 == 4095:
                session.flush(0.0)
                session.datagrams_to_send()
        session.flush(0.0)
        session.datagrams_to_send()

    def stage_destroy() -> None:
        parse = record.parse_ct
        for data, start, end in destroy_input:
            parse(data, start, end)

    def stage_agent(grams: list[bytes] = datagrams, cache: Cache | None = None) -> None:
        if cache is None:
            cache = Cache("internal", entry_filter, digest=True)
        session = new_session(cache)

        def sink(change: object, key: bytes, own: bool) -> None:
            session.local_change(key)

        def after_batch() -> None:
            session.flush(0.0)
            session.datagrams_to_send()

        table = netlink.KernelTable.__new__(netlink.KernelTable)
        table.cache = cache
        table.sink = sink
        table.after_batch = after_batch
        table.own_portids = set()
        table.stats = netlink.EventStats()
        table.expect_filter = NO_EXPECTATIONS
        table._sock = _ReplaySocket(grams)  # type: ignore[assignment]
        table._buf = bytearray(65536)
        while table.read_events():
            pass

    preparsed = [record.parse_ct(data, start, end) for data, start, end in parsed_input]

    def stage_agent_preparsed() -> None:
        # The same path with parsing done beforehand: the floor a compiled parser could
        # reach (what is left is the cache, the session and the loop itself).
        feed = iter(preparsed).__next__
        real_parse = record.parse_ct
        record.parse_ct = lambda buf, start, end: feed()
        try:
            stage_agent()
        finally:
            record.parse_ct = real_parse

    def filled_cache() -> Cache:
        cache = Cache("internal", entry_filter, digest=True)
        for parts in preparsed:
            cache.update(parts)
        return cache

    stages: list[tuple[str, Callable[[], None], int]] = [
        ("parse", stage_parse, events),
        ("cache", stage_cache, events),
        ("session", stage_session, events),
        ("agent", stage_agent, events),
        ("preparsed", stage_agent_preparsed, events),
        ("destroy", stage_destroy, destroys),
    ]
    results: dict[str, list[float]] = {"recv": recv_times}
    for _ in range(reps):
        for name, fn, count in stages:
            t0 = time.perf_counter()
            fn()
            results.setdefault(name, []).append((time.perf_counter() - t0) / count)
        # dagent: read_events over the DESTROY events, the cache holding their entries
        cache = filled_cache()
        t0 = time.perf_counter()
        stage_agent(destroy_datagrams, cache)
        results.setdefault("dagent", []).append((time.perf_counter() - t0) / destroys)
        if len(cache):
            sys.exit(f"{len(cache)} entries left after their DESTROY events")
    print(f"{events} CT_NEW and {destroys} CT_DELETE events captured for {entries} entries;")
    print(f"{reps} repetitions")
    print(f"{'stage':<10}{'best us/event':>16}{'median us/event':>18}")
    for name in ("recv", "parse", "cache", "session", "agent", "preparsed", "destroy", "dagent"):
        values = results[name]
        print(f"{name:<10}{min(values) * 1e6:>16.2f}{statistics.median(values) * 1e6:>18.2f}")
    print("(parse/cache/session are cumulative; agent = the whole read_events path, no recv;")
    print(" preparsed = agent with every message parsed beforehand, the floor of a faster parser;")
    print(" destroy = parse_ct on the DESTROY events of a flush; dagent = the agent path over")
    print(" them, its cache holding their entries)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.entries, args.reps)
        return
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace and its conntrack table)")
    ns = f"ctsync-evb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        cmd = ["ip", "netns", "exec", ns, sys.executable, __file__, "--child"]
        cmd += ["--entries", str(args.entries), "--reps", str(args.reps)]
        subprocess.run(cmd, check=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    main()
