#!/usr/bin/env python3
"""ctsync ctnetlink benchmarks: live-event decode, failover commit side by side with
conntrackd, dump + reconcile, and cache memory.

Run as root from the project root::

    .venv/bin/python bench/ctnetlink_bench.py all --reps 3
    .venv/bin/python bench/ctnetlink_bench.py events --n 200000
    .venv/bin/python bench/ctnetlink_bench.py commit
    .venv/bin/python bench/ctnetlink_bench.py reconcile
    .venv/bin/python bench/ctnetlink_bench.py memory

Each benchmark prints a Markdown table (min / median / max over ``--reps``) and the run
writes its raw figures to ``bench/results/<timestamp>/results.json``.

Every kernel-facing step runs inside network namespaces created here, named
``ctsb<6 hex><role><k>`` (unique per run), which are deleted in every outcome; every
process started here is stopped by its PID. The load generator is the shared harness's
raw ctnetlink writer (``/work/shared/bench/conntrackd_bench.py writer``), and the commit
benchmark drives conntrackd through that harness's own topology, config and scenario-B
code, with the namespace and interface names swapped for this run's unique ones.

Subcommands whose name starts with ``_`` are workers this script runs inside a
namespace (``ip netns exec``); they talk to the parent with READY/GO lines and print
one JSON line as their result.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import errno
import gc
import importlib.util
import itertools
import json
import os
import secrets
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from ctsync.core import ctnetlink as nl  # noqa: E402
from ctsync.core import record  # noqa: E402
from ctsync.core.cache import Cache  # noqa: E402
from ctsync.core.entry import AF_INET, AF_INET6, CtTuple, Entry, TcpInfo  # noqa: E402

SHARED_HARNESS = Path("/work/shared/bench/conntrackd_bench.py")
THIS = Path(__file__).resolve()
PY = sys.executable
RESULTS_DIR = HERE / "results"
RUN_TAG = "ctsb" + secrets.token_hex(3)
MAX_IFNAME = 15

CT_RULESET = """table inet ctsb {
  chain pre {
    type filter hook prerouting priority 0; policy accept;
    ct state established accept
  }
}
"""
COUNT_PATH = "/proc/sys/net/netfilter/nf_conntrack_count"

Json = dict[str, Any]


# --- resources: namespaces and processes, released in every outcome ---------------------


class Resources:
    """Namespaces and child processes of this run; :meth:`close` releases them all."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.cleanups: list[Callable[[], None]] = []
        self._counter = itertools.count(1)

    def netns(self, role: str, ruleset: str = CT_RULESET) -> str:
        name = f"{RUN_TAG}{role}{next(self._counter)}"
        if len(name) > MAX_IFNAME:
            raise ValueError(f"namespace name {name!r} is longer than {MAX_IFNAME}")
        self.adopt_netns(name)
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "netns", "exec", name, "nft", "-f", "-"], input_text=ruleset)
        return name

    def adopt_netns(self, name: str) -> None:
        """Delete ``name`` at close (a namespace created by other code of this run)."""
        if name not in self.namespaces:
            self.namespaces.append(name)

    def delete_netns(self, name: str) -> None:
        if name in self.namespaces:
            self.namespaces.remove(name)
        if os.path.exists(f"/run/netns/{name}"):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def spawn(self, argv: Sequence[str], ns: str | None = None) -> subprocess.Popen[bytes]:
        # unbuffered binary pipes: select() on stdout then sees every line we have not read
        cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,
        )
        self.procs[proc.pid] = proc
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        """SIGTERM then SIGKILL, by PID (``ip netns exec`` execs, so it is the worker's)."""
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.procs.pop(proc.pid, None)

    def close(self) -> None:
        while self.cleanups:
            fn = self.cleanups.pop()
            try:
                fn()
            except Exception as exc:
                print(f"cleanup failed: {exc!r}", file=sys.stderr)
        for proc in list(self.procs.values()):
            self.stop(proc)
        for name in list(self.namespaces):
            self.delete_netns(name)


RES = Resources()


def run(
    argv: Sequence[str], *, input_text: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        list(argv), input=input_text, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def ns_count(ns: str) -> int:
    return int(run(["ip", "netns", "exec", ns, "cat", COUNT_PATH]).stdout)


def expect_line(proc: subprocess.Popen[bytes], prefix: str, timeout: float = 120) -> str:
    """Wait for a stdout line starting with ``prefix``; return the rest of it."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"timed out waiting for {prefix!r} from pid {proc.pid}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline().decode()
        if not line:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"pid {proc.pid} exited before {prefix!r}: {err[-2000:]}")
        if line.startswith(prefix):
            return line[len(prefix) :].strip()


def send_go(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> Json:
    """Wait for a worker (or the harness writer) and return its last stdout line as JSON."""
    try:
        raw_out, raw_err = proc.communicate(timeout=timeout)
    finally:
        RES.stop(proc)
    out, err = raw_out.decode(), raw_err.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"pid {proc.pid} failed rc={proc.returncode}: {err[-3000:]}")
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    result: Json = json.loads(lines[-1])
    return result


def emit(tag: str, obj: Json | None = None) -> None:
    """A control line (``READY {...}``) or, with an empty tag, the JSON result line."""
    if obj is None:
        print(tag, flush=True)
    else:
        print(f"{tag} {json.dumps(obj)}" if tag else json.dumps(obj), flush=True)


def wait_go() -> None:
    sys.stdin.readline()


def make_cache(digest: bool) -> Cache:
    """The internal cache as the agent builds it (ctsync/agent.py keeps a digest), or bare."""
    return Cache("internal", digest=digest) if digest else Cache("internal")


def digest_flag(args: argparse.Namespace) -> list[str]:
    return ["--digest"] if args.digest else []


def writer_argv(n: int, *, wait_go_flag: bool, cpu: int | None) -> list[str]:
    argv = [PY, str(SHARED_HARNESS), "writer", "--mode", "fill", "--n", str(n)]
    argv += ["--family", "4", "--timeout", "3600", "--batch", "256"]
    if wait_go_flag:
        argv.append("--wait-go")
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    return argv


def fill_namespace(ns: str, n: int) -> Json:
    """Insert n harness-writer entries (TCP ESTABLISHED 192.0.2.x -> 203.0.113.y:80)."""
    wr = finish(RES.spawn(writer_argv(n, wait_go_flag=False, cpu=None), ns=ns))
    if wr.get("errors"):
        raise RuntimeError(f"writer errors: {wr['errors']}")
    return wr


_HARNESS: ModuleType | None = None


def harness() -> ModuleType:
    """The shared conntrackd harness as a module (stdlib only; never modified)."""
    global _HARNESS  # noqa: PLW0603
    if _HARNESS is None:
        spec = importlib.util.spec_from_file_location("conntrackd_bench", SHARED_HARNESS)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot load {SHARED_HARNESS}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["conntrackd_bench"] = mod
        spec.loader.exec_module(mod)
        _HARNESS = mod
    return _HARNESS


# --- statistics and tables ------------------------------------------------------------------


def values(rows: Iterable[Json], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def med(vals: Sequence[float]) -> float | None:
    return statistics.median(vals) if vals else None


def mmm(vals: Sequence[float], fmt: str = "{:.3f}") -> str:
    if not vals:
        return "n/a"
    lo, mid, hi = min(vals), statistics.median(vals), max(vals)
    if lo == hi:
        return fmt.format(mid)
    return " / ".join(fmt.format(v) for v in (lo, mid, hi))


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def cpus_for(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(listener CPU, writer CPU), or (None, None) when pinning is off or impossible."""
    if args.no_pin or (os.cpu_count() or 1) < 2:
        return None, None
    return args.listener_cpu, args.writer_cpu


# --- 1. events ----------------------------------------------------------------------------

EVENT_MODES = (
    ("kt", "live"),
    ("kt", "queued"),
    ("decode", "live"),
    ("decode", "queued"),
    ("recv", "queued"),
)
PIPELINE_TEXT = {
    "kt": "full: KernelTable.read_events (recv+parse+cache)",
    "decode": "decode: recv + parse_ct",
    "recv": "recv only (kernel + syscall)",
}


def events_rep(args: argparse.Namespace, pipeline: str, timing: str, n: int, rep: int) -> Json:
    lcpu, wcpu = cpus_for(args)
    ns = RES.netns("ev")
    try:
        argv = [PY, str(THIS), "_listener", "--pipeline", pipeline, "--timing", timing]
        argv += ["--n", str(n), "--rcvbuf", str(args.rcvbuf), *digest_flag(args)]
        if lcpu is not None:
            argv += ["--cpu", str(lcpu)]
        if pipeline == "decode" and timing == "queued":
            argv.append("--offline")
        listener = RES.spawn(argv, ns=ns)
        ready = json.loads(expect_line(listener, "READY"))
        writer = RES.spawn(writer_argv(n, wait_go_flag=True, cpu=wcpu), ns=ns)
        expect_line(writer, "READY")
        if timing == "live":
            send_go(listener)
            expect_line(listener, "STARTED")
            send_go(writer)
            wr = finish(writer)
            lr = finish(listener)
        else:
            send_go(writer)
            wr = finish(writer)
            time.sleep(0.2)
            send_go(listener)
            lr = finish(listener)
        kernel = ns_count(ns)
    finally:
        RES.delete_netns(ns)
    received = lr["received"]
    wall_start = wr["t_start"] if timing == "live" else lr["t0"]
    res: Json = {
        "pipeline": pipeline,
        "timing": timing,
        "rep": rep,
        "n": n,
        "kernel_count": kernel,
        "rcvbuf_effective": ready["buffer_size"],
        "writer_s": wr["t_end"] - wr["t_start"],
        "writer_rate": wr["rate"],
        "writer_errors": wr["errors"],
        "loadavg": loadavg(),
        **lr,
        "lost": n - received,
        "events_per_cpu_s": received / lr["cpu_s"] if lr["cpu_s"] > 0 else None,
        "wall_s": lr["t_last"] - wall_start,
        "events_per_wall_s": received / max(lr["t_last"] - wall_start, 1e-9),
        "lag_after_writer_s": lr["t_last"] - wr["t_end"],
        "us_per_event_cpu": 1e6 * lr["cpu_s"] / received if received else None,
    }
    log(
        f"events {pipeline}/{timing} rep {rep}: received {received}/{n} overrun "
        f"{lr['overrun']} cpu {lr['cpu_s']:.3f}s -> {res['events_per_cpu_s'] or 0:,.0f}/cpu-s, "
        f"wall {res['events_per_wall_s']:,.0f}/s, writer {wr['rate']:,.0f}/s"
    )
    return res


def bench_events(args: argparse.Namespace) -> Json:
    rows: list[Json] = []
    for rep in range(1, args.reps + 1):
        for pipeline, timing in EVENT_MODES:
            n = args.n if timing == "live" else args.queued_n
            rows.append(events_rep(args, pipeline, timing, n, rep))
    return {
        "rows": rows,
        "rcvbuf_requested": args.rcvbuf,
        "cpus": cpus_for(args),
        "digest": args.digest,
    }


def render_events(res: Json) -> str:
    rows = res["rows"]
    out = [
        "### events: listener vs. a raw ctnetlink writer burst (NEW events, TCP v4)",
        "",
        f"Cache: `Cache('internal'{', digest=True' if res.get('digest') else ''})`. "
        f"Listener rcvbuf requested {res['rcvbuf_requested'] >> 20} MiB "
        f"(SO_RCVBUFFORCE; effective {rows[0]['rcvbuf_effective'] >> 20} MiB); "
        f"listener CPU / writer CPU pinning: {res['cpus']}.",
        "",
    ]
    body = []
    for pipeline, timing in EVENT_MODES:
        rs = [r for r in rows if r["pipeline"] == pipeline and r["timing"] == timing]
        if not rs:
            continue
        body.append(
            [
                PIPELINE_TEXT[pipeline],
                timing,
                f"{rs[0]['n']:,}",
                mmm(values(rs, "received"), "{:.0f}"),
                mmm(values(rs, "lost"), "{:.0f}"),
                mmm(values(rs, "overrun"), "{:.0f}"),
                mmm(values(rs, "cpu_s")),
                mmm(values(rs, "us_per_event_cpu"), "{:.2f}"),
                mmm(values(rs, "events_per_cpu_s"), "{:,.0f}"),
                mmm(values(rs, "events_per_wall_s"), "{:,.0f}"),
                mmm(values(rs, "writer_rate"), "{:,.0f}"),
            ]
        )
    out.append(
        table(
            [
                "pipeline",
                "timing",
                "N",
                "received",
                "lost",
                "ENOBUFS",
                "listener CPU s",
                "µs CPU/event",
                "events per CPU-s",
                "events/s wall",
                "writer inserts/s",
            ],
            body,
        )
    )
    off = [r["offline"] for r in rows if r.get("offline")]
    if off:
        full_label = "digest" if off[0].get("digest") else "no digest"
        out += [
            "",
            "Offline split over the captured event messages (no kernel, no syscalls; best of "
            "3 passes per rep):",
            "",
            table(
                [
                    "messages",
                    "mean bytes",
                    "parse_ct µs/event (decode only)",
                    "Cache.update µs/event (no digest)",
                    "Cache.update µs/event (digest, as the agent)",
                    f"walk+parse+update µs/event ({full_label})",
                ],
                [
                    [
                        mmm(values(off, "messages"), "{:.0f}"),
                        mmm(values(off, "mean_bytes"), "{:.0f}"),
                        mmm(values(off, "parse_us"), "{:.2f}"),
                        mmm(values(off, "update_us"), "{:.2f}"),
                        mmm(values(off, "update_digest_us"), "{:.2f}"),
                        mmm(values(off, "full_us"), "{:.2f}"),
                    ]
                ],
            ),
        ]
    live = [r for r in rows if r["pipeline"] == "kt" and r["timing"] == "live"]
    decode = [r for r in rows if r["pipeline"] == "decode" and r["timing"] == "live"]
    rate = med(values(live, "events_per_cpu_s"))
    drate = med(values(decode, "events_per_cpu_s"))
    lost = sum(r["lost"] + r["overrun"] for r in live)
    if rate is not None:
        verdict = "PASS" if rate >= 150_000 and lost == 0 else "FAIL"
        out += [
            "",
            f"Target (>= 150,000 events/s on one core, no loss, 64 MB buffer): full pipeline "
            f"live median {rate:,.0f} events per CPU-second, {lost} lost over {len(live)} "
            f"reps -> **{verdict}**"
            + (f" (decode alone, recv+parse_ct live: {drate:,.0f}/CPU-s)" if drate else ""),
        ]
    return "\n".join(out)


# listener worker (runs inside the namespace) ------------------------------------------------


def worker_listener(a: argparse.Namespace) -> None:
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    if a.pipeline == "kt" and a.timing == "live":
        result = asyncio.run(_kt_live(a))
    elif a.pipeline == "kt":
        result = _kt_queued(a)
    else:
        result = _raw_listener(a)
    emit("", result)


async def _kt_live(a: argparse.Namespace) -> Json:
    from ctsync.io.netlink import KernelTable

    cache = make_cache(a.digest)
    kt = KernelTable(cache, rcvbuf=a.rcvbuf, rcvbuf_max=a.rcvbuf)
    await kt.start()  # empty table: the initial dump is trivial
    emit("READY", {"buffer_size": _rcvbuf_of(kt.fileno)})
    wait_go()  # nothing is queued yet, so blocking the loop here is harmless
    t0 = time.monotonic()
    c0 = time.process_time()
    emit("STARTED")
    last = 0
    t_last, c_last = t0, c0
    while True:
        await asyncio.sleep(0.002)
        got = kt.stats.events_received
        now = time.monotonic()
        if got != last:
            last, t_last, c_last = got, now, time.process_time()
        if got >= a.n or now - t_last > a.idle_timeout:
            break
    res = _kt_result(kt, cache, t0, t_last, c_last - c0)
    kt.close()
    return res


def _kt_queued(a: argparse.Namespace) -> Json:
    from ctsync.io.netlink import KernelTable

    cache = make_cache(a.digest)
    kt = KernelTable(cache, rcvbuf=a.rcvbuf, rcvbuf_max=a.rcvbuf)
    emit("READY", {"buffer_size": _rcvbuf_of(kt.fileno)})
    wait_go()
    t0 = time.monotonic()
    c0 = time.process_time()
    while kt.stats.events_received < a.n:
        if kt.read_events() == 0:
            ready, _, _ = select.select([kt.fileno], [], [], a.idle_timeout)
            if not ready:
                break
    t1 = time.monotonic()
    res = _kt_result(kt, cache, t0, t1, time.process_time() - c0)
    kt.close()
    return res


def _rcvbuf_of(fd: int) -> int:
    """SO_RCVBUF as the kernel reports it (twice the requested size), for any fd."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        size: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return size


def _kt_result(kt: Any, cache: Cache, t0: float, t_last: float, cpu: float) -> Json:
    st = kt.stats
    return {
        "received": st.events_received,
        "overrun": st.netlink_overrun,
        "catch_event_failed": st.catch_event_failed,
        "cache_len": len(cache),
        "buffer_size_end": st.buffer_size,
        "t0": t0,
        "t_last": t_last,
        "cpu_s": cpu,
    }


def _raw_listener(a: argparse.Namespace) -> Json:
    """recv (+ parse_ct) on a plain event socket, the same loop shape as read_events."""
    from ctsync.io.netlink import CT_GROUPS, open_socket

    sock = open_socket(CT_GROUPS, a.rcvbuf)
    sock.setblocking(False)
    emit("READY", {"buffer_size": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)})
    if a.timing == "live":
        wait_go()
        emit("STARTED")
    else:
        wait_go()
    decode = a.pipeline == "decode"
    capture: list[bytes] | None = [] if a.offline else None
    buf = bytearray(1 << 17)
    unpack_hdr = struct.Struct("=IHHII").unpack_from
    parse = record.parse_ct
    ct_new, ct_del = nl.CT_NEW, nl.CT_DELETE
    received = overrun = failed = 0
    t0 = time.monotonic()
    c0 = time.process_time()
    t_last, c_last = t0, c0
    fd = sock.fileno()
    while received < a.n:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            t_last, c_last = time.monotonic(), time.process_time()
            ready, _, _ = select.select([fd], [], [], a.idle_timeout)
            if not ready:
                break
            continue
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                overrun += 1
                continue
            raise
        if capture is not None:
            capture.append(bytes(buf[:n]))
        off = 0
        while off + 16 <= n:
            mlen, mtype, _f, _s, _p = unpack_hdr(buf, off)
            if mlen < 16 or off + mlen > n:
                failed += 1
                break
            received += 1
            if decode and mtype in (ct_new, ct_del):
                parse(buf, off + 20, off + mlen)
            off += (mlen + 3) & ~3
    if received >= a.n:
        t_last, c_last = time.monotonic(), time.process_time()
    sock.close()
    res: Json = {
        "received": received,
        "overrun": overrun,
        "catch_event_failed": failed,
        "cache_len": None,
        "t0": t0,
        "t_last": t_last,
        "cpu_s": c_last - c0,
    }
    if capture:
        res["offline"] = offline_decode(capture, a.digest)
    return res


def offline_decode(datagrams: list[bytes], digest: bool) -> Json:
    """Time parse_ct alone, Cache.update alone and the whole in-process path over captured
    event messages (best of 3 passes each)."""
    msgs: list[tuple[bytes, int, int]] = []
    for dg in datagrams:
        for mtype, _f, _s, _p, start, end in nl.iter_messages(dg):
            if mtype == nl.CT_NEW:
                msgs.append((dg, start + nl.NFGEN_HDRLEN, end))
    parse = record.parse_ct
    count = len(msgs)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    def parse_all() -> list[record.Parsed]:
        return [parse(b, s, e) for b, s, e in msgs]

    parts = parse_all()
    parse_s = best(parse_all)

    def update_all(digest: bool) -> None:
        cache = make_cache(digest)
        upd = cache.update
        for p in parts:
            upd(p)

    update_s = best(lambda: update_all(False))
    update_digest_s = best(lambda: update_all(True))
    unpack_hdr = struct.Struct("=IHHII").unpack_from

    def full() -> None:
        cache = make_cache(digest)
        upd = cache.update
        for dg in datagrams:
            off = 0
            n = len(dg)
            while off + 16 <= n:
                mlen, mtype, _f, _s, _p = unpack_hdr(dg, off)
                if mtype == nl.CT_NEW:
                    upd(parse(dg, off + 20, off + mlen))
                off += (mlen + 3) & ~3

    full_s = best(full)
    return {
        "messages": count,
        "mean_bytes": sum(e - s + 20 for _b, s, e in msgs) / max(count, 1),
        "parse_us": 1e6 * parse_s / max(count, 1),
        "update_us": 1e6 * update_s / max(count, 1),
        "update_digest_us": 1e6 * update_digest_s / max(count, 1),
        "digest": digest,
        "full_us": 1e6 * full_s / max(count, 1),
    }


# --- 2. commit ----------------------------------------------------------------------------


def harness_entry(i: int) -> Entry:
    """The entry the harness writer makes for index i, as ctsync would cache it."""
    _fam, src, dst, sport, dport = harness().key_fields(i, 4)
    orig = CtTuple(AF_INET, 6, src, dst, sport, dport)
    return Entry(
        orig,
        orig.inverted(),
        status=0x2 | 0x4 | 0x8,  # SEEN_REPLY | ASSURED | CONFIRMED
        timeout=3600,
        mark=0,
        protoinfo=TcpInfo(3),  # ESTABLISHED, as the writer sets it
    )


def configure_harness(out: Path) -> Any:
    """Point the shared harness at this run's unique names and its own state file."""
    cb: Any = harness()
    cb.NS = (f"{RUN_TAG}f1", f"{RUN_TAG}f2")
    cb.IFACES = (f"{RUN_TAG}s1", f"{RUN_TAG}s2")
    if '"bzsync*"' not in cb.NFT_RULES:
        raise RuntimeError("harness NFT_RULES changed: cannot rename the sync interfaces")
    cb.NFT_RULES = cb.NFT_RULES.replace('"bzsync*"', f'"{RUN_TAG}s*"')
    cb.STATE_FILE = str(out / "conntrackd-harness-state.json")
    for name in cb.NS:
        RES.adopt_netns(name)
    return cb


def harness_args(out: Path) -> argparse.Namespace:
    """The harness's `run` defaults (conntrackd_bench.py run -h) that Bench reads."""
    return argparse.Namespace(
        results=str(out / "conntrackd"),
        family="4",
        entry_timeout=3600,
        batch=256,
        timeout=180.0,
        poll_interval=0.002,
        settle=1.0,
        cpu_settle=1.0,
        pin_daemons=None,
        pin_writer=None,
        keep_topology=False,
        no_poll_fw1=False,
        conntrackd="conntrackd",
        conntrackd_conf_template=None,
        ct_hashsize=32768,
        ct_hashlimit=1048576,
        ct_nl_buf=2097152,
        ct_nl_buf_max=8388608,
        ct_overrun_resync="On",
        ct_sock_buf=1249280,
        ct_resend_queue=131072,
    )


def conntrackd_bench(cb: ModuleType, hargs: argparse.Namespace) -> Any:
    class CommitOnlyConntrackd(cb.ConntrackdDaemon):  # type: ignore[name-defined,misc]
        """Scenario B without B2 (-f/-R/-B): only `conntrackd -c` is compared here."""

        def promote_steps(self, node: Any) -> list[Any]:
            return []

    bench = cb.Bench(hargs, CommitOnlyConntrackd(hargs))

    def shutdown() -> None:
        for node in bench.nodes:
            if node.kcount:
                node.kcount.close()
                node.kcount = None
        bench.shutdown()
        shutil.rmtree(bench.workdir, ignore_errors=True)

    RES.cleanups.append(shutdown)
    return bench, shutdown


COMMIT_VARIANTS = ("paused", "pool", "unpaused")


def ctsync_commit_rep(args: argparse.Namespace, ruleset: str, variant: str, rep: int) -> Json:
    ns = RES.netns("cc", ruleset)
    try:
        argv = [PY, str(THIS), "_commit", "--n", str(args.n), "--variant", variant]
        argv += digest_flag(args)
        worker = RES.spawn(argv, ns=ns)
        expect_line(worker, "READY")
        send_go(worker)
        res = finish(worker)
        res["kernel_count_after"] = ns_count(ns)
    finally:
        RES.delete_netns(ns)
    res.update(rep=rep, variant=variant, loadavg=loadavg())
    log(
        f"commit ctsync/{variant} rep {rep}: commit_records {res['commit_s']:.3f}s, kernel "
        f"holds N {res['kernel_full_s']:.3f}s, failed {res['failed']}, overrun "
        f"{res['overrun']}, cache {res['cache_len']}"
    )
    return res


def bench_commit(args: argparse.Namespace, out: Path) -> Json:
    cb = configure_harness(out)
    hargs = harness_args(out)
    bench, shutdown = conntrackd_bench(cb, hargs)
    ctd: list[Json] = []
    cs: list[Json] = []
    try:
        bench.setup()
        for rep in range(1, args.reps + 1):
            bench.fresh()
            bench.fill(args.n)
            time.sleep(hargs.settle)
            rb = bench.scenario_b(args.n, rep)
            rb.pop("series", None)
            rb["counters"] = {k: v for k, v in rb["counters"].items() if k == "fw2"}
            ctd.append(rb)
            # same global state for ctsync as conntrackd had during its commit: fw1 holds N,
            # fw2 is empty (the conntrack hash table is shared by all namespaces, so every
            # entry elsewhere lengthens the chains an insert walks)
            fw2 = bench.nodes[1]
            cb.kernel_flush(fw2.ns)
            if fw2.kcount.read_int() != 0:
                raise RuntimeError("fw2 not empty after flush")
            for variant in COMMIT_VARIANTS:
                cs.append(ctsync_commit_rep(args, cb.NFT_RULES, variant, rep))
    finally:
        RES.cleanups.remove(shutdown)
        shutdown()
    return {
        "n": args.n,
        "conntrackd": ctd,
        "ctsync": cs,
        "conntrackd_dir": bench.out,
        "conntrackd_version": bench.results["meta"].get("daemon"),
        "digest": args.digest,
    }


def render_commit(res: Json) -> str:
    ctd, cs = res["conntrackd"], res["ctsync"]
    paused = [r for r in cs if r["variant"] == "paused"]
    pool = [r for r in cs if r["variant"] == "pool"]
    unpaused = [r for r in cs if r["variant"] == "unpaused"]
    n = res["n"]
    rows = [
        [
            "conntrackd 1.4.7 `-c` (harness scenario B, fw2)",
            mmm(values(ctd, "commit_cmd_s")),
            mmm(values(ctd, "kernel_full_s")),
            mmm(values(ctd, "daemon_reported_commit_s")),
            mmm(values(ctd, "cpu_fw2_commit_s")),
            mmm(values(ctd, "kernel_final"), "{:.0f}"),
            mmm(values(ctd, "fw2_nl_overrun_after_commit"), "{:.0f}") + " fw2 overrun",
        ]
    ]
    for label, rs in (
        ("ctsync `Committer.commit_records` in `events_paused()`", paused),
        ("ctsync `CommitPool` (2 processes, as the agent) in `events_paused()`", pool),
        ("ctsync `Committer.commit_records`, listener subscribed", unpaused),
    ):
        if not rs:
            continue
        rows.append(
            [
                label,
                mmm(values(rs, "block_s")),
                mmm(values(rs, "kernel_full_s")),
                mmm(values(rs, "commit_s")),
                mmm(values(rs, "cpu_s")),
                mmm(values(rs, "kernel_count_after"), "{:.0f}"),
                f"build alone {mmm(values(rs, 'build_only_s'))} s; "
                f"failed {mmm(values(rs, 'failed'), '{:.0f}')}; ENOBUFS "
                f"{mmm(values(rs, 'overrun'), '{:.0f}')}; cache holds N after "
                f"{mmm(values(rs, 'cache_full_s'))} s",
            ]
        )
    out = [
        f"### commit: {n:,} entries into an empty table (TCP ESTABLISHED v4, no NAT)",
        "",
        f"KernelTable cache: `Cache('internal'{', digest=True' if res.get('digest') else ''})`.",
        "",
        table(
            [
                "committer",
                "returns s",
                "kernel holds N s",
                "own figure s",
                "CPU s",
                "kernel count",
                "notes",
            ],
            rows,
        ),
        "",
        "returns = conntrackd: `ip netns exec fw2 conntrackd -c` exits; ctsync: the "
        "`with kt.events_paused(): commit_records()` block exits (includes leaving/re-joining "
        "the groups), or `commit_records` returns. own figure = conntrackd's logged "
        '"commit has taken"; ctsync\'s `CommitResult.seconds`. cache holds N = until the '
        "KernelTable's cache equals the table again (the reconcile events_paused schedules, "
        "or draining our own events).",
    ]
    c_med = med(values(ctd, "kernel_full_s"))
    p_med = med(values(paused, "kernel_full_s"))
    o_med = med(values(pool, "kernel_full_s"))
    u_med = med(values(unpaused, "kernel_full_s"))
    if c_med and p_med:
        best = min(x for x in (p_med, o_med) if x is not None)
        verdict = "PASS" if best <= 0.5 * c_med else "FAIL"
        out += [
            "",
            f"Ratio ctsync/conntrackd (median time until the kernel holds N): Committer "
            f"paused {p_med / c_med:.2f}"
            + (f", CommitPool paused {o_med / c_med:.2f}" if o_med else "")
            + (f", Committer without events_paused {u_med / c_med:.2f}" if u_med else "")
            + f". Target (<= 0.5 x conntrackd) -> **{verdict}**",
        ]
    return "\n".join(out)


# commit worker (inside a namespace) ----------------------------------------------------------


def worker_commit(a: argparse.Namespace) -> None:
    emit("", asyncio.run(_commit_main(a)))


async def _wait_reconciled(kt: Any, before: int, timeout: float = 60) -> float:
    deadline = time.perf_counter() + timeout
    while kt.stats.resync_with_kernel_table == before:
        if time.perf_counter() > deadline:
            raise RuntimeError("the scheduled reconcile did not run")
        await asyncio.sleep(0.001)
    return time.perf_counter()


async def _commit_main(a: argparse.Namespace) -> Json:
    from ctsync.io.netlink import Committer, KernelTable, count_entries

    pool: Any = None
    if a.variant == "pool":
        from ctsync.io.commit_pool import CommitPool

        pool = CommitPool()  # forks its worker first thing, as the agent does
    records = [record.from_entry(harness_entry(i)) for i in range(a.n)]
    committer = pool.local if pool is not None else Committer()
    cache = make_cache(a.digest)
    kt = KernelTable(cache, own_portids=[committer.portid])  # agent defaults (8 MiB)
    await kt.start()
    emit("READY")
    wait_go()
    resyncs = kt.stats.resync_with_kernel_table
    c0 = time.process_time()
    t0 = time.perf_counter()
    if a.variant in ("paused", "pool"):
        with kt.events_paused():
            res = (pool or committer).commit_records(records)
            t_commit = time.perf_counter()
        t_block = time.perf_counter()
    else:
        res = committer.commit_records(records)
        t_commit = t_block = time.perf_counter()
    cpu = time.process_time() - c0
    while count_entries() < a.n and time.perf_counter() - t0 < 30:
        pass
    t_kernel = time.perf_counter()
    # afterwards: bring the cache back to the table, as the agent would
    if a.variant in ("paused", "pool"):
        t_cache = await _wait_reconciled(kt, resyncs)
    else:
        while kt.read_events():
            pass
        if kt.stats.netlink_overrun:
            t_cache = await _wait_reconciled(kt, resyncs)
        else:
            t_cache = time.perf_counter()
    # the Python side alone: build every CT_NEW message without sending it
    from ctsync.core.commit import COMMIT_FLAGS, commit_message_positional

    t = time.perf_counter()
    for k, v in records:
        commit_message_positional(k, v, 1, None, COMMIT_FLAGS, True)
    build_s = time.perf_counter() - t
    out = {
        "n": a.n,
        "build_only_s": build_s,
        "attempted": res.attempted,
        "committed": res.committed,
        "failed": res.failed,
        "errors": dict(res.errors),
        "commit_s": t_commit - t0,
        "block_s": t_block - t0,
        "kernel_full_s": t_kernel - t0,
        "cache_full_s": t_cache - t0,
        "result_seconds": res.seconds,
        "cpu_s": cpu,
        "overrun": kt.stats.netlink_overrun,
        "events_received": kt.stats.events_received,
        "events_own": kt.stats.events_own,
        "buffer_size": kt.stats.buffer_size,
        "cache_len": len(cache),
    }
    kt.close()
    if pool is not None:
        pool.close()
    else:
        committer.close()
    return out


# --- 3. reconcile -------------------------------------------------------------------------


def bench_reconcile(args: argparse.Namespace) -> Json:
    rows = []
    for rep in range(1, args.reps + 1):
        ns = RES.netns("rc")
        try:
            wr = fill_namespace(ns, args.n)
            argv = [PY, str(THIS), "_reconcile", "--n", str(args.n)]
            argv += ["--delete-every", str(args.delete_every), "--rcvbuf", str(args.rcvbuf)]
            argv += digest_flag(args)
            res = finish(RES.spawn(argv, ns=ns))
        finally:
            RES.delete_netns(ns)
        res.update(rep=rep, fill_s=wr["t_end"] - wr["t_start"], loadavg=loadavg())
        log(
            f"reconcile rep {rep}: start {res['start_s']:.3f}s steady {res['steady_s']:.3f}s "
            f"sweep {res['sweep_s']:.3f}s removed {res['sweep_removed']} equal {res['equal']}"
        )
        rows.append(res)
    return {"n": args.n, "rows": rows, "digest": args.digest}


def render_reconcile(res: Json) -> str:
    rows = res["rows"]
    n = res["n"]
    eq = sum(1 for r in rows if r["equal"])
    body = [
        ["dump, recv + message walk only", mmm(values(rows, "dump_recv_s")), "", ""],
        ["dump + parse_ct (no cache)", mmm(values(rows, "dump_parse_s")), "", ""],
        [
            "`await kt.start()`: dump into an empty cache",
            mmm(values(rows, "start_s")),
            mmm(values(rows, "start_cpu_s")),
            f"cache {mmm(values(rows, 'start_cache_len'), '{:.0f}')}",
        ],
        [
            "`await kt.reconcile()`, cache already full",
            mmm(values(rows, "steady_s")),
            mmm(values(rows, "steady_cpu_s")),
            f"removed {mmm(values(rows, 'steady_removed'), '{:.0f}')}; counted UPDATED "
            f"{mmm(values(rows, 'steady_updated'), '{:.0f}')}",
        ],
        [
            "reconcile after 10% deleted behind the cache",
            mmm(values(rows, "sweep_s")),
            "",
            f"removed {mmm(values(rows, 'sweep_removed'), '{:.0f}')}; cache == fresh dump "
            f"in {eq}/{len(rows)} reps",
        ],
    ]
    med_rec = med(values(rows, "steady_s"))
    med_start = med(values(rows, "start_s"))
    med_sweep = med(values(rows, "sweep_s"))
    worst = max(x for x in (med_rec, med_start, med_sweep) if x is not None)
    runs = [*values(rows, "start_s"), *values(rows, "steady_s"), *values(rows, "sweep_s")]
    over = sum(1 for x in runs if x >= 1.0)
    verdict = "PASS" if worst < 1.0 and eq == len(rows) else "FAIL"
    if verdict == "PASS" and over:
        verdict = f"PASS on medians; {over} of {len(runs)} single runs took >= 1 s"
    return "\n".join(
        [
            f"### reconcile: dump + mark-and-sweep of a {n:,}-entry table",
            "",
            f"Cache: `Cache('internal'{', digest=True' if res.get('digest') else ''})`.",
            "",
            table(["step", "wall s", "CPU s", "result"], body),
            "",
            "The sweep row is the reconcile `events_paused()` schedules on exit "
            "(`stats.last_reconcile_seconds`), after `delete_many` removed every 10th entry "
            "with the event groups left.",
            "",
            f"Target (dump + reconcile of {n:,} entries under 1 s): slowest median "
            f"{worst:.3f} s (start, steady, sweep) -> **{verdict}**",
        ]
    )


def worker_reconcile(a: argparse.Namespace) -> None:
    emit("", asyncio.run(_reconcile_main(a)))


async def _reconcile_main(a: argparse.Namespace) -> Json:
    from ctsync.io.netlink import Committer, KernelTable, count_entries, iter_dump, open_socket

    kernel = count_entries()
    if kernel != a.n:
        raise RuntimeError(f"kernel holds {kernel}, expected {a.n}")
    parse = record.parse_ct
    with open_socket(rcvbuf=4 << 20) as sock:
        t = time.perf_counter()
        dumped = dump_bytes = 0
        for _b, _mt, s_, e_ in iter_dump(sock):
            dumped += 1
            dump_bytes += e_ - s_ + nl.PAYLOAD_OFFSET
        dump_recv_s = time.perf_counter() - t
        t = time.perf_counter()
        for buf, _mt, s, e in iter_dump(sock):
            parse(buf, s, e)
        dump_parse_s = time.perf_counter() - t
    committer = Committer()
    cache = make_cache(a.digest)
    kt = KernelTable(cache, rcvbuf=a.rcvbuf, own_portids=[committer.portid])
    c0, t0 = time.process_time(), time.perf_counter()
    await kt.start()
    start_s, start_cpu = time.perf_counter() - t0, time.process_time() - c0
    start_len = len(cache)
    updated0 = cache.counters.updated
    c0, t0 = time.process_time(), time.perf_counter()
    steady_removed = await kt.reconcile()
    steady_s, steady_cpu = time.perf_counter() - t0, time.process_time() - c0
    steady_updated = cache.counters.updated - updated0
    # delete every k-th entry with the event groups left: the cache keeps stale entries
    # until the reconcile that events_paused() schedules on exit sweeps them
    targets = [record.decode_key(k) for k in cache.keys()[:: a.delete_every]]
    resyncs = kt.stats.resync_with_kernel_table
    t0 = time.perf_counter()
    with kt.events_paused():
        deleted, failed = committer.delete_many(targets)
        stale = len(cache) - count_entries()
    await _wait_reconciled(kt, resyncs)
    sweep_wall = time.perf_counter() - t0
    with open_socket(rcvbuf=4 << 20) as sock:
        fresh = {parse(b, s, e)[0] for b, mt, s, e in iter_dump(sock) if mt == nl.CT_NEW}
    keys = set(cache.keys())
    out = {
        "n": a.n,
        "dumped": dumped,
        "dump_recv_s": dump_recv_s,
        "dump_parse_s": dump_parse_s,
        "start_s": start_s,
        "start_cpu_s": start_cpu,
        "start_cache_len": start_len,
        "steady_s": steady_s,
        "steady_cpu_s": steady_cpu,
        "steady_removed": steady_removed,
        "steady_updated": steady_updated,
        "dump_msg_bytes": dump_bytes / max(dumped, 1),
        "deleted": deleted,
        "delete_failed": failed,
        "stale_before_sweep": stale,
        "sweep_s": kt.stats.last_reconcile_seconds,
        "sweep_wall_s": sweep_wall,
        "sweep_removed": kt.stats.last_reconcile_removed,
        "cache_len_end": len(cache),
        "kernel_end": count_entries(),
        "equal": fresh == keys,
        "missing_in_cache": len(fresh - keys),
        "extra_in_cache": len(keys - fresh),
        "events_received": kt.stats.events_received,
        "overrun": kt.stats.netlink_overrun,
    }
    kt.close()
    committer.close()
    return out


# --- 4. memory ----------------------------------------------------------------------------

STATUS_ESTABLISHED = 0x2 | 0x4 | 0x8  # SEEN_REPLY | ASSURED | CONFIRMED
STATUS_MASQ = STATUS_ESTABLISHED | 0x10 | 0x80 | 0x100  # + SRC_NAT, SRC/DST_NAT_DONE
MASQ_V4 = bytes((198, 51, 100, 1))
TCP_EST = TcpInfo(3, 7, 7, 0x23, 0, 0x23, 0)  # as the kernel reports it: flags, mask 0

# sentinel values used to locate the per-entry fields in a template message
_S_SRC = {4: bytes((0xA1, 0xA2, 0xA3, 0xA4)), 16: bytes(range(0x10, 0x20))}
_S_DST = {4: bytes((0xB1, 0xB2, 0xB3, 0xB4)), 16: bytes(range(0x30, 0x40))}
_S_SPORT = 0xC1C2
_S_NATPORT = 0xD1D2
_S_ID = 0xE1E2E3E4

SHAPES = {
    # kind: (family, proto, dport, masquerade, timeout, status, protoinfo)
    "tcp4": (AF_INET, 6, 443, False, 431999, STATUS_ESTABLISHED, TCP_EST),
    "nat4": (AF_INET, 6, 443, True, 431999, STATUS_MASQ, TCP_EST),
    "udp4": (AF_INET, 17, 53, False, 179, STATUS_ESTABLISHED, None),
    "tcp6": (AF_INET6, 6, 443, False, 431999, STATUS_ESTABLISHED, TCP_EST),
}
MIX = ("tcp4",) * 5 + ("nat4",) * 3 + ("udp4", "tcp6")  # 50% / 30% / 10% / 10%


def _addr_pair(family: int, i: int) -> tuple[bytes, bytes]:
    a = i % 254 + 1
    b = (i // (254 * 64000)) % 254 + 1
    if family == AF_INET:
        return bytes((192, 0, 2, a)), bytes((203, 0, 113, b))
    return (
        socket.inet_pton(AF_INET6, f"2001:db8:1::{a:x}"),
        socket.inet_pton(AF_INET6, f"2001:db8:2::{b:x}"),
    )


def shape_entry(
    kind: str,
    i: int,
    *,
    src: bytes | None = None,
    dst: bytes | None = None,
    sport: int | None = None,
    natport: int | None = None,
    ct_id: int | None = None,
) -> Entry:
    family, proto, dport, masq, timeout, status, info = SHAPES[kind]
    s, d = _addr_pair(family, i)
    src = s if src is None else src
    dst = d if dst is None else dst
    sport = 1024 + (i // 254) % 64000 if sport is None else sport
    natport = 1024 + i % 64000 if natport is None else natport
    orig = CtTuple(family, proto, src, dst, sport, dport)
    reply = CtTuple(family, proto, dst, MASQ_V4, dport, natport) if masq else orig.inverted()
    ct_id = (i * 2654435761) & 0xFFFFFFFF if ct_id is None else ct_id
    return Entry(
        orig, reply, status=status, timeout=timeout, mark=0, id=ct_id, use=1, protoinfo=info
    )


class MessageGen:
    """CT_NEW event messages for synthetic entries.

    ``encode_ct_message`` builds one template per shape with sentinel field values; each
    entry's message is the template with its own addresses, ports and id written in. A
    sample of the results is checked byte for byte against a full ``encode_ct_message``.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        family, _proto, _dport, masq, *_ = SHAPES[kind]
        self.family = family
        self.size = 4 if family == AF_INET else 16
        size = self.size
        tmpl = nl.encode_ct_message(
            nl.CT_NEW,
            0,
            0,
            shape_entry(
                kind,
                0,
                src=_S_SRC[size],
                dst=_S_DST[size],
                sport=_S_SPORT,
                natport=_S_NATPORT,
                ct_id=_S_ID,
            ),
        )
        self.template = tmpl

        def find(needle: bytes, expect: int) -> list[int]:
            offs = [i for i in range(len(tmpl)) if tmpl.startswith(needle, i)]
            if len(offs) != expect:
                raise RuntimeError(f"{kind}: sentinel {needle.hex()} found {len(offs)} times")
            return offs

        self.src_offs = find(_S_SRC[size], 1 if masq else 2)
        self.dst_offs = find(_S_DST[size], 2)
        self.sport_offs = find(_S_SPORT.to_bytes(2, "big"), 1 if masq else 2)
        self.nat_offs = find(_S_NATPORT.to_bytes(2, "big"), 1) if masq else []
        self.id_offs = find(_S_ID.to_bytes(4, "big"), 1)

    def message(self, i: int) -> bytes:
        m = bytearray(self.template)
        src, dst = _addr_pair(self.family, i)
        size = self.size
        for o in self.src_offs:
            m[o : o + size] = src
        for o in self.dst_offs:
            m[o : o + size] = dst
        sport = (1024 + (i // 254) % 64000).to_bytes(2, "big")
        for o in self.sport_offs:
            m[o : o + 2] = sport
        for o in self.nat_offs:
            m[o : o + 2] = (1024 + i % 64000).to_bytes(2, "big")
        o = self.id_offs[0]
        m[o : o + 4] = ((i * 2654435761) & 0xFFFFFFFF).to_bytes(4, "big")
        return bytes(m)

    def check(self, i: int) -> None:
        want = nl.encode_ct_message(nl.CT_NEW, 0, 0, shape_entry(self.kind, i))
        if self.message(i) != want:
            raise RuntimeError(f"{self.kind}: patched message {i} differs from encode_ct_message")


def bench_memory(args: argparse.Namespace) -> Json:
    rows = []
    for rep in range(1, args.reps + 1):
        for kind in ("tcp4", "nat4", "mix"):
            argv = [PY, str(THIS), "_memory", "--kind", kind, "--n", str(args.n)]
            argv += ["--check-n", str(args.check_n), *digest_flag(args)]
            res = finish(RES.spawn(argv), timeout=900)
            res.update(rep=rep)
            log(
                f"memory {kind} rep {rep}: traced {res['traced_per_entry']:.1f} B/entry, RSS "
                f"{res['rss_per_entry']:.1f} B/entry, check {res.get('check_real_path')}"
            )
            rows.append(res)
    return {"n": args.n, "check_n": args.check_n, "rows": rows, "digest": args.digest}


MEMORY_KINDS = {
    "tcp4": "TCP v4, no NAT",
    "nat4": "TCP v4, masqueraded",
    "mix": "mix: 50% TCP v4, 30% masq v4, 10% UDP v4, 10% TCP v6",
}


def render_memory(res: Json) -> str:
    rows = res["rows"]
    body = []
    worst = 0.0
    for kind, label in MEMORY_KINDS.items():
        rs = [r for r in rows if r["kind"] == kind]
        worst = max([worst, *values(rs, "traced_per_entry"), *values(rs, "rss_per_entry")])
        body.append(
            [
                label,
                f"{res['n']:,}",
                mmm(values(rs, "traced_per_entry"), "{:.1f}"),
                mmm(values(rs, "rss_per_entry"), "{:.1f}"),
                mmm(values(rs, "dict_per_entry"), "{:.1f}"),
                mmm(values(rs, "objects_per_entry"), "{:.1f}"),
                mmm(values(rs, "items_transient_per_entry"), "{:.1f}"),
                mmm(values(rs, "check_real_path"), "{:.2f}")
                + " / "
                + mmm(values(rs, "check_composite"), "{:.2f}"),
                mmm(values(rs, "build_s"), "{:.1f}"),
            ]
        )
    verdict = "PASS" if worst <= 300 else "FAIL"
    return "\n".join(
        [
            "### memory: internal Cache filled through parse_ct + Cache.update",
            "",
            f"Cache: `Cache('internal'{', digest=True' if res.get('digest') else ''})` (the "
            "digest is 256 ints per cache, nothing per entry).",
            "",
            table(
                [
                    "entries",
                    "N",
                    "traced B/entry",
                    "RSS B/entry",
                    "dict B/entry",
                    "key+value B/entry",
                    "`cache.items()` transient B/entry",
                    f"check at {res['check_n']:,}: real path traced / composite",
                    "build s",
                ],
                body,
            ),
            "",
            "RSS = resident-set growth while the cache is built through the real path "
            "(encoded CT_NEW message -> parse_ct -> Cache.update) in a fresh process. "
            "traced = the dict container as tracemalloc traces it (the same keys and values "
            "re-inserted into an empty Cache while tracing) + sys.getsizeof of every key and "
            "value, which is what tracemalloc counts for bytes objects; tracing the whole "
            "1M-entry real path costs ~3 min per kind here, so the last column checks the "
            "composite against a fully traced real-path build at a smaller N. transient = "
            "extra peak while iterating `cache.items()` once (it copies every pair into a "
            "list first).",
            "",
            f"Target (<= 300 B/entry at 1M): worst figure {worst:.1f} B/entry -> **{verdict}**",
        ]
    )


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build_cache(gens: Sequence[MessageGen], n: int, digest: bool) -> Cache:
    """The real path: an encoded CT_NEW event message per entry, parse_ct, Cache.update."""
    parse = record.parse_ct
    cache = make_cache(digest)
    upd = cache.update
    cycle = len(gens)
    for i in range(n):
        m = gens[i % cycle].message(i)
        upd(parse(m, 20, len(m)))
    if len(cache) != n:
        raise RuntimeError(f"cache holds {len(cache)}, expected {n}")
    return cache


def _traced_composite(cache: Cache) -> tuple[float, float]:
    """(dict container bytes as traced, key+value bytes) per entry of ``cache``."""
    keys = cache.keys()
    get = cache.get
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    copy = Cache("internal")  # no digest: it keeps no per-entry state
    put = copy.put
    for k in keys:
        put(k, get(k) or b"")
    container = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    objects = sum(sys.getsizeof(k) + sys.getsizeof(get(k)) for k in keys)
    return container / len(keys), objects / len(keys)


def worker_memory(a: argparse.Namespace) -> None:
    kinds = MIX if a.kind == "mix" else (a.kind,)
    made = {k: MessageGen(k) for k in set(kinds)}
    for gen in made.values():
        for i in range(0, 200_000, 4099):
            gen.check(i)
    gens = [made[k] for k in kinds]
    res: Json = {"kind": a.kind, "n": a.n}
    if a.check_n:
        # the whole real path under tracemalloc, small N, against the composite figure
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        small = _build_cache(gens, a.check_n, a.digest)
        gc.collect()
        res["check_real_path"] = (tracemalloc.get_traced_memory()[0] - before) / a.check_n
        tracemalloc.stop()
        res["check_composite"] = sum(_traced_composite(small))
        del small
    gc.collect()
    rss0 = _rss()
    t = time.perf_counter()
    cache = _build_cache(gens, a.n, a.digest)
    res["build_s"] = time.perf_counter() - t
    gc.collect()
    res["rss_per_entry"] = (_rss() - rss0) / a.n
    container, objects = _traced_composite(cache)
    res.update(
        dict_per_entry=container,
        objects_per_entry=objects,
        traced_per_entry=container + objects,
        key_len_mean=sum(len(k) for k, _v in cache.items()) / a.n,
    )
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in cache.items():
        pass
    res["items_transient_per_entry"] = (tracemalloc.get_traced_memory()[1] - base) / a.n
    tracemalloc.stop()
    emit("", res)


# --- driver -------------------------------------------------------------------------------

RENDER = {
    "events": render_events,
    "commit": render_commit,
    "reconcile": render_reconcile,
    "memory": render_memory,
}


def git_state() -> str:
    """HEAD and whether ctsync/ has uncommitted changes (others edit it concurrently)."""
    head = run(["git", "-C", str(PROJECT), "rev-parse", "--short", "HEAD"], check=False)
    dirty = run(["git", "-C", str(PROJECT), "status", "--porcelain", "ctsync"], check=False)
    return head.stdout.strip() + (" (ctsync/ modified)" if dirty.stdout.strip() else "")


def run_benchmarks(args: argparse.Namespace, names: Sequence[str]) -> None:
    if os.geteuid() != 0 and any(n != "memory" for n in names):
        sys.exit("events, commit and reconcile need root (network namespaces)")
    out = RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    results: Json = {
        "meta": {
            "argv": sys.argv,
            "run_tag": RUN_TAG,
            "kernel": os.uname().release,
            "ncpu": os.cpu_count(),
            "python": sys.version.split()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_start": loadavg(),
            "git_head": git_state(),
        }
    }

    def save() -> None:
        with open(out / "results.json", "w") as f:
            json.dump(results, f, indent=1, default=str)

    texts = []
    try:
        for name in names:
            log(f"--- {name} (load {loadavg()})")
            t = time.monotonic()
            sub = argparse.Namespace(**vars(args))
            for key, val in BENCH_DEFAULTS[name].items():
                if getattr(sub, key, None) is None:
                    setattr(sub, key, val)
            if name == "events":
                res = bench_events(sub)
            elif name == "commit":
                res = bench_commit(sub, out)
            elif name == "reconcile":
                res = bench_reconcile(sub)
            else:
                res = bench_memory(sub)
            res["elapsed_s"] = time.monotonic() - t
            results[name] = res
            save()
            text = RENDER[name](res)
            texts.append(text)
            print(text + "\n", flush=True)
    finally:
        results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results["meta"]["loadavg_end"] = loadavg()
        save()
        with open(out / "summary.md", "w") as f:
            f.write("\n\n".join(texts) + "\n")
        log(f"results -> {out}")


BENCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "events": {"n": 200_000, "queued_n": 100_000},
    "commit": {"n": 100_000},
    "reconcile": {"n": 100_000},
    "memory": {"n": 1_000_000},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reps", type=int, default=3)
        p.add_argument("--rcvbuf", type=int, default=64 << 20, help="listener rcvbuf (bytes)")
        p.add_argument("--listener-cpu", type=int, default=1)
        p.add_argument("--writer-cpu", type=int, default=0)
        p.add_argument("--no-pin", action="store_true", help="do not pin listener/writer")
        p.add_argument(
            "--no-digest",
            dest="digest",
            action="store_false",
            help="bare Cache('internal') instead of the agent's Cache(..., digest=True)",
        )
        p.add_argument("--delete-every", type=int, default=10, help="reconcile: delete 1 in k")
        p.add_argument("--queued-n", type=int, default=None, help="events: N for queued runs")
        p.add_argument(
            "--check-n", type=int, default=20_000, help="memory: N of the fully traced check"
        )

    for name, text in (
        ("events", "live-event decode (full pipeline and decode only)"),
        ("commit", "failover commit: ctsync vs conntrackd -c, same run"),
        ("reconcile", "dump + reconcile of a 100k table"),
        ("memory", "bytes per cached entry at 1M entries"),
    ):
        p = sub.add_parser(name, help=text)
        common(p)
        p.add_argument("--n", type=int, default=None, help=f"default {BENCH_DEFAULTS[name]['n']}")
    p = sub.add_parser("all", help="events, commit, reconcile, memory")
    common(p)
    p.add_argument("--n", type=int, default=None, help="(per-benchmark defaults)")

    p = sub.add_parser("render", help="print the tables of a results.json again")
    p.add_argument("json", type=Path)

    w = sub.add_parser("_listener")
    w.add_argument("--digest", action="store_true")
    w.add_argument("--pipeline", choices=["kt", "decode", "recv"], required=True)
    w.add_argument("--timing", choices=["live", "queued"], required=True)
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--rcvbuf", type=int, default=64 << 20)
    w.add_argument("--cpu", type=int)
    w.add_argument("--idle-timeout", type=float, default=3.0)
    w.add_argument("--offline", action="store_true")
    w = sub.add_parser("_commit")
    w.add_argument("--digest", action="store_true")
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--variant", choices=list(COMMIT_VARIANTS), required=True)
    w = sub.add_parser("_reconcile")
    w.add_argument("--digest", action="store_true")
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--delete-every", type=int, default=10)
    w.add_argument("--rcvbuf", type=int, default=64 << 20)
    w = sub.add_parser("_memory")
    w.add_argument("--digest", action="store_true")
    w.add_argument("--kind", choices=["tcp4", "nat4", "mix"], required=True)
    w.add_argument("--n", type=int, required=True)
    w.add_argument("--check-n", type=int, default=20_000)
    a = ap.parse_args()

    workers = {
        "_listener": worker_listener,
        "_commit": worker_commit,
        "_reconcile": worker_reconcile,
        "_memory": worker_memory,
    }
    if a.cmd in workers:
        workers[a.cmd](a)
        return
    if a.cmd == "render":
        with open(a.json) as f:
            saved = json.load(f)
        for name, render in RENDER.items():
            if name in saved:
                print(render(saved[name]) + "\n")
        return

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    atexit.register(RES.close)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    names = ["events", "commit", "reconcile", "memory"] if a.cmd == "all" else [a.cmd]
    if a.cmd == "all" and a.n is not None:
        sys.exit("all: --n is per benchmark; run the benchmark alone to change it")
    try:
        run_benchmarks(a, names)
    finally:
        RES.close()


if __name__ == "__main__":
    main()
