"""ctsync adapter for the shared conntrackd benchmark harness.

Runs the harness's scenarios (A replication, B commit + B2 promote steps, C CPU, churn)
against two ctsync agents instead of two conntrackd daemons::

    sudo .venv/bin/python /work/shared/bench/conntrackd_bench.py run \\
        --daemon-class bench/ctsync_adapter.py:CtsyncDaemon --results bench/results/x ...

``bench/run_sync_bench.sh`` runs conntrackd and ctsync side by side with the same
parameters; see ``bench/README.md``.

How the adapter maps conntrackd's interface onto ctsync:

- config: one TOML file per node, like the harness's conntrackd configs: multicast
  225.0.0.50:3780 on the sync veth, bound to the node's sync address, loopback and the
  sync subnet ignored, a 64 MiB event socket buffer growing up to 128 MiB, and a shared
  0600 key file (ctsync authenticates every datagram; conntrackd only checksums them);
- start: ``ip netns exec NS PYTHON -m ctsync agent -c NODE.toml`` in the foreground (the
  harness keeps the PID; its stderr goes to ``NODE.log`` in the run's work dir);
- counts: one ``statistics`` request on the control socket (the harness polls it every
  2 ms, so no client process is forked), like the harness's conntrackd adapter, which
  sends request 21 (STATS) to the UNIX socket and parses "current active connections";
- commit: ``ctsync commit`` (blocks until the commit is done, as ``conntrackd -c``);
- B2: ``ctsync flush``, ``ctsync resync --kernel``, ``ctsync bulk-send`` (-f, -R, -B);
- stats: ``ctsync show statistics`` text, rendered in-process from the same request the
  CLI sends, plus the counters the harness parses, under conntrackd's labels, and the
  raw statistics JSON;
- ext_dump: ``ctsync show cache external`` lines, rendered in-process from the ``cache``
  request (the harness's conntrackd adapter also reads ``-e`` straight off the socket).

Knobs (environment variables, all optional):

  CTSYNC_BENCH_EVENT_QUEUE=64        [sync] event-listen-queue-size, MiB
  CTSYNC_BENCH_EVENT_QUEUE_MAX=128   [sync] event-listen-queue-max, MiB
  CTSYNC_BENCH_SYNC_QUEUE=1          [sync] sync-queue-size, MiB (conntrackd here: 1.19 MiB)
  CTSYNC_BENCH_RESEND_QUEUE=16       [sync] resend-queue-size, MiB
  CTSYNC_BENCH_LOG_LEVEL=info        [log] level
  CTSYNC_BENCH_SYNC_EXTRA=''         extra TOML lines appended to [sync] (e.g.
                                     'digest-interval = 2.0'), separated by ';' or newlines
  CTSYNC_BENCH_CLI=1                 ext_dump and stats fork the real CLI instead
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any

import conntrackd_bench as cb  # the harness registers itself under this name first

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT not in sys.path:
    sys.path.insert(0, PROJECT)  # so the in-process renderers import with any interpreter

DEFAULT_TIMEOUT = 30.0


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def request(
    path: str, command: str, args: dict[str, Any] | None = None, timeout: float = 30.0
) -> Any:
    """One control-socket request (``ctsync.io.control`` protocol) without importing ctsync.

    Raises OSError when the agent is unreachable or answers with an error (the harness
    treats OSError/ValueError as "not ready yet" while it waits for a daemon to start)."""
    line = (
        json.dumps({"command": command, "args": args or {}}, separators=(",", ":")) + "\n"
    ).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(line)
        chunks = []
        while True:
            b = s.recv(1 << 20)
            if not b:
                break
            chunks.append(b)
    finally:
        s.close()
    data = b"".join(chunks)
    if not data.strip():
        raise OSError(f"{path}: {command}: no reply")
    reply = json.loads(data)
    if not reply.get("ok"):
        raise OSError(f"{path}: {command}: {reply.get('error')}")
    return reply.get("result")


class CtsyncDaemon(cb.SyncDaemon):  # type: ignore[misc,name-defined]
    name = "ctsync"

    def __init__(self, args: Any) -> None:
        self.args = args
        self.python = sys.executable
        self.use_cli = _env("CTSYNC_BENCH_CLI", "") not in ("", "0")

    # --- paths ------------------------------------------------------------------------

    @staticmethod
    def conf(node: Any) -> str:
        return os.path.join(node.workdir, node.name + ".toml")

    @staticmethod
    def sock(node: Any) -> str:
        return os.path.join(node.workdir, node.name + ".sock")

    @staticmethod
    def logfile(node: Any) -> str:
        return os.path.join(node.workdir, node.name + ".log")

    def cli(self, node: Any, *argv: str) -> list[str]:
        """argv of a ctsync command run inside the node's namespace."""
        return ["ip", "netns", "exec", node.ns, self.python, "-m", "ctsync", *argv]

    # --- SyncDaemon ---------------------------------------------------------------------

    def prepare(self, nodes: list[Any], workdir: str) -> None:
        key = os.path.join(workdir, "sync.key")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(os.urandom(48)).decode() + "\n")
        os.chmod(key, 0o600)
        sync_net = f"{cb.SYNC_IPS[0].rsplit('.', 1)[0]}.0/{cb.SYNC_PREFIX}"
        extra = _env("CTSYNC_BENCH_SYNC_EXTRA", "").replace(";", "\n").strip()
        for n in nodes:
            txt = (
                "# generated by bench/ctsync_adapter.py (mirrors the harness's conntrackd config)\n"
                f"node-id = {n.idx + 1}\n\n"
                "[sync]\n"
                f'interface = "{n.iface}"\n'
                f'mcast-group = "{cb.MCAST}"\n'
                f"port = {cb.MCAST_GROUP}\n"
                f'listen-address = "{n.ip}"\n'
                f'ignore-address = ["127.0.0.1", "::1", "{sync_net}"]\n'
                f"event-listen-queue-size = {int(_env('CTSYNC_BENCH_EVENT_QUEUE', '64'))}\n"
                f"event-listen-queue-max = {int(_env('CTSYNC_BENCH_EVENT_QUEUE_MAX', '128'))}\n"
                f"sync-queue-size = {int(_env('CTSYNC_BENCH_SYNC_QUEUE', '1'))}\n"
                f"resend-queue-size = {int(_env('CTSYNC_BENCH_RESEND_QUEUE', '16'))}\n"
                + (extra + "\n" if extra else "")
                + "\n[auth]\n"
                f'key-file = "{key}"\n\n'
                "[control]\n"
                f'socket = "{self.sock(n)}"\n\n'
                "[log]\n"
                'format = "logfmt"\n'
                f'level = "{_env("CTSYNC_BENCH_LOG_LEVEL", "info")}"\n'
            )
            with open(self.conf(n), "w") as f:
                f.write(txt)
            # the harness copies *.conf into results/<run>/logs/: keep a copy under that name
            with open(os.path.join(workdir, n.name + ".toml.conf"), "w") as f:
                f.write(txt)
        r = subprocess.run(
            [self.python, "-m", "ctsync", "config", "check", self.conf(nodes[0])],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"ctsync config check failed:\n{r.stdout}{r.stderr}")

    def start(self, node: Any) -> None:
        out = open(self.logfile(node), "ab")  # noqa: SIM115 - the child keeps it
        out.write(b"# ---- start %s\n" % time.strftime("%H:%M:%S").encode())
        out.flush()
        node.proc = subprocess.Popen(
            self.cli(node, "agent", "-c", self.conf(node)),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        cb.state_add_pid(node.proc.pid, self.python)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"ctsync on {node.name} exited rc={node.proc.returncode}, "
                    f"see {self.logfile(node)}:\n" + self.log_text(node)[-2000:]
                )
            try:
                self.counts(node)
                return
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"ctsync on {node.name} not ready after 30 s")

    def counts(self, node: Any) -> tuple[int | None, int | None]:
        # The agent's cheap poll: cache sizes only (no statistics snapshot).
        c = request(self.sock(node), "counts", timeout=DEFAULT_TIMEOUT)
        return c["internal"], c["external"]

    def commit_cmd(self, node: Any) -> list[str]:
        return self.cli(node, "commit", "-S", self.sock(node))

    def promote_steps(self, node: Any) -> list[tuple[str, list[str]]]:
        sock = self.sock(node)
        return [
            ("flush (-f)", self.cli(node, "flush", "-S", sock)),
            ("resync --kernel (-R)", self.cli(node, "resync", "--kernel", "-S", sock)),
            ("bulk-send (-B)", self.cli(node, "bulk-send", "-S", sock)),
        ]

    def stats(self, node: Any) -> dict[str, str]:
        try:
            snap = request(self.sock(node), "statistics", timeout=60)
        except (OSError, ValueError) as exc:
            return {"default": f"[adapter] statistics failed: {exc}"}
        if self.use_cli:
            r = subprocess.run(
                self.cli(node, "show", "statistics", "-S", self.sock(node)),
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            text = r.stdout + (("\n[stderr]\n" + r.stderr) if r.stderr.strip() else "")
        else:
            from ctsync.cli.render_sync import render_statistics
            from ctsync.core.stats import snapshot_from_dict

            text = render_statistics(snapshot_from_dict(snap))
        nl = snap["netlink"]
        sync = snap["sync"]
        # conntrackd's `-s runtime` labels for the counters conntrackd_bench.py parses
        # (COUNTER_RES): without them its overrun/resync columns would read 0 for ctsync.
        runtime = (
            "netlink stats:\n"
            f"\tevents received:\t{nl['events_received']:20d}\n"
            f"\tnetlink overrun:\t{nl['netlink_overrun']:20d}\n"
            f"\tresync with kernel table:\t{nl['resync_with_kernel_table']:20d}\n"
            f"\tcurrent buffer size (in bytes):\t{nl['buffer_size']:20d}\n"
            f"\t(ctsync) events own:\t{nl['events_own']}\n"
            f"\t(ctsync) last reconcile seconds:\t{nl['last_reconcile_seconds']}\n"
            f"\t(ctsync) resent={sync.get('resent')} nacks_sent={sync.get('nacks_sent')} "
            f"nacks_received={sync.get('nacks_received')} gone_sent={sync.get('gone_sent')} "
            f"queue_overflow={sync.get('queue_overflow')} repairs_sent={sync.get('repairs_sent')} "
            f"digest_mismatches={sync.get('digest_mismatches')}\n"
        )
        return {
            "default": text,
            "runtime (adapter: conntrackd labels from the statistics JSON)": runtime,
            "json": json.dumps(snap, indent=1, sort_keys=True),
        }

    def ext_dump(self, node: Any) -> str:
        if self.use_cli:
            r = subprocess.run(
                self.cli(node, "show", "cache", "external", "-S", self.sock(node)),
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
            return r.stdout
        from ctsync.cli.render_sync import render_cache_lines

        res = request(
            self.sock(node),
            "cache",
            {"which": "external", "filter": {}, "count": False},
            timeout=300,
        )
        return render_cache_lines(res["entries"])

    _commit_re = re.compile(r"commit done: (\d+) committed, (\d+) failed in ([\d.]+)s")

    def log_text(self, node: Any) -> str:
        try:
            with open(self.logfile(node), errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        # The harness reads the daemon's own commit figure from conntrackd's log lines
        # ("commit has taken X seconds", "Committed N new entries"): translate ctsync's.
        extra = [
            f"[bench adapter, from ctsync's 'commit done' line] Committed {c} new entries\n"
            f"[bench adapter] commit has taken {s} seconds\n"
            + (f"[bench adapter] {f} entries can't be committed\n" if int(f) else "")
            for c, f, s in self._commit_re.findall(text)
        ]
        return text + "".join(extra)

    def describe(self) -> str:
        r = subprocess.run(
            [self.python, "-m", "ctsync", "--version"], capture_output=True, text=True, check=False
        )
        return "ctsync " + (r.stdout.strip() or r.stderr.strip()) + " (" + self.python + ")"
