"""``ctsync failover`` and the keepalived notify FIFO, with real agents in namespaces.

The role commands are the drop-in for conntrackd's primary-backup.sh: MASTER commits the
synced connections into the kernel, then forgets the external cache, re-reads the kernel
and sends everything to the peers; BACKUP asks for a full transfer and, after being
master, shortens the timeouts of the entries it owned (conntrackd -t). The full failover
with VRRP and real keepalived is in test_failover.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.linux.agents import (
    Cluster,
    insert_flows,
    kernel_entries,
    kernel_keys,
    make_flows,
    wait_until,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

PURGE = 30


def add_failover_table(cluster: Cluster, node_id: int, text: str) -> None:
    path = cluster[node_id].config_path
    path.write_text(path.read_text() + "\n[failover]\n" + text)


def steps_of(transition: dict[str, Any]) -> list[str]:
    return [step["step"] for step in transition["steps"]]


def test_failover_command_master_then_backup(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = make_cluster(2)
    cluster.write_config(cluster[2], **{"purge-timeout": PURGE})
    add_failover_table(cluster, 2, 'mechanism = "keepalived"\n')
    cluster.start()
    flows = make_flows(1, 2000)
    insert_flows(cluster[1].ns, flows, tmp_path)
    cluster.wait_converged(timeout=20)
    keys = {f.key for f in flows}
    assert not keys & kernel_keys(cluster[2].ns)

    # keepalived runs the BACKUP notify at start-up.
    backup = cluster.ctl(2, "failover", "backup")
    assert (backup["from"], backup["to"]) == (None, "BACKUP")
    assert steps_of(backup) == ["request-resync"]

    # As keepalived's generic notify: GROUP NAME STATE PRIORITY.
    master = cluster.ctl(2, "failover", "GROUP", "G1", "MASTER", "0")
    assert (master["from"], master["to"], master["reason"]) == ("BACKUP", "MASTER", "GROUP G1")
    assert steps_of(master) == ["commit", "flush-external", "resync", "bulk-send"]
    commit = master["steps"][0]["result"]
    assert (commit["committed"], commit["failed"]) == (2000, 0)
    assert all(step["error"] is None for step in master["steps"])
    assert keys <= kernel_keys(cluster[2].ns)
    # The committed connections are fw2's own now, and fw1 hears so (bulk send).
    assert master["steps"][2]["result"]["entries"] >= 2000
    wait_until(lambda: keys <= set(cluster.external(1, 2)), 10, "fw1 to hold fw2's bulk transfer")

    again = cluster.ctl(2, "failover", "primary")  # idempotent: nothing to do
    assert steps_of(again) == []

    # Back to BACKUP: fw2's entries expire within purge-timeout unless traffic refreshes.
    backup = cluster.ctl(2, "failover", "backup")
    assert steps_of(backup) == ["request-resync", "purge"]
    assert backup["steps"][1]["result"]["updated"] >= 2000
    timeouts = [e.timeout for k, e in kernel_entries(cluster[2].ns).items() if k in keys]
    assert len(timeouts) == 2000 and max(timeouts) <= PURGE
    # fw1, the owner of those connections, is untouched.
    assert min(e.timeout for e in kernel_entries(cluster[1].ns).values()) > PURGE

    status = cluster.ctl(2, "show", "status")
    assert status["state"] == "BACKUP"
    assert [(t["from"], t["to"]) for t in status["failover"]["transitions"]] == [
        (None, "BACKUP"),
        ("BACKUP", "MASTER"),
        ("MASTER", "MASTER"),
        ("MASTER", "BACKUP"),
    ]
    text = cluster.cli(2, "show", "status").stdout
    assert "last state transition : BACKUP at " in text

    bad = cluster.cli(2, "failover", "slave")
    assert bad.returncode == 2 and "unknown state 'slave'" in bad.stderr


def test_notify_fifo_drives_the_agent(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """The lines keepalived writes to its notify FIFO, in its format; only the configured
    sync group's lines count. (Real keepalived writes them in test_failover.py.)"""
    fifo = tmp_path / "keepalived.fifo"
    cluster = make_cluster(2)
    add_failover_table(
        cluster, 2, f'mechanism = "keepalived"\nnotify-fifo = "{fifo}"\nsync-group = "G1"\n'
    )
    cluster.start()
    insert_flows(cluster[1].ns, make_flows(1, 500), tmp_path)
    cluster.wait_converged(timeout=20)
    assert fifo.is_fifo() and (fifo.stat().st_mode & 0o777) == 0o600

    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b'GROUP "G1" BACKUP 0\nINSTANCE "VI_1" MASTER 100\nGROUP "G2" MASTER 0\n')
        wait_until(lambda: cluster.query(2, "status")["state"] == "BACKUP", 10, "BACKUP")
        time.sleep(0.3)
        assert cluster.query(2, "status")["state"] == "BACKUP"  # the other lines ignored
        assert len(kernel_keys(cluster[2].ns)) < 500
        # A line split across writes, as a pipe may deliver it.
        os.write(fd, b'GROUP "G1" MAS')
        time.sleep(0.1)
        os.write(fd, b"TER 0\n")

        def master_done() -> bool:
            failover = cluster.query(2, "status")["failover"]
            last = failover["transitions"][-1]
            return failover["state"] == "MASTER" and last["done"] is not None

        wait_until(master_done, 20, "fw2 to become MASTER and finish its steps")
    finally:
        os.close(fd)
    last = cluster.query(2, "status")["failover"]["transitions"][-1]
    assert last["reason"] == "keepalived GROUP G1"
    assert last["steps"][0]["step"] == "commit"
    assert last["steps"][0]["result"]["committed"] == 500
    assert len(kernel_keys(cluster[2].ns)) >= 500
