"""The sync wire codec: round trips, "decode it or raise WireError", authentication, replay."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctsync.core import wire
from ctsync.core.wire import (
    DATA_BULK_BEGIN,
    DATA_REPAIR,
    MAC_SIZE,
    Authenticator,
    Datagram,
    MsgType,
    ReplayWindow,
    WireError,
)

AUTH = Authenticator(bytes(range(32)))
OTHER = Authenticator(bytes(range(1, 33)))
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEY4 = bytes.fromhex("01c0000202c6336401") + b"\x9c\x40\x01\xbb"
VALUE = bytes(17) + b"\x03\x07\x07\x23\x00\x23\x00"

PAYLOADS: dict[MsgType, list[Any]] = {
    MsgType.HELLO: [
        b"n" * 16,
        [[2, 1_700_000_000_002, b"m" * 16]],
        {"next_seq": 7, "mtu": 1452, "want": [2]},
    ],
    MsgType.ALIVE: [42],
    MsgType.DATA: [5, DATA_BULK_BEGIN, [[KEY4, VALUE]], [KEY4 + b"x"]],
    MsgType.ACK: [2, 1_700_000_000_002, 41, [[43, 45], [50, 50]]],
    MsgType.RESYNC: [2],
    MsgType.DIGEST: [42, [0xFFFFFFFF] * 256],
    MsgType.REPAIR: [2, 1_700_000_000_002, [0, 17, 255]],
    MsgType.GONE: [2, 1_700_000_000_002, 3, 9],
}


@pytest.mark.parametrize("mtype", list(MsgType))
def test_round_trip_every_type(mtype: MsgType) -> None:
    payload = PAYLOADS[mtype]
    data = wire.encode(AUTH, mtype, 1, 1_700_000_000_001, 99, payload)
    assert wire.decode(AUTH, data) == Datagram(mtype, 1, 1_700_000_000_001, 99, payload)


def test_repair_data_carries_bucket_ids() -> None:
    payload = [9, DATA_REPAIR, [[KEY4, VALUE]], [3, 200]]
    data = wire.encode(AUTH, MsgType.DATA, 1, 5, 1, payload)
    assert wire.decode(AUTH, data).payload == payload
    bad = wire.encode(AUTH, MsgType.DATA, 1, 5, 1, [9, DATA_REPAIR, [], [KEY4]])
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, bad)
    assert exc.value.reason == "malformed"


def test_wrong_key_is_auth() -> None:
    data = wire.encode(OTHER, MsgType.ALIVE, 1, 5, 1, [1])
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, data)
    assert exc.value.reason == "auth"


def test_unauthenticated_mode_accepts_zero_mac() -> None:
    none = Authenticator(None)
    data = wire.encode(none, MsgType.ALIVE, 1, 5, 1, [1])
    assert data.endswith(bytes(MAC_SIZE))
    assert wire.decode(none, data).payload == [1]
    with pytest.raises(WireError):
        wire.decode(AUTH, data)  # a keyed node refuses it


def test_short_key_refused() -> None:
    with pytest.raises(ValueError):
        Authenticator(b"short")


def _signed(body_obj: Any) -> bytes:
    body: bytes = msgpack.packb(body_obj, use_bin_type=True)
    return body + AUTH.sign(body)


def test_version_and_type_reasons() -> None:
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, _signed([2, 2, 1, 5, 1, [1]]))
    assert exc.value.reason == "version"
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, _signed([1, 99, 1, 5, 1, [1]]))
    assert exc.value.reason == "type"
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, _signed([1, 2, 1, 5, 1]))
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize(
    "body",
    [
        [1, 1, 1, 5, 1, [b"n" * 16, [[1, 2]], {}]],  # echo without nonce
        [1, 1, 1, 5, 1, [b"n" * 16, [[1, -2, b"x"]], {}]],
        [1, 1, 1, 5, 1, [b"n" * 16, None, {}]],
        [1, 3, 1, 5, 1, [1, 0, [[b"", b"v"]], []]],  # empty key
        [1, 3, 1, 5, 1, [1, 0, [[b"k"]], []]],
        [1, 3, 1, 5, 1, [1, 0, [], [7]]],  # destroy that is not a key
        [1, 4, 1, 5, 1, [2, 5, 3, [[1]]]],
        [1, 4, 1, 5, 1, [2, 5, 3, [[1, -1]]]],
        [1, 6, 1, 5, 1, [3, [1 << 33]]],
        [1, 7, 1, 5, 1, [2, 5, [-1]]],
        [1, 8, 1, 5, 1, [2, 5, 3, True]],
        [1, 2, -1, 5, 1, [1]],
        [1, 2, 1, 5, 1, [1.5]],
        [1, 2, True, 5, 1, [1]],
        "not a list",
    ],
)
def test_signed_garbage_shapes_are_malformed(body: Any) -> None:
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, _signed(body))
    assert exc.value.reason == "malformed"


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, data)
    assert exc.value.reason in ("auth", "malformed")


@FUZZ
@given(st.binary(max_size=300))
def test_signed_random_bodies_decode_or_raise_wire_error(body: bytes) -> None:
    try:
        dg = wire.decode(AUTH, body + AUTH.sign(body))
    except WireError as exc:
        assert exc.reason in ("malformed", "version", "type")
    else:
        assert isinstance(dg, Datagram)


_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=24)
    | st.text(max_size=8)
)
_objects = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), inner, max_size=3)
    ),
    max_leaves=20,
)


@FUZZ
@given(
    st.sampled_from([1, 2]),
    st.integers(min_value=0, max_value=10),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    _objects,
)
def test_signed_structured_garbage_decodes_or_raises(
    version: int, mtype: int, node: int, payload: Any
) -> None:
    """Valid MAC, plausible header, arbitrary payload: a Datagram or a WireError."""
    try:
        dg = wire.decode(AUTH, _signed([version, mtype, node, 5, 1, payload]))
    except WireError:
        return
    assert dg.type == mtype and dg.node == node


@FUZZ
@given(
    st.sampled_from(list(MsgType)),
    st.data(),
)
def test_mutated_valid_datagrams_raise_only_wire_error(mtype: MsgType, data: st.DataObject) -> None:
    good = bytearray(wire.encode(AUTH, mtype, 1, 5, 1, PAYLOADS[mtype]))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        del good[data.draw(st.integers(0, len(good) - 1)) :]
    elif kind == "extend":
        good += data.draw(st.binary(min_size=1, max_size=20))
    else:
        pos = data.draw(st.integers(0, len(good)))
        good[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(WireError) as exc:
        wire.decode(AUTH, bytes(good))
    assert exc.value.reason in ("auth", "malformed")


@FUZZ
@given(st.sampled_from(list(MsgType)), st.data())
def test_resigned_mutations_decode_or_raise(mtype: MsgType, data: st.DataObject) -> None:
    """Mutate the body, then sign it with the right key: the parser sees the damage."""
    body = bytearray(wire.encode(AUTH, mtype, 1, 5, 1, PAYLOADS[mtype])[:-MAC_SIZE])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    try:
        wire.decode(AUTH, bytes(body) + AUTH.sign(bytes(body)))
    except WireError as exc:
        assert exc.reason in ("malformed", "version", "type")


# --- ReplayWindow -------------------------------------------------------------------------


def test_replay_window_accepts_each_packet_once() -> None:
    w = ReplayWindow()
    assert w.check(10, 1)
    assert not w.check(10, 1)
    assert w.check(10, 3)
    assert w.check(10, 2)  # reordered, inside the window
    assert not w.check(10, 2)
    assert not w.check(10, 3)


def test_replay_window_refuses_too_old_and_older_epochs() -> None:
    w = ReplayWindow()
    assert w.check(10, 1)
    assert w.check(10, 1 + ReplayWindow.SIZE)  # packet 1 is now just out of the window
    assert not w.check(10, 1)
    assert w.check(10, 2)  # still inside
    assert w.check(11, 1)  # a newer epoch restarts the window
    assert not w.check(10, 5000)  # an older epoch: refused whatever the packet
    assert w.check(11, 2)


def test_replay_window_survives_a_huge_jump() -> None:
    """A jump of 2**60 packets must not build a 2**60-bit integer (it used to)."""
    w = ReplayWindow()
    assert w.check(1, 1)
    assert w.check(1, 1 << 60)
    assert not w.check(1, 1)
    assert w.check(1, (1 << 60) - 3)
    assert not w.check(1, (1 << 60) - 3)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=200), max_size=300))
def test_replay_window_matches_a_model(packets: list[int]) -> None:
    w = ReplayWindow()
    seen: set[int] = set()
    top = 0
    for p in packets:
        expected = p not in seen and p > top - ReplayWindow.SIZE
        assert w.check(1, p) is expected
        if expected:
            seen.add(p)
            top = max(top, p)


@pytest.mark.parametrize("key", [bytes(range(32)), bytes(range(64)), bytes(range(100))])
def test_mac_is_keyed_blake2b_of_the_body(key: bytes) -> None:
    """The precomputed keyed state gives exactly RFC 7693 keyed BLAKE2b (longer keys hashed
    down first): the MAC on the wire does not depend on how it is computed."""
    import hashlib

    auth = Authenticator(key)
    mac_key = hashlib.blake2b(key).digest() if len(key) > 64 else key
    for body in (b"", b"x", bytes(range(256)) * 7):
        expected = hashlib.blake2b(body, key=mac_key, digest_size=MAC_SIZE).digest()
        assert auth.sign(body) == expected
        assert auth.sign(body) == expected  # the keyed state is reused, not consumed
        assert auth.verify(body, expected)
        assert not auth.verify(body, bytes(MAC_SIZE))


@pytest.mark.parametrize("mtype", list(MsgType))
def test_encoder_gives_the_same_bytes_as_encode(mtype: MsgType) -> None:
    encoder = wire.Encoder(AUTH)
    payload = PAYLOADS[mtype]
    for packet in (1, 2, 1 << 40):
        data = encoder.encode(mtype, 3, 1_700_000_000_001, packet, payload)
        assert data == wire.encode(AUTH, mtype, 3, 1_700_000_000_001, packet, payload)
    # (key, value) tuples, as the sender builds them, travel as the same arrays as lists
    data = encoder.encode(MsgType.DATA, 3, 5, 9, [1, 0, [(KEY4, VALUE)], []])
    assert data == wire.encode(AUTH, MsgType.DATA, 3, 5, 9, [1, 0, [[KEY4, VALUE]], []])
    assert wire.decode(AUTH, data).payload == [1, 0, [[KEY4, VALUE]], []]
