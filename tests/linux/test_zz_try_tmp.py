from pathlib import Path
import time
from tests.linux.agents import Cluster, make_flows, insert_flows, set_marks, delete_flows
from tests.linux.netns import NamespaceFactory

def test_try(netns_factory: NamespaceFactory, tmp_path: Path) -> None:
    c = Cluster(netns_factory, tmp_path, 2)
    c.start()
    flows = make_flows(1, 5000)
    insert_flows(c[1].ns, flows, tmp_path)
    c.wait_converged()
    t0 = time.monotonic()
    n = set_marks(c[1].ns, {f.key: 7 for f in flows[:1000]})
    print("marked", n, time.monotonic() - t0)
    for i in range(20):
        d = c.divergence()
        print(round(time.monotonic() - t0, 2), d[:300])
        print(c.describe())
        if not d: break
        time.sleep(0.5)
    t0 = time.monotonic()
    delete_flows(c[1].ns, flows[4000:], tmp_path)
    for i in range(20):
        d = c.divergence()
        print(round(time.monotonic() - t0, 2), d[:300])
        print(c.describe())
        if not d: break
        time.sleep(0.5)
    print(c.output(1)[-3000:])
