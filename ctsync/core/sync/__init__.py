"""The sync protocol engine (docs/wire-protocol.md): pure, driven by bytes and ``now``."""

from ctsync.core.sync.session import NONCE_SIZE, ExternalHook, SyncSession
from ctsync.core.sync.state import PeerCounters, PeerState, RxState, SessionConfig, SyncStats

__all__ = [
    "NONCE_SIZE",
    "ExternalHook",
    "PeerCounters",
    "PeerState",
    "RxState",
    "SessionConfig",
    "SyncSession",
    "SyncStats",
]
