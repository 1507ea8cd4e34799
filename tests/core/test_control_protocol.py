"""The control socket's request/reply encoding (pure: bytes in, values or errors out)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctsync.io.control import (
    ERROR_CODES,
    MAX_REQUEST,
    AgentError,
    AgentUnreachable,
    ProtocolError,
    Request,
    decode_reply,
    decode_request,
    encode_error,
    encode_ok,
    encode_request,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def test_request_round_trip() -> None:
    line = encode_request("commit", {"family": "ipv4"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == Request("commit", {"family": "ipv4"})
    assert decode_request(encode_request("stats")) == Request("stats", {})
    assert decode_request(b'{"command": "stats", "args": null}') == Request("stats", {})
    assert decode_request(b'{"command": "stats"}') == Request("stats", {})


@given(st.text(min_size=1, max_size=30), st.dictionaries(st.text(max_size=8), json_values))
def test_request_round_trip_any(command: str, args: dict[str, object]) -> None:
    assert decode_request(encode_request(command, args)) == Request(command, args)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not JSON"),
        (b"nope", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"commit"', "not a JSON object"),
        (b"{}", "'command'"),
        (b'{"command": ""}', "'command'"),
        (b'{"command": 3}', "'command'"),
        (b'{"command": "x", "args": [1]}', "'args'"),
        (b'{"command": "x", "extra": 1}', "unknown keys"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    ],
)
def test_bad_requests_raise_protocol_error(data: bytes, message: str) -> None:
    if len(data) > MAX_REQUEST:
        with pytest.raises(ProtocolError) as err:
            decode_request(data)
        assert err.value.code == "too-large"
        return
    with pytest.raises(ProtocolError, match=message) as err:
        decode_request(data)
    assert err.value.code == "malformed"


def test_deep_nesting_within_limit_is_a_protocol_error() -> None:
    data = b'{"command": "x", "args": {"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}"
    assert len(data) <= MAX_REQUEST
    with pytest.raises(ProtocolError):
        decode_request(data)


@given(st.binary(max_size=200))
def test_decode_request_raises_only_protocol_error(data: bytes) -> None:
    try:
        req = decode_request(data)
    except ProtocolError:
        return
    assert isinstance(req.command, str) and isinstance(req.args, dict)


def test_encode_request_refuses_oversize() -> None:
    with pytest.raises(ValueError, match="limit"):
        encode_request("x", {"blob": "y" * MAX_REQUEST})


def test_replies() -> None:
    assert decode_reply(encode_ok({"entries": 3})) == {"entries": 3}
    assert decode_reply(encode_ok(None)) is None
    with pytest.raises(AgentError, match="commit failed") as err:
        decode_reply(encode_error("commit failed", "failed"))
    assert err.value.code == "failed"
    with pytest.raises(AgentUnreachable, match="permission denied"):
        decode_reply(encode_error("permission denied: uid 1000", "denied"))
    assert json.loads(encode_error("x", "malformed")) == {
        "ok": False,
        "error": "x",
        "code": "malformed",
    }
    assert {"denied", "malformed", "too-large", "unknown-command", "failed"} <= ERROR_CODES


@pytest.mark.parametrize(
    "data", [b"", b"\n", b"garbage", b"[1]", b'{"result": 1}', b'{"ok": "yes"}', b"\xff"]
)
def test_bad_replies_raise_agent_error(data: bytes) -> None:
    with pytest.raises(AgentError):
        decode_reply(data)


def test_error_reply_without_message() -> None:
    with pytest.raises(AgentError, match="unspecified error"):
        decode_reply(b'{"ok": false}')


def test_encode_ok_refuses_non_json() -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_ok({"x": object()})
    with pytest.raises(ValueError):
        encode_ok(float("nan"))
