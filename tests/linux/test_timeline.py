"""``ctsync timeline record`` against real agents: a manual failover seen sample by sample.

The recorder is a client of the control socket; here it runs inside fw2's namespace (for
``--kernel``, the table size where it runs) while ``ctsync failover master`` moves fw2 from
BACKUP to MASTER, and the file must show the role change, the commit with the number of
entries it wrote, the caches moving (external emptied, internal filled) and the kernel
table growing. A second recording watches an agent being killed: the samples it could not
get are recorded as errors and the recording goes on.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.linux.agents import FAST_SYNC, Cluster, Node, insert_flows, make_flows, wait_until
from tests.linux.netns import NamespaceFactory, Process

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

ENTRIES = 2000
CTSYNC = (sys.executable, "-m", "ctsync")


def record(node: Node, out: Path, *args: str) -> Process:
    """Start ``ctsync timeline record`` in the node's namespace; return once it records."""
    proc = node.ns.popen(
        [
            *CTSYNC,
            "timeline",
            "record",
            "--out",
            str(out),
            "-S",
            str(node.socket_path),
            *args,
        ]
    )
    proc.wait_line("recording ", 20)
    return proc


def finish(proc: Process, out: Path) -> tuple[list[dict[str, Any]], str]:
    """Wait for the recorder's exit; its samples and its closing line."""
    assert proc.finish(20) == 0, proc.output()
    lines = out.read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    summary = proc.lines[-1]
    assert summary.startswith(f"{len(samples)} samples written to {out} in "), proc.output()
    return samples, summary


def test_timeline_records_a_manual_failover(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    # Slow anti-entropy: fw1 still holds its entries, and a digest exchange would refill
    # fw2's external cache of them within a second of the flush this test looks for.
    cluster = Cluster(netns_factory, tmp_path, 2, sync={**FAST_SYNC, "digest-interval": 60.0})
    cluster.start()
    flows = make_flows(1, ENTRIES)
    insert_flows(cluster[1].ns, flows, tmp_path)
    cluster.wait_converged(timeout=30)
    assert cluster.ctl(2, "failover", "backup")["to"] == "BACKUP"

    out = tmp_path / "fw2.jsonl"
    proc = record(cluster[2], out, "--interval", "0.01", "--kernel")
    time.sleep(0.5)
    before_master = time.time()
    master = cluster.ctl(2, "failover", "master")
    assert master["to"] == "MASTER"
    wait_until(
        lambda: cluster.query(2, "counts")["internal"] >= ENTRIES, 10, "fw2 to own the entries"
    )
    time.sleep(0.5)
    stopped = time.time()
    proc.send_signal(signal.SIGINT)
    samples, _ = finish(proc, out)

    # A steady clock: every sample answered, in order, about 10 ms apart.
    assert all("error" not in s for s in samples), [s for s in samples if "error" in s][:3]
    times = [s["t"] for s in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    assert len(samples) >= 50, len(samples)
    assert 0.005 <= gaps[len(gaps) // 2] <= 0.05, gaps[len(gaps) // 2]
    assert times[-1] <= stopped + 0.5

    first, last = samples[0], samples[-1]
    assert first["node_id"] == last["node_id"] == 2
    assert first["vrrp"] is None and last["vrrp"] is None  # no speaker: mechanism none
    # The role change, where it happened.
    assert first["role"] == "BACKUP" and last["role"] == "MASTER"
    switch = next(i for i, s in enumerate(samples) if s["role"] == "MASTER")
    assert all(s["role"] == "BACKUP" for s in samples[:switch])
    assert before_master - 0.1 <= samples[switch]["t"] <= stopped
    # The commit: its start, duration and the entries it wrote, in the last transition.
    transition = last["transition"]
    assert (transition["from"], transition["to"]) == ("BACKUP", "MASTER")
    steps = {step["step"]: step for step in transition["steps"]}
    commit = steps["commit"]
    assert commit["result"]["committed"] == ENTRIES and commit["result"]["failed"] == 0
    assert before_master - 0.1 <= commit["started"] <= samples[switch]["t"] + 1.0
    assert commit["seconds"] is not None and commit["seconds"] < 5
    assert transition["done"] is not None and not last.get("missed_transitions")
    # The caches: fw1's entries held externally before, owned (internal) after.
    assert first["counts"]["external"] >= ENTRIES and first["counts"]["internal"] < ENTRIES
    assert last["counts"]["external"] == 0 and last["counts"]["internal"] >= ENTRIES
    # The kernel table of fw2's namespace (--kernel) before and after the commit.
    assert first["kernel"] < ENTRIES <= last["kernel"]
    # Peer health: fw1 up and verified all along.
    for s in (first, last):
        assert [(p["node"], p["up"], p["verified"]) for p in s["peers"]] == [(1, True, True)]
    assert first["peers"][0]["external_entries"] >= ENTRIES


def test_timeline_goes_on_when_the_agent_dies(
    netns_factory: NamespaceFactory, tmp_path: Path
) -> None:
    cluster = Cluster(netns_factory, tmp_path, 2)
    cluster.start()
    out1, out2 = tmp_path / "fw1.jsonl", tmp_path / "fw2.jsonl"
    rec1 = record(cluster[1], out1, "--interval", "0.05", "--duration", "3", "--timeout", "0.5")
    rec2 = record(cluster[2], out2, "--interval", "0.05", "--duration", "3")
    time.sleep(0.5)
    killed = time.time()
    cluster.kill(1)
    samples1, summary1 = finish(rec1, out1)
    samples2, _ = finish(rec2, out2)

    # fw1: answered until the kill, errors after it, and the recording ran its course.
    answered = [s for s in samples1 if "error" not in s]
    errors = [s for s in samples1 if "error" in s]
    assert answered and errors, summary1
    assert max(s["t"] for s in answered) <= killed + 0.1
    assert min(s["t"] for s in errors) >= killed - 0.1
    assert f", {len(errors)} unanswered" in summary1
    assert samples1[-1]["t"] - samples1[0]["t"] >= 2.5
    # fw2 saw its peer go down (peer-dead-after 1 s) and kept answering.
    assert all("error" not in s for s in samples2)
    assert samples2[0]["peers"][0]["up"] is True
    down = [s for s in samples2 if not s["peers"][0]["up"]]
    assert down and down[0]["t"] >= killed + 0.5, [s["peers"] for s in samples2[-3:]]


def test_timeline_needs_a_reachable_agent(tmp_path: Path) -> None:
    out = tmp_path / "none.jsonl"
    proc = subprocess.run(
        [*CTSYNC, "timeline", "record", "-o", str(out), "-S", str(tmp_path / "missing.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("error: cannot reach the ctsync agent at "), proc.stderr
    assert not out.exists()
