#!/usr/bin/env python3
"""Draw a recorded failover: both nodes' timelines and the connections' echo gaps (PNG).

Input is what ``bench/failover_timeline.py`` leaves in its results directory, or any
recordings of ``ctsync timeline record``:

- ``fw*.jsonl`` (one per node): VRRP group state (or, without ctsync's speaker, the failover
  role), the last transition's timed steps, cache sizes, the kernel table size (``--kernel``)
  and error samples while an agent did not answer;
- ``flows.json`` (optional): the time of every echo of every flow;
- ``events.json`` (optional): the death of the master, when the VIPs appeared.

Three panels share one time axis, in seconds from the death (or from the first MASTER
transition when there is no ``events.json``):

1. per node, the VRRP state as coloured bands (no answer: the agent is dead), and under it
   the failover steps with their real durations (commit, addresses, flush, resync, ...);
2. cache sizes: internal and external cache of each node, and its kernel table;
3. one lane per flow: a tick per echo; gaps longer than three echo intervals in red.

Usage::

    .venv/bin/python bench/plot_timeline.py bench/results/timeline-<stamp>/ [-o out.png]
    .venv/bin/python bench/plot_timeline.py fw1.jsonl fw2.jsonl --flows flows.json -o out.png

Needs matplotlib (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

STATE_COLOURS = {
    "MASTER": "#2e7d32",
    "BACKUP": "#1565c0",
    "FAULT": "#ef6c00",
    "INIT": "#9e9e9e",
    "STOP": "#9e9e9e",
    "none": "#e0e0e0",
    "no answer": "#212121",
}
STEP_COLOURS = {
    "commit": "#c62828",
    "addresses": "#2e7d32",
    "flush-external": "#6a1b9a",
    "resync": "#f9a825",
    "bulk-send": "#00838f",
    "request-resync": "#5d4037",
    "adopt": "#ad1457",
    "purge": "#5d4037",
}
#: Steps shorter than this are drawn this wide, so that they can be seen at all (s).
MIN_STEP_WIDTH = 0.006


@dataclass
class Node:
    """One node's recording, reduced to what is drawn (times are unix time)."""

    name: str
    times: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    internal: list[float] = field(default_factory=list)
    external: list[float] = field(default_factory=list)
    kernel: list[float] = field(default_factory=list)
    #: speaker transitions: exact times of the group's state changes
    vrrp_edges: dict[float, str] = field(default_factory=dict)
    #: failover transitions by start time, each in its last recorded form
    transitions: dict[float, dict[str, Any]] = field(default_factory=dict)


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _unix(value: Any) -> float:
    """The speaker's transition times are ISO 8601 strings; the controller's unix times."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    return float(value)


def load_recording(path: Path) -> Node:
    node = Node(path.stem)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        s = json.loads(line)
        node.times.append(float(s["t"]))
        if "error" in s:
            node.states.append("no answer")
            for series in (node.internal, node.external, node.kernel):
                series.append(float("nan"))
            continue
        if s.get("node_id") is not None:
            node.name = f"fw{s['node_id']}"
        vrrp = s.get("vrrp")
        if vrrp:
            node.states.append(str(vrrp.get("state")))
            last = vrrp.get("last_transition")
            if last and last.get("time") is not None:
                node.vrrp_edges[_unix(last["time"])] = str(last.get("to"))
        else:
            node.states.append(str(s.get("role") or "none"))
        counts = s.get("counts") or {}
        node.internal.append(_nan(counts.get("internal")))
        node.external.append(_nan(counts.get("external")))
        node.kernel.append(_nan(s.get("kernel")))
        for tr in [*(s.get("missed_transitions") or []), s.get("transition")]:
            if tr and tr.get("at") is not None:
                node.transitions[float(tr["at"])] = tr
    return node


def state_segments(node: Node) -> list[tuple[float, float, str]]:
    """``(start, end, state)`` bands; an edge moves to the speaker's own time of the change
    when it reported one between the two samples."""
    segments: list[tuple[float, float, str]] = []
    if not node.times:
        return segments
    start, state = node.times[0], node.states[0]
    for i in range(1, len(node.times)):
        if node.states[i] == state:
            continue
        edge = node.times[i]
        for at, to in node.vrrp_edges.items():
            if to == node.states[i] and node.times[i - 1] <= at <= node.times[i]:
                edge = at
        segments.append((start, edge, state))
        start, state = edge, node.states[i]
    segments.append((start, node.times[-1], state))
    return segments


def gaps(times: Sequence[float], longer_than: float) -> list[tuple[float, float]]:
    """``(start, length)`` of the intervals between echoes longer than *longer_than*."""
    return [(a, b - a) for a, b in itertools.pairwise(times) if b - a > longer_than]


def _step_rows(node: Node, t0: float, lo: float, hi: float) -> list[tuple[float, float, str]]:
    rows = []
    for tr in node.transitions.values():
        for step in tr.get("steps") or []:
            if step.get("started") is None:
                continue
            start = float(step["started"]) - t0
            length = float(step.get("seconds") or 0.0)
            if start + length >= lo and start <= hi:
                rows.append((start, length, str(step.get("step"))))
    return rows


def _steps_text(node: Node, t0: float, lo: float, hi: float) -> str | None:
    """The node's steps in the window with their durations (the bars are too short for
    labels), the entries the commit wrote included."""
    parts = []
    role = ""
    for tr in sorted(node.transitions.values(), key=lambda tr: float(tr["at"])):
        for step in tr.get("steps") or []:
            if step.get("started") is None:
                continue
            start = float(step["started"]) - t0
            length = float(step.get("seconds") or 0.0)
            if start + length < lo or start > hi:
                continue
            text = f"{step.get('step')} {length * 1000:.0f} ms"
            result = step.get("result") or {}
            if step.get("step") == "commit" and "committed" in result:
                text += f" ({result['committed']:,} entries, {result.get('failed', 0)} failed)"
            if step.get("error"):
                text += " FAILED"
            parts.append(text)
            role = str(tr.get("to"))
    return f"{node.name} -> {role}: " + ", ".join(parts) if parts else None


def plot(
    nodes: Sequence[Node],
    flows: dict[str, Any] | None,
    events: dict[str, Any] | None,
    out: Path,
    *,
    window: tuple[float, float] | None = None,
    title: str | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = _origin(nodes, events)
    lo, hi = window if window is not None else _window(nodes, t0, flows)
    n_flows = len(flows["echoes"]) if flows else 0
    heights = [1.0 + 0.45 * len(nodes), 1.4, 1.6 if n_flows else 0.01]
    fig, axes = plt.subplots(
        3, 1, figsize=(10, 7.2), sharex=True, gridspec_kw={"height_ratios": heights}
    )
    ax_states, ax_caches, ax_flows = axes

    # 1. states and steps, two lanes per node (the first node on top)
    labels = []
    for index, node in enumerate(nodes):
        y_state = 2 * (len(nodes) - 1 - index) + 1
        y_steps = y_state - 1
        labels += [(y_state, f"{node.name} VRRP"), (y_steps, f"{node.name} steps")]
        for start, end, state in state_segments(node):
            ax_states.broken_barh(
                [(start - t0, end - start)],
                (y_state - 0.4, 0.8),
                facecolors=STATE_COLOURS.get(state, "#bdbdbd"),
            )
            mid = (max(start - t0, lo) + min(end - t0, hi)) / 2
            if min(end - t0, hi) - max(start - t0, lo) > 0.25 * (hi - lo) / 3.5:
                ax_states.text(
                    mid, y_state, state, ha="center", va="center", color="white", fontsize=8
                )
        rows = _step_rows(node, t0, lo, hi)
        for start, length, name in rows:
            ax_states.broken_barh(
                [(start, max(length, MIN_STEP_WIDTH))],
                (y_steps - 0.35, 0.7),
                facecolors=STEP_COLOURS.get(name, "#757575"),
            )
    ax_states.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize=8)
    ax_states.set_ylim(-0.6, 2 * len(nodes) - 0.4)
    seen_states = {state for node in nodes for _, _, state in state_segments(node)}
    seen_steps = {name for node in nodes for _, _, name in _step_rows(node, t0, lo, hi)}
    handles = [
        Patch(color=STATE_COLOURS[s], label=s) for s in STATE_COLOURS if s in seen_states
    ] + [Patch(color=STEP_COLOURS[s], label=s) for s in STEP_COLOURS if s in seen_steps]
    ax_states.legend(
        handles=handles, fontsize=7, ncol=min(len(handles), 6), loc="lower left",
        bbox_to_anchor=(0, 1.0), frameon=False,
    )  # fmt: skip

    # 2. cache sizes (thousands)
    colours = ["#616161", "#c62828", "#1565c0", "#2e7d32"]
    for index, node in enumerate(nodes):
        colour = colours[index % len(colours)]
        rel = [t - t0 for t in node.times]
        # steps-post: a value holds until the next sample (a busy agent answers late)
        ax_caches.plot(rel, [v / 1000 for v in node.internal], color=colour, lw=1.4,
                       ds="steps-post", label=f"{node.name} internal")  # fmt: skip
        ax_caches.plot(rel, [v / 1000 for v in node.external], color=colour, lw=1.4, ls="--",
                       ds="steps-post", label=f"{node.name} external")  # fmt: skip
        if not all(math.isnan(v) for v in node.kernel):
            ax_caches.plot(rel, [v / 1000 for v in node.kernel], color=colour, lw=1.0, ls=":",
                           ds="steps-post", label=f"{node.name} kernel table")  # fmt: skip
    ax_caches.set_ylabel("entries (k)", fontsize=8)
    ax_caches.legend(fontsize=7, ncol=3, loc="center left", frameon=False)
    ax_caches.grid(alpha=0.3)

    # 3. flows: a tick per echo, long gaps in red
    if flows:
        interval = float(flows.get("interval") or 0.05)
        keys = sorted(
            flows["echoes"], key=lambda k: (k.split(":")[0] != "tcp", int(k.split(":")[1]))
        )
        ticks = [[t - t0 for t in flows["echoes"][k] if lo - 1 <= t - t0 <= hi + 1] for k in keys]
        ax_flows.eventplot(ticks, colors="#9e9e9e", linelengths=0.7, linewidths=0.6)
        longest = 0.0
        for lane, key in enumerate(keys):
            for start, length in gaps(flows["echoes"][key], 3 * interval):
                ax_flows.broken_barh(
                    [(start - t0, length)], (lane - 0.35, 0.7), facecolors="#e53935"
                )
                if key.startswith("tcp:"):
                    longest = max(longest, length)
        n_tcp = sum(1 for k in keys if k.startswith("tcp:"))
        ticks_at, tick_text = [(n_tcp - 1) / 2], [f"TCP x{n_tcp}"]
        if len(keys) > n_tcp:
            ticks_at.append((n_tcp + len(keys) - 1) / 2)
            tick_text.append(f"UDP x{len(keys) - n_tcp}")
            ax_flows.axhline(n_tcp - 0.5, color="#424242", lw=0.5)
        ax_flows.set_yticks(ticks_at, tick_text, fontsize=7)
        ax_flows.set_ylim(-0.8, len(keys) - 0.2)
        ax_flows.set_ylabel(f"echoes every {interval * 1000:.0f} ms", fontsize=8)
        ax_flows.text(
            0.995, 0.02, f"red: no echo for > {3 * interval:.2f} s; longest TCP gap {longest:.3f}s",
            transform=ax_flows.transAxes, ha="right", va="bottom", fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "lw": 0},
        )  # fmt: skip
    else:
        ax_flows.set_visible(False)

    # vertical markers across the panels
    marks = _marks(events, t0)
    for ax in axes:
        for x, style, _ in marks:
            ax.axvline(x, color=style, lw=1.0, ls="-" if style == "black" else "--")
    for x, style, text in marks:
        ax_caches.text(x, 1.0, f" {text}", color=style, fontsize=7, va="top",
                       transform=ax_caches.get_xaxis_transform())  # fmt: skip
    ax_flows.set_xlim(lo, hi)
    axes[-1 if flows else 1].set_xlabel(
        "seconds from the master's death" if events and events.get("death") else "seconds"
    )
    notes = [note for node in nodes if (note := _steps_text(node, t0, lo, hi))]
    heading = title or _title(events)
    fig.suptitle(heading, fontsize=10, y=0.995)
    if notes:
        fig.text(0.99, 0.005, "; ".join(notes), ha="right", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.015, 1, 0.98))
    fig.savefig(out, dpi=90, pil_kwargs={"optimize": True})
    plt.close(fig)


def _origin(nodes: Sequence[Node], events: dict[str, Any] | None) -> float:
    if events and events.get("death"):
        return float(events["death"])
    starts = [
        float(tr["at"]) for n in nodes for tr in n.transitions.values() if tr.get("to") == "MASTER"
    ]
    if starts:
        return max(starts)
    return min((n.times[0] for n in nodes if n.times), default=0.0)


def _window(nodes: Sequence[Node], t0: float, flows: dict[str, Any] | None) -> tuple[float, float]:
    """From 0.5 s before the death to 0.5 s after the last flow's longest gap ended
    (1.5 s without flows), within the recording."""
    first = min((n.times[0] for n in nodes if n.times), default=t0) - t0
    last = max((n.times[-1] for n in nodes if n.times), default=t0) - t0
    end = 1.5
    if flows:
        interval = float(flows.get("interval") or 0.05)
        ends = [s + n for times in flows["echoes"].values() for s, n in gaps(times, 3 * interval)]
        if ends:
            end = max(end, max(ends) - t0 + 0.5)
    return max(first, -0.5), min(last, end)


def _marks(events: dict[str, Any] | None, t0: float) -> list[tuple[float, str, str]]:
    if not events:
        return []
    out = []
    if events.get("death"):
        out.append((float(events["death"]) - t0, "black", "fw1 killed"))
    if events.get("vips"):
        out.append((float(events["vips"]) - t0, "#2e7d32", "VIPs on fw2"))
    return out


def _title(events: dict[str, Any] | None) -> str:
    if not events:
        return "ctsync failover timeline"
    flows = events.get("flows") or {}
    head = (
        f"ctsync failover: {int(events.get('entries') or 0):,} synced entries,"
        f" VRRP adverts {float(events.get('advert') or 0.1) * 1000:.0f} ms"
    )
    if events.get("mode") == "inject":
        head += ", disable-external-cache"
    parts = []
    if events.get("vips") and events.get("death"):
        parts.append(f"death -> VIPs {float(events['vips']) - float(events['death']):.3f} s")
    if flows:
        parts.append(
            f"{flows.get('resets', 0)} resets, {flows.get('tcp_resumed')}/{flows.get('tcp_flows')}"
            f" TCP flows resumed, longest stall {float(flows.get('longest_gap') or 0):.3f} s,"
            f" {events.get('invalid_drops', 0)} packets dropped as INVALID"
        )
    return head + ("\n" + "; ".join(parts) if parts else "")


def _read_json(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def plot_run(run_dir: Path, out: Path, *, window: tuple[float, float] | None = None) -> None:
    """Plot a ``bench/failover_timeline.py`` results directory."""
    recordings = sorted(run_dir.glob("fw*.jsonl"))
    if not recordings:
        raise FileNotFoundError(f"{run_dir}: no fw*.jsonl recordings")
    plot(
        [load_recording(p) for p in recordings],
        _read_json(run_dir / "flows.json"),
        _read_json(run_dir / "events.json"),
        out,
        window=window,
    )


def _parse_window(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("inputs", nargs="+", type=Path, help="a results directory, or .jsonl files")
    parser.add_argument("--flows", type=Path, default=None, help="flows.json (echo times)")
    parser.add_argument("--events", type=Path, default=None, help="events.json (death, VIPs)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="PNG to write")
    parser.add_argument(
        "--window", type=_parse_window, default=None, metavar="FROM,TO",
        help="seconds from the death (default: -0.5 to 0.5 s after the flows resumed)",
    )  # fmt: skip
    args = parser.parse_args(list(argv) if argv is not None else None)
    inputs: list[Path] = args.inputs
    if len(inputs) == 1 and inputs[0].is_dir():
        out = args.out or inputs[0] / "failover-timeline.png"
        plot_run(inputs[0], out, window=args.window)
    else:
        out = args.out or inputs[0].with_suffix(".png")
        plot(
            [load_recording(p) for p in inputs],
            _read_json(args.flows),
            _read_json(args.events),
            out,
            window=args.window,
        )
    print(f"{out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
