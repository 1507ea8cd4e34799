#!/usr/bin/env python3
"""Entrypoint of the ctsync image: set the container up, then run the agent or a command.

``firewall`` (the default command): check the interface names and the sysctls, load the nft
ruleset, make sure the sync key exists, then ``exec ctsync agent``. Anything else is run
as given, after the same checks and the routes (client and server containers).

Environment (all optional):

- ``CTSYNC_IFNAMES="eth0=198.51.100.0/25 eth1=203.0.113.128/28"``: the name the
  interface holding an address of each subnet must have (ctsync's config and the ruleset
  name interfaces). Docker names them eth0, eth1, ... after the networks, in name order; if
  a Docker version does otherwise, the interface is renamed here, with a warning: Docker
  finds its interfaces by the names it gave, so ``docker network disconnect`` then leaves
  a renamed interface in place.
- ``CTSYNC_ROUTES="203.0.113.0/25 via 198.51.100.1; ..."``: ``ip route replace`` each.
- ``CTSYNC_SYSCTLS="net.ipv4.ip_forward=1 ..."``: values the firewall needs. Docker mounts
  /proc/sys read-only, so they are set by the compose file (``sysctls:``) and checked
  here; written only where /proc/sys is writable.
- ``CTSYNC_CONFIG`` (``/etc/ctsync/ctsync.toml``), ``CTSYNC_RULESET``
  (``/etc/ctsync/firewall.nft``), ``CTSYNC_KEY_FILE`` (``/var/lib/ctsync-key/sync.key``):
  the key file is created once, under a lock, in a volume both firewalls mount (or written
  from ``CTSYNC_SYNC_KEY`` when that is set).

Only the standard library: this runs with the image's system Python.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import ipaddress
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

FIREWALL_SYSCTLS = (
    "net.ipv4.ip_forward=1 net.netfilter.nf_conntrack_tcp_loose=0"
    " net.netfilter.nf_conntrack_tcp_be_liberal=0"
)
CTSYNC = "/opt/ctsync/bin/ctsync"


def log(message: str) -> None:
    print(f"entrypoint: {message}", file=sys.stderr, flush=True)


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"entrypoint: ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def interface_in(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str | None:
    """The interface that has an address in *subnet*, if any."""
    for line in ip("-o", "addr", "show").splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] not in ("inet", "inet6"):
            continue
        addr = ipaddress.ip_interface(fields[3]).ip
        if addr.version == subnet.version and addr in subnet:
            return fields[1].split("@")[0]
    return None


def name_interfaces(spec: str, timeout: float = 10.0) -> None:
    for item in spec.split():
        name, _, subnet_text = item.partition("=")
        subnet = ipaddress.ip_network(subnet_text, strict=False)
        deadline = time.monotonic() + timeout
        while (current := interface_in(subnet)) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"entrypoint: no interface with an address in {subnet}")
            time.sleep(0.1)
        if current != name:
            log(f"warning: {subnet} is on {current}, not {name}: renaming it")
            ip("link", "set", "dev", current, "down")
            ip("link", "set", "dev", current, "name", name)
            ip("link", "set", "dev", name, "up")


def add_routes(spec: str) -> None:
    for route in filter(None, (part.strip() for part in spec.split(";"))):
        ip("route", "replace", *route.split())


def apply_sysctls(spec: str) -> None:
    for item in spec.split():
        key, _, want = item.partition("=")
        path = Path("/proc/sys") / key.replace(".", "/")
        have = path.read_text().strip()
        if have == want:
            continue
        try:
            path.write_text(want + "\n")
        except OSError as exc:
            raise SystemExit(
                f"entrypoint: {key} is {have}, the firewall needs {want}, and it cannot be set"
                f" here ({exc.strerror}): set it in the compose file (sysctls:)"
            ) from exc
        log(f"{key} = {want}")


def ensure_key(path: Path) -> None:
    """The sync key: from CTSYNC_SYNC_KEY, else created once by whichever firewall starts
    first (an flock on the shared volume keeps the other one from writing its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("CTSYNC_SYNC_KEY", "").strip()
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if given or not path.exists() or not path.read_text().strip():
            text = given or base64.b64encode(secrets.token_bytes(48)).decode()
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
    os.chmod(path, 0o600)


def firewall() -> None:
    apply_sysctls(os.environ.get("CTSYNC_SYSCTLS", FIREWALL_SYSCTLS))
    ruleset = os.environ.get("CTSYNC_RULESET", "/etc/ctsync/firewall.nft")
    subprocess.run(["nft", "-f", ruleset], check=True)
    log(f"loaded {ruleset}")
    ensure_key(Path(os.environ.get("CTSYNC_KEY_FILE", "/var/lib/ctsync-key/sync.key")))
    os.makedirs("/run/ctsync", mode=0o700, exist_ok=True)
    config = os.environ.get("CTSYNC_CONFIG", "/etc/ctsync/ctsync.toml")
    os.execv(CTSYNC, [CTSYNC, "agent", "-c", config])


def main(argv: list[str]) -> None:
    name_interfaces(os.environ.get("CTSYNC_IFNAMES", ""))
    add_routes(os.environ.get("CTSYNC_ROUTES", ""))
    command = argv or ["firewall"]
    if command == ["firewall"]:
        firewall()
    with contextlib.suppress(FileNotFoundError):
        os.execvp(command[0], command)
    raise SystemExit(f"entrypoint: {command[0]}: not found")


if __name__ == "__main__":
    main(sys.argv[1:])
