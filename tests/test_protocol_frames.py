"""Unit tests of the frame layer: layout, encoders, decoders and split_frames."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supctl.protocol import SUBPROTOCOL, ErrorCode, FrameError, FrameType, OpenRequest, check_ip_address
from supctl.protocol.frames import (
    CLOSE_CODE_BASE,
    HEADER_SIZE,
    MAX_CONTROL,
    MAX_DATA,
    MAX_PAYLOAD,
    MAX_REASON,
    MAX_WINDOW,
    Frame,
    decode_reset,
    decode_u32,
    encode,
    encode_reset,
    encode_window,
    split_frames,
)
from supctl.protocol.messages import decode_hello, decode_object, encode_hello

# --- constants and layout -------------------------------------------------------


def test_header_layout_is_type_u8_stream_u32_length_u32() -> None:
    assert HEADER_SIZE == 9
    raw = encode(FrameType.DATA, 0x01020304, b"xyz")
    assert raw == b"\x03" + b"\x01\x02\x03\x04" + b"\x00\x00\x00\x03" + b"xyz"


def test_constants() -> None:
    assert SUBPROTOCOL == "supctl.v1"
    assert MAX_DATA == 256 * 1024
    assert MAX_PAYLOAD == MAX_DATA
    assert MAX_WINDOW == 2**31 - 1
    assert MAX_REASON == 1024
    assert MAX_CONTROL == 4096
    assert CLOSE_CODE_BASE == 4000


def test_frame_type_values_are_the_wire_values() -> None:
    assert {t.name: t.value for t in FrameType} == {
        "HELLO": 0,
        "OPEN": 1,
        "ACCEPT": 2,
        "DATA": 3,
        "WINDOW": 4,
        "EOF": 5,
        "RESET": 6,
        "CONTROL": 7,
        "STATUS": 8,
        "GOAWAY": 9,
    }


def test_error_code_values_are_the_wire_values() -> None:
    assert {c.name: c.value for c in ErrorCode} == {
        "CANCEL": 1,
        "REFUSED": 2,
        "UNREACHABLE": 3,
        "TIMEOUT": 4,
        "NOT_FOUND": 5,
        "DENIED": 6,
        "PROTOCOL": 7,
        "INTERNAL": 8,
        "LINK_LOST": 9,
        "CONNECTION_RESET": 10,
        "UNSUPPORTED": 11,
        "FLOW_CONTROL": 12,
        "FRAME_SIZE": 13,
        "LIMIT": 14,
        "GOING_AWAY": 15,
    }


@pytest.mark.parametrize("value", [0, 16, 999, 0xFFFF])
def test_unknown_error_codes_parse_as_internal(value: int) -> None:
    assert ErrorCode.parse(value) is ErrorCode.INTERNAL


@pytest.mark.parametrize("code", list(ErrorCode))
def test_known_error_codes_parse_as_themselves(code: ErrorCode) -> None:
    assert ErrorCode.parse(int(code)) is code


# --- each frame type ----------------------------------------------------------------


def test_hello_frame_round_trip() -> None:
    payload = encode_hello({"site": "s1", "containers": ["a", "b"]})
    (frame,) = split_frames(encode(FrameType.HELLO, 0, payload))
    assert frame == Frame(FrameType.HELLO, 0, payload)
    assert decode_hello(frame.payload) == {"site": "s1", "containers": ["a", "b"]}


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[]", b"1", b'"x"', b"null"])
def test_hello_payload_must_be_a_json_object(raw: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_hello(raw)
    assert info.value.code is ErrorCode.PROTOCOL


def test_status_frame_round_trip() -> None:
    payload = encode_hello({"applications": {}})
    (frame,) = split_frames(encode(FrameType.STATUS, 0, payload))
    assert frame == Frame(FrameType.STATUS, 0, payload)
    assert decode_object(frame.payload, "STATUS") == {"applications": {}}


def test_control_frame_round_trip() -> None:
    payload = encode_hello({"signal": "INT"})
    (frame,) = split_frames(encode(FrameType.CONTROL, 5, payload))
    assert frame == Frame(FrameType.CONTROL, 5, payload)
    assert decode_object(frame.payload, "CONTROL") == {"signal": "INT"}


@pytest.mark.parametrize("what", ["STATUS", "CONTROL"])
def test_decode_object_names_the_frame(what: str) -> None:
    with pytest.raises(FrameError, match=f"{what} is not JSON"):
        decode_object(b"{", what)
    with pytest.raises(FrameError, match=f"{what} must be a JSON object"):
        decode_object(b"[1]", what)


def test_open_frame_round_trip() -> None:
    req = OpenRequest(verb="tcp", application="app", service_instance="si", protocol="tcp", port=80)
    payload = struct.pack("!I", 4096) + req.to_json()
    (frame,) = split_frames(encode(FrameType.OPEN, 1, payload))
    assert frame.type is FrameType.OPEN and frame.stream_id == 1
    assert decode_u32(frame.payload[:4], "OPEN") == 4096
    assert OpenRequest.from_json(frame.payload[4:]) == req


def test_accept_frame_round_trip() -> None:
    (frame,) = split_frames(encode(FrameType.ACCEPT, 2, struct.pack("!I", 65536)))
    assert decode_u32(frame.payload, "ACCEPT") == 65536


def test_data_frame_round_trip_including_empty() -> None:
    frames = split_frames(encode(FrameType.DATA, 7, b"hello") + encode(FrameType.DATA, 7, b""))
    assert frames == [Frame(FrameType.DATA, 7, b"hello"), Frame(FrameType.DATA, 7, b"")]


def test_window_frame_round_trip() -> None:
    raw = encode_window(5, 0xDEADBEEF)
    assert raw == encode(FrameType.WINDOW, 5, struct.pack("!I", 0xDEADBEEF))
    (frame,) = split_frames(raw)
    assert decode_u32(frame.payload, "WINDOW") == 0xDEADBEEF


def test_eof_frame_round_trip() -> None:
    assert split_frames(encode(FrameType.EOF, 3)) == [Frame(FrameType.EOF, 3, b"")]


def test_reset_frame_round_trip() -> None:
    raw = encode_reset(9, ErrorCode.REFUSED, "connection refused: 10.0.0.1:80")
    (frame,) = split_frames(raw)
    assert frame.type is FrameType.RESET and frame.stream_id == 9
    assert frame.payload[:2] == b"\x00\x02"
    assert decode_reset(frame.payload) == (ErrorCode.REFUSED, "connection refused: 10.0.0.1:80")


def test_reset_text_is_cut_not_refused() -> None:
    raw = encode_reset(1, ErrorCode.INTERNAL, "x" * 5000)
    (frame,) = split_frames(raw)
    code, text = decode_reset(frame.payload)
    assert code is ErrorCode.INTERNAL
    assert text == "x" * MAX_REASON


def test_reset_text_cut_inside_a_utf8_sequence_decodes_with_replacement() -> None:
    raw = encode_reset(1, ErrorCode.CANCEL, "é" * MAX_REASON)  # 2 bytes each
    (frame,) = split_frames(raw)
    _, text = decode_reset(frame.payload)
    assert text == "é" * (MAX_REASON // 2)
    raw = encode_reset(1, ErrorCode.CANCEL, "a" + "é" * MAX_REASON)  # cut in the middle
    _, text = decode_reset(split_frames(raw)[0].payload)
    assert text.startswith("a") and text.endswith("\ufffd")


def test_reset_with_unknown_code_decodes_as_internal() -> None:
    assert decode_reset(b"\x12\x34bye") == (ErrorCode.INTERNAL, "bye")


@pytest.mark.parametrize("payload", [b"", b"\x00"])
def test_reset_payload_too_short(payload: bytes) -> None:
    with pytest.raises(FrameError):
        decode_reset(payload)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00"])
def test_u32_payload_must_be_exactly_four_bytes(payload: bytes) -> None:
    with pytest.raises(FrameError, match="WINDOW frame must carry 4 bytes"):
        decode_u32(payload, "WINDOW")


# --- split_frames: batching and malformed messages ------------------------------------


def test_several_frames_in_one_message_keep_their_order() -> None:
    raw = (
        encode(FrameType.OPEN, 1, b"\x00\x00\x10\x00{}")
        + encode(FrameType.DATA, 1, b"a")
        + encode_window(1, 10)
        + encode(FrameType.CONTROL, 1, b"{}")
        + encode(FrameType.EOF, 1)
        + encode_reset(1, ErrorCode.CANCEL, "")
    )
    assert [f.type for f in split_frames(raw)] == [
        FrameType.OPEN,
        FrameType.DATA,
        FrameType.WINDOW,
        FrameType.CONTROL,
        FrameType.EOF,
        FrameType.RESET,
    ]


def test_split_accepts_bytearray_and_memoryview() -> None:
    raw = encode(FrameType.DATA, 1, b"abc")
    expected = [Frame(FrameType.DATA, 1, b"abc")]
    assert split_frames(bytearray(raw)) == expected
    assert split_frames(memoryview(raw)) == expected
    # The payload is a copy: changing the buffer later changes nothing.
    buf = bytearray(raw)
    (frame,) = split_frames(buf)
    buf[-1] = 0
    assert frame.payload == b"abc"
    assert isinstance(frame.payload, bytes)


def test_empty_message() -> None:
    with pytest.raises(FrameError, match="empty message") as info:
        split_frames(b"")
    assert info.value.code is ErrorCode.PROTOCOL


@pytest.mark.parametrize("cut", range(1, HEADER_SIZE))
def test_truncated_header(cut: int) -> None:
    raw = encode(FrameType.DATA, 1, b"abc")
    with pytest.raises(FrameError, match="truncated frame header"):
        split_frames(raw[:cut])
    with pytest.raises(FrameError, match="truncated frame header"):
        split_frames(encode(FrameType.EOF, 1) + raw[:cut])


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_truncated_payload(cut: int) -> None:
    raw = encode(FrameType.DATA, 1, b"abc")
    with pytest.raises(FrameError, match="truncated frame payload") as info:
        split_frames(raw[: HEADER_SIZE + cut])
    assert info.value.code is ErrorCode.PROTOCOL


def test_length_larger_than_message_is_truncated_payload() -> None:
    raw = struct.pack("!BII", FrameType.DATA, 1, 100) + b"x" * 10
    with pytest.raises(FrameError, match="truncated frame payload"):
        split_frames(raw)


def test_largest_payload_is_allowed() -> None:
    (frame,) = split_frames(encode(FrameType.DATA, 1, b"\0" * MAX_PAYLOAD))
    assert len(frame.payload) == MAX_PAYLOAD


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**32 - 1])
def test_oversize_frame_is_frame_size_error_even_before_the_bytes_arrive(length: int) -> None:
    raw = struct.pack("!BII", FrameType.DATA, 1, length)
    with pytest.raises(FrameError) as info:
        split_frames(raw)
    assert info.value.code is ErrorCode.FRAME_SIZE


@pytest.mark.parametrize("type_", [10, 11, 0x7F, 0xFF])
def test_unknown_frame_type(type_: int) -> None:
    with pytest.raises(FrameError, match=f"unknown frame type {type_}") as info:
        split_frames(struct.pack("!BII", type_, 1, 0))
    assert info.value.code is ErrorCode.PROTOCOL


def test_unknown_frame_type_after_a_valid_frame() -> None:
    with pytest.raises(FrameError, match="unknown frame type"):
        split_frames(encode(FrameType.EOF, 1) + struct.pack("!BII", 10, 1, 0))


_frames = st.lists(
    st.builds(
        Frame,
        st.sampled_from(list(FrameType)),
        st.integers(0, 2**32 - 1),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames)
def test_split_inverts_encode(frames: list[Frame]) -> None:
    raw = b"".join(encode(f.type, f.stream_id, f.payload) for f in frames)
    assert split_frames(raw) == frames


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_split_raises_only_frame_error(raw: bytes) -> None:
    try:
        frames = split_frames(raw)
    except FrameError as exc:
        assert isinstance(exc.code, ErrorCode)
    else:
        assert raw and frames
        assert sum(HEADER_SIZE + len(f.payload) for f in frames) == len(raw)


# --- OPEN request payloads -------------------------------------------------------------


def test_open_request_json_round_trip_with_all_fields() -> None:
    req = OpenRequest(
        verb="exec",
        application="app",
        service_instance="si-1",
        container="c",
        protocol="tcp",
        port=65535,
        ip_address="::1",
        args={"argv": ["sh", "-c", "true"], "tty": False},
    )
    assert OpenRequest.from_json(req.to_json()) == req
    assert json.loads(req.to_json())["ip_address"] == "::1"


def test_open_request_defaults_and_target() -> None:
    req = OpenRequest.from_json(b'{"verb":"tcp","port":22}')
    assert req == OpenRequest(verb="tcp", port=22)
    assert req.target == "127.0.0.1:22"
    assert OpenRequest(verb="tcp", port=80, ip_address="fe80::1").target == "[fe80::1]:80"
    assert OpenRequest(verb="tcp", port=80, ip_address="10.1.2.3").target == "10.1.2.3:80"


def test_open_request_canonicalises_ip_address() -> None:
    req = OpenRequest.from_json(b'{"verb":"tcp","ip_address":"[0:0::1]"}')
    assert req.ip_address == "::1"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff",
        b"[]",
        b"null",
        b"{}",
        b'{"verb":""}',
        b'{"verb":1}',
        b'{"verb":"x","port":-1}',
        b'{"verb":"x","port":65536}',
        b'{"verb":"x","port":"80"}',
        b'{"verb":"x","port":true}',
        b'{"verb":"x","port":1.5}',
        b'{"verb":"x","args":[]}',
        b'{"verb":"x","ip_address":"localhost"}',
        b'{"verb":"x","ip_address":"10.0.0.300"}',
        b'{"verb":"x","ip_address":7}',
        b'{"verb":"x","application":null}',
        b'{"verb":"x","container":["c"]}',
    ],
)
def test_open_request_rejects_malformed_json(raw: bytes) -> None:
    with pytest.raises(FrameError) as info:
        OpenRequest.from_json(raw)
    assert info.value.code is ErrorCode.PROTOCOL


def test_open_request_length_limits() -> None:
    ok = json.dumps({"verb": "v" * 253, "application": "a" * 253}).encode()
    assert OpenRequest.from_json(ok).verb == "v" * 253
    for key in ("verb", "application", "service_instance", "container", "protocol"):
        raw = json.dumps({"verb": "x", key: "a" * 254}).encode()
        with pytest.raises(FrameError, match=key):
            OpenRequest.from_json(raw)
    raw = json.dumps({"verb": "x", "ip_address": "1" * 65}).encode()
    with pytest.raises(FrameError, match="ip_address"):
        OpenRequest.from_json(raw)


def test_check_ip_address() -> None:
    assert check_ip_address("10.0.0.1") == "10.0.0.1"
    assert check_ip_address("[::ffff:1.2.3.4]") == "1.2.3.4"
    for bad in ("example.com", "", "1.2.3", "::g"):
        with pytest.raises(ValueError):
            check_ip_address(bad)
