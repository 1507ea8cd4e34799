#!/usr/bin/env python3
"""What inserting 100k conntrack entries costs the kernel alone, and whether it splits.

Two measurements in a private network namespace (optionally with ``--foreign N`` entries
in a second one: the conntrack hash table is shared by all namespaces, as on the harness's
fw1/fw2), each repeated ``--reps`` times, median and min printed:

  writers    the shared harness's raw ctnetlink writer (prebuilt CT_NEW messages, no
             Python in the timed part): one writer of N entries, then two writers of N/2
             each in parallel. If the kernel handled CT_NEW in parallel, two would take
             about half as long; ctnetlink runs each message under its subsystem mutex.
  prebuilt   ctsync's own CT_NEW messages for the same entries, built beforehand and
             sent by one Committer in batches of 64, 256 and 1024 messages (its ACK and
             error handling included): the floor of any commit of these records.

Usage (root): bench/kernel_floor_bench.py [--entries 100000] [--reps 3] [--foreign 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ctnetlink_bench import SHARED_HARNESS, harness_entry  # noqa: E402 (this directory)

RULES = """table inet ctfloor {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ct state established,related accept;
  }
}
"""


def _writer(ns: str, start: int, n: int) -> subprocess.Popen[str]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, str(SHARED_HARNESS), "writer", "--mode"]
    cmd.append("fill")
    return subprocess.Popen(
        [*cmd, "--n", str(n), "--start", str(start)], stdout=subprocess.PIPE, text=True
    )


def _span(procs: list[subprocess.Popen[str]]) -> float:
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            sys.exit(f"the harness writer failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return float(max(r["t_end"] for r in results) - min(r["t_start"] for r in results))


def _flush(ns: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "conntrack", "-F"], check=False, capture_output=True)


def writers(ns: str, n: int, reps: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"one writer": [], "two writers in parallel": []}
    for _ in range(reps):
        _flush(ns)
        out["one writer"].append(_span([_writer(ns, 0, n)]))
        _flush(ns)
        half = n // 2
        out["two writers in parallel"].append(
            _span([_writer(ns, 0, half), _writer(ns, half, n - half)])
        )
    _flush(ns)
    return out


def prebuilt_child(n: int, reps: int) -> None:
    """Runs inside the namespace: ctsync's messages for the harness's entries."""
    from ctsync.core import commit, record
    from ctsync.io import netlink

    records = [record.from_entry(harness_entry(i)) for i in range(n)]
    messages = [
        commit.commit_message_positional(k, v, seq, None, commit.COMMIT_FLAGS, True)
        for seq, (k, v) in enumerate(records, 1)
    ]
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        for batch in (64, 256, 1024):
            subprocess.run(["conntrack", "-F"], check=False, capture_output=True)
            committer = netlink.Committer(batch=batch)
            result = netlink.CommitResult()
            started = time.perf_counter()
            for i in range(0, len(messages), batch):
                committer._flush_batch(list(messages[i : i + batch]), {}, result, None)
            out.setdefault(f"prebuilt, batches of {batch}", []).append(
                time.perf_counter() - started
            )
            committer.close()
            if result.failed or netlink.count_entries() != n:
                sys.exit(f"prebuilt commit failed: {result.errors}")
    subprocess.run(["conntrack", "-F"], check=False, capture_output=True)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--foreign", type=int, default=0, help="entries in another namespace")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prebuilt_child(args.entries, args.reps)
        return
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces and their conntrack tables)")
    tag = uuid.uuid4().hex[:8]
    ns, other = f"ctsync-kf-{tag}", f"ctsync-kfo-{tag}"
    created: list[str] = []
    try:
        for name in (ns, other):
            subprocess.run(["ip", "netns", "add", name], check=True)
            created.append(name)
            subprocess.run(
                ["ip", "netns", "exec", name, "nft", "-f", "-"], input=RULES, text=True, check=True
            )
        if args.foreign:
            _span([_writer(other, 0, args.foreign)])
        results = writers(ns, args.entries, args.reps)
        child = subprocess.run(
            [
                *("ip", "netns", "exec", ns, sys.executable, __file__, "--child"),
                *("--entries", str(args.entries), "--reps", str(args.reps)),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results.update(json.loads(child.stdout.strip().splitlines()[-1]))
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False)
    print(f"{args.entries} entries, {args.foreign} in another namespace, {args.reps} reps")
    print(f"{'measurement':<32}{'median s':>10}{'min s':>10}")
    for name, values in results.items():
        print(f"{name:<32}{statistics.median(values):>10.3f}{min(values):>10.3f}")


if __name__ == "__main__":
    main()
