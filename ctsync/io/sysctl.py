"""The netfilter sysctls of the network namespace this process runs in (``/proc/sys``).

A thin adapter: read every ``nf_conntrack_*`` file, tell which ones this namespace lets us
write, and write one. ``/proc/sys/net`` always shows the namespace of the process that
opens it, so running ``ctsync tracking`` inside ``ip netns exec NAME`` touches only that
namespace. What the names mean is :mod:`ctsync.core.tracking`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

NETFILTER_DIR = Path("/proc/sys/net/netfilter")


class Sysctls:
    """The ``nf_conntrack_*`` files under ``root`` (a directory, replaceable in tests)."""

    def __init__(self, root: Path = NETFILTER_DIR) -> None:
        self.root = root

    def loaded(self) -> bool:
        """Whether nf_conntrack is loaded (its sysctls exist in this namespace)."""
        return (self.root / "nf_conntrack_max").exists()

    def read_all(self) -> dict[str, str]:
        """file name -> content of every readable ``nf_conntrack_*`` file."""
        out: dict[str, str] = {}
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return out
        for name in names:
            if not name.startswith("nf_conntrack_"):
                continue
            try:
                out[name] = (self.root / name).read_text().strip()
            except (IsADirectoryError, PermissionError):
                continue
        return out

    def read(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text().strip()
        except FileNotFoundError:
            return None

    def writable(self) -> frozenset[str]:
        """Files with a write bit: the kernel gives read-only sysctls of a non-initial
        namespace (nf_conntrack_max, buckets, expect_max) mode 0444 there."""
        out = set()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return frozenset()
        for name in names:
            try:
                mode = os.stat(self.root / name).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and mode & 0o222:
                out.add(name)
        return frozenset(out)

    def write(self, name: str, value: int) -> None:
        """Write one value; OSError (EINVAL, EPERM, ...) as the kernel reports it."""
        with open(self.root / name, "w") as f:
            f.write(f"{value}\n")
