#!/usr/bin/env python3
"""One real failover, recorded on both nodes and plotted: ``docs/failover-timeline.png``.

The site and the failover are ``bench/failover_bench.py``'s (client -- fw1/fw2 -- server in
namespaces, SNAT to the WAN VIP, strict TCP tracking, ctsync's VRRP speaker at 100 ms
adverts, N synthetic entries synced from fw1 to fw2, 20 TCP + 4 UDP long-lived flows, fw1's
agent SIGKILLed and its links taken down). What this adds:

- ``ctsync timeline record --kernel`` runs in each firewall's namespace from a little before
  the death to a little after every flow has resumed (``fw1.jsonl``, ``fw2.jsonl``): VRRP
  states, the failover transition with its timed steps, cache sizes, the kernel table size,
  peer health;
- the flow client records the time of **every** echo of every flow (``flows.json``), not
  only each flow's longest gap: it is failover_site's client with its echo hook extended
  (``flow-client`` below);
- ``events.json``: the death, when both VIPs appeared in fw2 (rtnetlink), the flows' score;
- then ``bench/plot_timeline.py`` draws them (``failover-timeline.png``).

Run as root from the project root (one run, ~30 s at 100k entries)::

    sudo .venv/bin/python bench/failover_timeline.py                       # 100k entries
    sudo .venv/bin/python bench/failover_timeline.py --png docs/failover-timeline.png
    sudo .venv/bin/python bench/failover_timeline.py --mode inject --entries 20000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
for _path in (str(PROJECT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

TCP_PORT = 5000
UDP_PORT = 5300


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# --------------------------------------------------------------------------- flow client


def flow_client(argv: Sequence[str]) -> int:
    """failover_site's flow client, which also prints ``ECHOES <json>`` after its report:
    ``{"tcp:PORT": [unix time of each echo, ...], "udp:PORT": [...]}``."""
    import tests.linux.failover_site as site

    instances: list[Any] = []

    class EchoFlows(site._Flows):
        def __init__(self, interval: float) -> None:
            super().__init__(interval)
            self.times: dict[str, list[float]] = {}
            instances.append(self)

        def echoed(self, rec: site.FlowRecord, at: float, since: float) -> None:
            super().echoed(rec, at, since)
            with self.lock:
                self.times.setdefault(f"{rec.proto}:{rec.port}", []).append(round(at, 6))

    site._Flows = EchoFlows  # type: ignore[misc]  # flow_client_main builds one per run
    code = site.flow_client_main(argv)
    times = instances[0].times if instances else {}
    print("ECHOES", json.dumps(times, separators=(",", ":")), flush=True)
    return code


def flow_client_cmd(*args: str) -> list[str]:
    return [sys.executable, "-u", str(Path(__file__).resolve()), "flow-client", *args]


def _echo_flow_client() -> type[Any]:
    from tests.linux.failover_site import FlowClient

    class EchoFlowClient(FlowClient):
        """failover_site's FlowClient (mark, stop) around :func:`flow_client`."""

        def __init__(self, ns: Any, host: str, *, tcp: int, udp: int) -> None:
            self.proc = ns.popen(
                flow_client_cmd(
                    *("--host", host, "--tcp-port", str(TCP_PORT), "--tcp", str(tcp)),
                    *("--udp-port", str(UDP_PORT), "--udp", str(udp), "--interval", "0.05"),
                ),
                env=_env(),
            )
            self.proc.wait_line("CONNECTED", 30)

    return EchoFlowClient


# --------------------------------------------------------------------------- one run


def start_recorder(ns: Any, node: Any, out: Path, interval: float) -> Any:
    proc = ns.popen(
        [
            *(sys.executable, "-m", "ctsync", "timeline", "record"),
            *("--out", str(out), "--interval", str(interval), "--kernel"),
            *("--timeout", "1", "-S", str(node.socket_path)),
        ],
        env=_env(),
    )
    proc.wait_line("recording ", 20)
    return proc


def _env() -> dict[str, str]:
    from tests.linux.failover_site import project_env

    return project_env()


def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from failover_bench import Ctsync, wait_committed

    from tests.linux.agents import SERVER_ADDR, VIP_LAN, VIP_WAN, build_failover_site, tcp_progress
    from tests.linux.failover_site import (
        FlowReport,
        VipWatch,
        create_entries,
        wait_for,
    )
    from tests.linux.netns import NamespaceFactory, traffic_cmd

    vips = (VIP_LAN, VIP_WAN)
    EchoFlowClient = _echo_flow_client()  # noqa: N806 - a class
    events: dict[str, Any] = {"entries": args.entries, "mode": args.mode, "advert": 0.1}
    with NamespaceFactory() as factory:
        site = build_failover_site(
            factory, out, sync={"alive-interval": 0.2, "peer-dead-after": 1.0}
        )
        site.del_vips(1)  # the VRRP master adds them
        site.server.start(traffic_cmd("tcp-echo-server", "--port", str(TCP_PORT)))
        site.server.start(traffic_cmd("udp-echo-server", "--port", str(UDP_PORT)))
        system = Ctsync(site, out, args)
        recorders: dict[int, Any] = {}
        try:
            log(f"starting the agents ({system.name})")
            system.start()
            log(f"writing {args.entries} entries into fw1")
            if create_entries(site.fw(1).name, args.entries):
                raise RuntimeError("synthetic creates failed in fw1")
            flows = EchoFlowClient(site.client, SERVER_ADDR, tcp=args.flows, udp=args.udp)
            want = args.entries + args.flows + args.udp
            wait_for(lambda: system.synced() >= want, 120, f"fw2 to hold {want} entries")
            time.sleep(0.5)  # the flows' latest TCP state reaches fw2 too
            log("fw2 holds every entry; recording")
            for node_id in (1, 2):
                recorders[node_id] = start_recorder(
                    site.fw(node_id),
                    site.cluster[node_id],
                    out / f"fw{node_id}.jsonl",
                    args.interval,
                )
            vip_watch = VipWatch(site.fw(2).name)
            invalid_before = site.invalid_drops(2)
            time.sleep(args.before + random.uniform(0, 0.2))  # a random phase vs the adverts
            death = system.crash()
            events["death"] = death
            flows.mark()
            before = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
            log("fw1 killed")

            def all_moved() -> bool:
                now = tcp_progress(site.client, SERVER_ADDR, TCP_PORT)
                return len(now) == len(before) and all(
                    now.get(port, 0) >= before[port] + 5 * 14 for port in before
                )

            with contextlib.suppress(TimeoutError):
                wait_for(lambda: vip_watch.first(vips) is not None, 20, "VIPs on fw2", 0.01)
            with contextlib.suppress(TimeoutError):
                wait_for(all_moved, 20, "every TCP flow to carry on", 0.1)
            time.sleep(args.after)
            for rec in recorders.values():
                rec.send_signal(signal.SIGINT)
            for node_id, rec in recorders.items():
                rec.finish(20)
                events[f"fw{node_id}_recorder"] = rec.lines[-1]
            report: FlowReport = flows.stop()
            echoes = json.loads(flows.proc.wait_line("ECHOES", 10).split(" ", 1)[1])
            events["vips"] = vip_watch.first(vips)
            events["vip_added"] = dict(vip_watch.added)
            events["kernel_at_vip"] = dict(vip_watch.count_at)
            vip_watch.close()
            committed, detail = wait_committed(system, death)
            events["committed"] = committed
            events["transition"] = detail.get("transition")
            events["invalid_drops"] = site.invalid_drops(2) - invalid_before
            events["flows"] = report.summary()
            (out / "flows.json").write_text(
                json.dumps(
                    {
                        "mark": report.mark,
                        "stopped": report.stopped,
                        "interval": 0.05,
                        "flows": [_flow(f) for f in report.flows],
                        "echoes": echoes,
                    }
                )
            )
        finally:
            for rec in recorders.values():
                rec.stop()
            system.save_logs()
    (out / "events.json").write_text(json.dumps(events, indent=1))
    return events


def _flow(f: Any) -> dict[str, Any]:
    return {
        "proto": f.proto,
        "port": f.port,
        "max_gap": round(f.max_gap, 4),
        "reset": f.reset,
        "error": f.error,
        "stalled": f.stalled,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["flow-client"]:
        with contextlib.suppress(BrokenPipeError):
            return flow_client(args_in[1:])
        return 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=100_000, help="synthetic synced entries")
    parser.add_argument(
        "--mode",
        choices=["external", "inject"],
        default="external",
        help="external cache committed on failover (default), or disable-external-cache",
    )
    parser.add_argument("--flows", type=int, default=20, help="long-lived TCP flows")
    parser.add_argument("--udp", type=int, default=4, help="UDP flows")
    parser.add_argument("--interval", type=float, default=0.01, help="recorder interval, s")
    parser.add_argument("--before", type=float, default=1.5, help="recording before death, s")
    parser.add_argument("--after", type=float, default=1.5, help="recording after recovery, s")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--png", type=Path, default=None, help="also write the plot here")
    args = parser.parse_args(args_in)
    if os.geteuid() != 0:
        parser.error("run as root (network namespaces)")
    random.seed(args.seed)
    out = args.out or BENCH / "results" / time.strftime("timeline-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    log(f"results in {out}; load {os.getloadavg()}")
    events = run(args, out)
    death = events["death"]
    flows = events["flows"]
    log(
        f"VIPs on fw2 {(events['vips'] or death) - death:.3f}s after the death, commit done"
        f" {(events['committed'] or death) - death:.3f}s; resets {flows['resets']}, resumed"
        f" {flows['tcp_resumed']}/{flows['tcp_flows']}, longest stall {flows['longest_gap']:.3f}s,"
        f" invalid drops {events['invalid_drops']}"
    )
    from plot_timeline import plot_run

    pngs = [out / "failover-timeline.png", *([args.png] if args.png else [])]
    for png in pngs:
        plot_run(out, png)
        log(f"plot: {png} ({png.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
