import time, threading
from pathlib import Path
import pytest
from tests.linux.agents import *
from tests.linux.test_agents import run_concurrently, assert_lost_consistent

pytestmark = [pytest.mark.timeout(300)]

def test_heavy_loss_three(netns_factory, tmp_path: Path) -> None:
    c = Cluster(netns_factory, tmp_path, 3, sync={**FAST_SYNC, "peer-dead-after": 2.0}); c.start()
    c.set_loss(400)
    f1 = make_flows(1, 20000); f3 = make_flows(3, 10000)
    t = time.monotonic()
    run_concurrently(lambda: insert_flows(c[1].ns, f1, tmp_path), lambda: insert_flows(c[3].ns, f3, tmp_path))
    run_concurrently(lambda: set_marks(c[1].ns, {f.key: 5 for f in f1[:5000]}), lambda: delete_flows(c[3].ns, f3[:5000]))
    print("gen", time.monotonic() - t)
    took = c.wait_converged(timeout=90)
    print("converged", took)
    print(c.describe())
    for n in (1,2,3):
        s = c.stats(n); assert_lost_consistent(s); print(n, {k: v for k, v in s["sync"].items() if v})

def test_quick_restart(netns_factory, tmp_path: Path) -> None:
    c = Cluster(netns_factory, tmp_path, 2); c.start()
    f1 = make_flows(1, 3000); insert_flows(c[1].ns, f1, tmp_path)
    f2 = make_flows(2, 1000); insert_flows(c[2].ns, f2, tmp_path)
    c.wait_converged()
    for victim in (1, 2, 1):
        c.kill(victim)
        delete_flows(c[victim].ns, (f1 if victim == 1 else f2)[:100])
        f1 = f1[100:] if victim == 1 else f1
        f2 = f2[100:] if victim == 2 else f2
        c.start(victim)
        took = c.wait_converged(timeout=30)
        print("victim", victim, "converged", took)
    print(c.describe())

def test_restart_during_burst_under_loss(netns_factory, tmp_path: Path) -> None:
    c = Cluster(netns_factory, tmp_path, 2, sync={**FAST_SYNC, "peer-dead-after": 2.0}); c.start()
    c.set_loss(200)
    f1 = make_flows(1, 20000)
    th = threading.Thread(target=lambda: insert_flows(c[1].ns, f1, tmp_path)); th.start()
    time.sleep(0.05)
    c.kill(2)
    th.join()
    c.start(2)
    took = c.wait_converged(timeout=60)
    print("converged", took)
    th = threading.Thread(target=lambda: delete_flows(c[1].ns, f1[:10000])); th.start()
    time.sleep(0.02)
    c.kill(1)
    th.join()
    c.start(1)
    took = c.wait_converged(timeout=60)
    print("converged2", took)
    print(c.describe())
