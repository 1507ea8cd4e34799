#!/usr/bin/env python3
"""Regression check: two overlapping KernelTable reconciles on a 100k-entry table.

Up to commit 50d8cec, ``KernelTable.start()`` and the ``-R`` command awaited
``reconcile()`` directly, while an overrun (or the exit of ``events_paused()``) started
another reconcile as a task through ``schedule_reconcile()``, which checked only its own
task. The two shared the cache's one mark-and-sweep set. The second ``begin_reconcile``
replaced the first one's ``seen`` set, so the first sweep destroyed live entries that only
the first dump had marked, and the second reconcile re-added them as NEW; the second then
swept nothing. Measured: 28,672 to 69,632 live entries destroyed and re-created. Since
bd0bd47 ``reconcile()`` is serialised by a lock, and this script hears no DESTROYED and no
NEW.

The script starts a reconcile, waits ``--delay`` seconds (so the first dump is well into the
table), calls ``schedule_reconcile()`` and prints what the change sink heard. If reconciles
do not overlap, the sink hears neither DESTROYED nor NEW, because every entry stays in the
kernel the whole time.

    .venv/bin/python bench/reconcile_race.py [--n 100000] [--delay 0.6]

It runs in its own namespace (deleted afterwards), like ctnetlink_bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ctnetlink_bench as cb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--delay", type=float, default=0.6)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(asyncio.run(_worker(a))), flush=True)
        return
    try:
        ns = cb.RES.netns("rr")
        cb.fill_namespace(ns, a.n)
        argv = [cb.PY, __file__, "--worker", "--n", str(a.n), "--delay", str(a.delay)]
        res = cb.finish(cb.RES.spawn(argv, ns=ns))
    finally:
        cb.RES.close()
    print(json.dumps(res, indent=1))
    heard = res["sink_heard"]
    ok = not heard.get("DESTROYED") and not heard.get("NEW") and res["cache_equals_kernel_at_end"]
    print("OK: no live entry was destroyed" if ok else "RACE: live entries were destroyed")


async def _worker(a: argparse.Namespace) -> dict[str, object]:
    from ctsync.core import ctnetlink as nl
    from ctsync.core import record
    from ctsync.core.cache import Cache, Change
    from ctsync.io.netlink import KernelTable, iter_dump, open_socket

    heard: collections.Counter[str] = collections.Counter()

    def sink(change: Change, _key: bytes, _own: bool) -> None:
        heard[change.name] += 1

    cache = Cache("internal")
    kt = KernelTable(cache, rcvbuf=64 << 20, sink=sink)
    await kt.start()
    heard.clear()
    first = asyncio.get_running_loop().create_task(kt.reconcile())
    await asyncio.sleep(a.delay)
    kt.schedule_reconcile()  # what _on_overrun() or events_paused() does
    removed_by_first = await first
    while kt.stats.resync_with_kernel_table < 3:
        await asyncio.sleep(0.01)
    with open_socket() as sock:
        kernel = {record.parse_ct(b, s, e)[0] for b, t, s, e in iter_dump(sock) if t == nl.CT_NEW}
    kt.close()
    return {
        "kernel_entries": len(kernel),
        "removed_by_first_reconcile": removed_by_first,
        "sink_heard": dict(heard),
        "cache_equals_kernel_at_end": kernel == set(cache.keys()),
    }


if __name__ == "__main__":
    main()
