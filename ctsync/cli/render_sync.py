"""Pure renderers for the sync commands: statistics, status, cache listings.

``show statistics`` keeps conntrackd's section names, labels and right-aligned columns
(operators grep for "Lost msgs"), as VyOS ``show conntrack-sync statistics`` prints them,
then adds ctsync's own sections below.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ctsync.core.gateway import status_lines
from ctsync.core.stats import CacheStats, Snapshot


def _cache_block(title: str, c: CacheStats) -> str:
    return (
        f"cache {title}:\n"
        f"current active connections:\t{c.active:12d}\n"
        f"connections created:\t\t{c.created:12d}\tfailed:\t{c.created_failed:12d}\n"
        f"connections updated:\t\t{c.updated:12d}\tfailed:\t{c.updated_failed:12d}\n"
        f"connections destroyed:\t\t{c.destroyed:12d}\tfailed:\t{c.destroyed_failed:12d}\n\n"
    )


def _inject_block(c: CacheStats) -> str:
    return (
        "external inject:\n"
        f"connections created:\t\t{c.created:12d}\tfailed:\t{c.created_failed:12d}\n"
        f"connections updated:\t\t{c.updated:12d}\tfailed:\t{c.updated_failed:12d}\n"
        f"connections destroyed:\t\t{c.destroyed:12d}\tfailed:\t{c.destroyed_failed:12d}\n\n"
    )


def render_statistics(s: Snapshot) -> str:
    """``conntrackd -s`` as VyOS shows it, then ctsync's additions."""
    out = ["\nMain Table Statistics:\n\n", _cache_block("internal", s.internal)]
    out.append(
        _inject_block(s.external) if s.external_inject else _cache_block("external", s.external)
    )
    out.append(
        f"traffic processed:\n{s.traffic_bytes:20d} Bytes      {s.traffic_packets:20d} Pckts\n\n"
    )
    link = s.active_link
    if link is not None:
        out.append(
            f"{link.kind} traffic (active device={link.device}):\n"
            f"{link.bytes_sent:20d} Bytes sent {link.bytes_received:20d} Bytes recv\n"
            f"{link.packets_sent:20d} Pckts sent {link.packets_received:20d} Pckts recv\n"
            f"{link.errors_send:20d} Error send {link.errors_receive:20d} Error recv\n\n"
        )
    out.append(f"message tracking:\n{s.malformed:20d} Malformed msgs {s.lost:20d} Lost msgs\n\n")
    sync = s.sync
    out.append(
        "sync protocol (ctsync):\n"
        f"{sync.get('auth_failed', 0):20d} Auth failures  {sync.get('replayed', 0):20d} Replayed\n"
        f"{sync.get('resent', 0):20d} Resent msgs    {sync.get('nacks_sent', 0):20d} NACKs sent\n"
        f"{sync.get('repairs_sent', 0):20d} Repairs sent   "
        f"{sync.get('repairs_requested', 0):20d} Repairs asked\n"
        f"{s.queue_entries:20d} Queued msgs    "
        f"{sync.get('queue_overflow', 0):20d} Queue overflow\n\n"
    )
    if s.peers:
        out.append("peers:\n")
        for p in s.peers:
            heard = (
                "never"
                if p.last_heard_seconds_ago is None
                else f"{p.last_heard_seconds_ago:.1f}s ago"
            )
            state = "up" if p.up else "down"
            extra = " resync-in-progress" if p.resync_in_progress else ""
            out.append(
                f"\tnode {p.node}: {state}{extra}, last heard {heard}, "
                f"{p.external_entries} entries, {p.lost} lost msgs\n"
            )
        out.append("\n")
    return "".join(out)


def render_status(status: dict[str, Any]) -> str:
    """VyOS ``show conntrack-sync status`` lines, plus peers, VRRP and the failover steps."""
    last = status.get("last_transition")
    lines = [
        "",
        f"sync-interface        : {', '.join(status['sync_interfaces'])}",
        f"failover-mechanism    : {status['failover_mechanism']}",
        f"last state transition : {_transition_line(last) if last else 'no transition yet!'}",
        f"ExpectationSync       : {status.get('expect_sync') or 'disabled'}",
        f"node-id               : {status['node_id']}",
        f"state                 : {status.get('state', 'n/a')}",
    ]
    for peer in status.get("peers", []):
        heard = peer.get("last_heard_seconds_ago")
        heard_text = "never" if heard is None else f"{heard:.1f}s ago"
        resync = " (resync in progress)" if peer["resync_in_progress"] else ""
        lines.append(
            f"peer {peer['node']:<17} : {'up' if peer['up'] else 'down'}{resync}, "
            f"last heard {heard_text}"
        )
    commit = status.get("last_commit")
    if commit:
        lines.append(
            f"last commit           : {commit['committed']} committed, {commit['failed']} failed "
            f"in {commit['seconds']:.3f}s"
        )
    vrrp = status.get("vrrp")
    if vrrp:
        lines.append(f"vrrp sync-group       : {vrrp.get('sync_group')} {vrrp.get('state')}")
        for inst in vrrp.get("instances", []):
            master = inst.get("master") or "-"
            problem = f" ({inst['problem']})" if inst.get("problem") else ""
            lines.append(
                f"vrrp {inst['name']:<16} : {inst['state']}, priority {inst['priority']},"
                f" master {master}{problem}"
            )
    lines.extend(status_lines(status.get("gateways") or []))
    transitions = (status.get("failover") or {}).get("transitions") or []
    if transitions:
        lines.append("")
        lines.append("Failover transitions (oldest first):")
        for item in transitions:
            lines.append(f"  {_transition_line(item)}")
            for step in item.get("steps", []):
                took = step.get("seconds")
                took_text = "running" if took is None else f"{took:.3f}s"
                error = f"  ERROR {step['error']}" if step.get("error") else ""
                lines.append(f"      {step['step']:<15} {took_text}{error}")
    return "\n".join(lines) + "\n"


def _transition_line(item: dict[str, Any]) -> str:
    import time

    when = time.strftime("%a %d %b %Y %I:%M:%S %p %Z", time.localtime(item["at"]))
    text = f"{item['to']} at {when}"
    if item.get("from"):
        text += f" (from {item['from']}"
        text += f", {item['reason']})" if item.get("reason") else ")"
    elif item.get("reason"):
        text += f" ({item['reason']})"
    if item.get("done") is not None:
        text += f", done in {item['done'] - item['at']:.3f}s"
    elif not item.get("skipped"):
        text += ", in progress"
    if item.get("skipped"):
        text += ", superseded"
    return text


def render_cache_lines(items: Sequence[dict[str, Any]]) -> str:
    """Cache entries (as ``entry_to_json`` gives them) in conntrack(8) line format; the
    benchmark harness's ext-dump reads these ``src= dst= sport= dport= ... mark=`` lines."""
    return "".join(conntrack_line(item) + "\n" for item in items)


def render_expect_lines(items: Sequence[dict[str, Any]]) -> str:
    """Expectations as ``conntrack -L expect`` prints them (timeout first)."""
    out = []
    for item in items:
        t, m = item["tuple"], item["master"]
        text = f"{item.get('timeout', 0)} proto={item['protocol_number']}"
        text += f" src={t['src']} dst={t['dst']}"
        if "sport" in t:
            text += f" sport={t['sport']} dport={t['dport']}"
        text += f" master-src={m['src']} master-dst={m['dst']}"
        if "sport" in m:
            text += f" sport={m['sport']} dport={m['dport']}"
        if item.get("helper"):
            text += f" helper={item['helper']}"
        if "peer" in item:
            text += f" peer={item['peer']}"
        out.append(text + "\n")
    return "".join(out)


def conntrack_line(item: dict[str, Any]) -> str:
    def tup(t: dict[str, Any]) -> str:
        text = f"src={t['src']} dst={t['dst']}"
        if "icmp_type" in t:
            return f"{text} type={t['icmp_type']} code={t['icmp_code']} id={t['icmp_id']}"
        if "sport" in t:
            return f"{text} sport={t['sport']} dport={t['dport']}"
        return text

    parts = [f"{item['protocol']:8} {item['protocol_number']}"]
    for proto in ("tcp", "sctp", "dccp"):
        if proto in item:
            parts.append(item[proto]["state"])
    parts.append(tup(item["original"]))
    flags = item.get("status_flags", [])
    if "SEEN_REPLY" not in flags:
        parts.append("[UNREPLIED]")
    if "reply" in item:
        parts.append(tup(item["reply"]))
    if "ASSURED" in flags:
        parts.append("[ASSURED]")
    parts.append(f"mark={item.get('mark', 0)}")
    if item.get("zone"):
        parts.append(f"zone={item['zone']}")
    if "peer" in item:
        parts.append(f"[peer {item['peer']}]")
    return " ".join(parts)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
