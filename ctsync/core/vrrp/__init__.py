"""ctsync's own VRRP speaker, the pure part: the packet codec and the state machine.

``packet`` turns adverts into bytes and back and applies keepalived's receive checks;
``machine`` is the sync-group state machine the runner (``ctsync.speaker``) drives with
the current time. Neither touches sockets or clocks.
"""

from ctsync.core.vrrp.machine import (
    Action,
    AddAddresses,
    Announce,
    GroupState,
    InstanceParams,
    InstanceState,
    InstanceStatus,
    RemoveAddresses,
    SendAdvert,
    State,
    SyncGroup,
)
from ctsync.core.vrrp.packet import (
    MCAST_V4,
    MCAST_V6,
    TOS,
    VRRP_PROTO,
    Advert,
    Expect,
    VrrpPacketError,
    build_ipv4_header,
    check_advert,
    decode_advert,
    decode_advert_ex,
    encode_advert,
    master_down,
    parse_ipv4,
    pass_auth_data,
    skew,
)

__all__ = [
    "MCAST_V4",
    "MCAST_V6",
    "TOS",
    "VRRP_PROTO",
    "Action",
    "AddAddresses",
    "Advert",
    "Announce",
    "Expect",
    "GroupState",
    "InstanceParams",
    "InstanceState",
    "InstanceStatus",
    "RemoveAddresses",
    "SendAdvert",
    "State",
    "SyncGroup",
    "VrrpPacketError",
    "build_ipv4_header",
    "check_advert",
    "decode_advert",
    "decode_advert_ex",
    "encode_advert",
    "master_down",
    "parse_ipv4",
    "pass_auth_data",
    "skew",
]
