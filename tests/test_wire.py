"""The wire peeker, both implementations, against protobuf's own parser."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
from envoy.service.discovery.v3 import discovery_pb2 as pb
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twins import Cores

from xdsfast import _core_py, wire

# Read here, not from xdsfast._ext: a missing compiled core must fail test_compiled_core_in_use.
NO_EXTENSIONS = bool(os.environ.get("XDSFAST_NO_EXTENSIONS"))


@pytest.fixture
def core(twins: Cores) -> ModuleType:
    """The peeker of each kind (the ``twins`` fixture: tests/twins.py)."""
    return twins.core


# -- which implementation is active -------------------------------------------------------


def test_compiled_core_in_use() -> None:
    if NO_EXTENSIONS:
        assert wire.IMPLEMENTATION == "python"
        assert wire.peek_response is _core_py.peek_response
    else:
        from xdsfast import _core

        assert wire.IMPLEMENTATION == "cython"
        assert wire.peek_response is _core.peek_response
        assert _core.__file__.endswith((".so", ".pyd"))


def test_env_switch_forces_the_twin() -> None:
    code = "from xdsfast import wire; print(wire.IMPLEMENTATION)"
    env = dict(os.environ, XDSFAST_NO_EXTENSIONS="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "python"


def test_wire_error_is_shared_and_a_value_error(core: ModuleType) -> None:
    assert issubclass(wire.WireError, ValueError)
    with pytest.raises(wire.WireError):
        core.peek_response(b"\x00")


# -- protobuf as the oracle ---------------------------------------------------------------


def expected(message: Message) -> dict[str, object]:
    """What the peeker must report, read through protobuf's own API."""
    if isinstance(message, pb.DiscoveryRequest):
        return {
            "type_url": message.type_url,
            "version_info": message.version_info,
            "response_nonce": message.response_nonce,
            "has_node": message.HasField("node"),
            "has_error_detail": message.HasField("error_detail"),
            "resource_name_count": len(message.resource_names),
        }
    if isinstance(message, pb.DiscoveryResponse):
        return {
            "type_url": message.type_url,
            "version_info": message.version_info,
            "nonce": message.nonce,
            "resource_count": len(message.resources),
        }
    if isinstance(message, pb.DeltaDiscoveryRequest):
        return {
            "type_url": message.type_url,
            "response_nonce": message.response_nonce,
            "has_node": message.HasField("node"),
            "has_error_detail": message.HasField("error_detail"),
            "subscribe_count": len(message.resource_names_subscribe),
            "unsubscribe_count": len(message.resource_names_unsubscribe),
        }
    assert isinstance(message, pb.DeltaDiscoveryResponse)
    return {
        "type_url": message.type_url,
        "system_version_info": message.system_version_info,
        "nonce": message.nonce,
        "resource_count": len(message.resources),
        "removed_count": len(message.removed_resources),
    }


PEEKERS: dict[type[Message], str] = {
    pb.DiscoveryRequest: "peek_request",
    pb.DiscoveryResponse: "peek_response",
    pb.DeltaDiscoveryRequest: "peek_delta_request",
    pb.DeltaDiscoveryResponse: "peek_delta_response",
}


def peeked(
    core: ModuleType, cls: type[Message], data: bytes | bytearray | memoryview
) -> dict[str, object]:
    result = getattr(core, PEEKERS[cls])(data)
    return {key: getattr(result, key) for key in expected(cls())}


def assert_agrees(core: ModuleType, cls: type[Message], data: bytes) -> None:
    """The peeker agrees with protobuf: same fields, or both reject the bytes."""
    try:
        message = cls.FromString(data)
    except DecodeError:
        with pytest.raises(wire.WireError):
            getattr(core, PEEKERS[cls])(data)
        return
    assert peeked(core, cls, data) == expected(message)


# -- hand-built cases ---------------------------------------------------------------------

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def test_empty_message(core: ModuleType) -> None:
    assert peeked(core, pb.DiscoveryResponse, b"") == expected(pb.DiscoveryResponse())
    assert peeked(core, pb.DeltaDiscoveryRequest, b"") == expected(pb.DeltaDiscoveryRequest())


def test_request_fields(core: ModuleType) -> None:
    req = pb.DiscoveryRequest(
        version_info="7", type_url=CDS, response_nonce="abc", resource_names=["a", "b", "c"]
    )
    req.node.id = "sidecar~1.1.1.1~x.ns~ns.svc.cluster.local"
    req.error_detail.code = 13
    req.error_detail.message = "rejected"
    got = core.peek_request(req.SerializeToString())
    assert (got.type_url, got.version_info, got.response_nonce) == (CDS, "7", "abc")
    assert got.has_node and got.has_error_detail
    assert got.resource_name_count == 3


def test_present_but_empty_submessage_counts_as_present(core: ModuleType) -> None:
    req = pb.DiscoveryRequest(type_url=CDS)
    req.node.SetInParent()
    data = req.SerializeToString()
    assert b"\x12\x00" in data
    assert core.peek_request(data).has_node is True
    assert (
        core.peek_request(pb.DiscoveryRequest(type_url=CDS).SerializeToString()).has_node is False
    )


def test_accepts_bytes_bytearray_memoryview(core: ModuleType) -> None:
    data = pb.DiscoveryResponse(type_url=CDS, nonce="n", version_info="v").SerializeToString()
    framed = b"\x00" + len(data).to_bytes(4, "big") + data  # a gRPC frame around it
    for view in (data, bytearray(data), memoryview(data), memoryview(framed)[5:]):
        got = core.peek_response(view)
        assert (got.type_url, got.nonce, got.version_info) == (CDS, "n", "v")


def test_rejects_non_buffers(core: ModuleType) -> None:
    with pytest.raises(TypeError):
        core.peek_response("not bytes")


def test_last_one_wins_and_order_free(core: ModuleType) -> None:
    # nonce, then type_url twice, then version: the last type_url wins.
    data = b"*\x02n1" + b'"\x01a' + b"\x12\x00" + b'"\x01b' + b"\n\x02v9"
    got = core.peek_response(data)
    assert (got.type_url, got.nonce, got.version_info, got.resource_count) == ("b", "n1", "v9", 1)
    assert_agrees(core, pb.DiscoveryResponse, data)


def test_known_field_with_wrong_wire_type_is_unknown(core: ModuleType) -> None:
    data = b"\x20\x05" + b"\x2a\x01n"  # field 4 (type_url) as a varint
    assert core.peek_response(data).type_url == ""
    assert_agrees(core, pb.DiscoveryResponse, data)


def test_unknown_fields_of_every_wire_type_are_skipped(core: ModuleType) -> None:
    unknown = (
        b"\xf8\x01\x96\x01"  # field 31 varint
        + b"\xf9\x01"
        + b"\x01" * 8  # field 31 fixed64
        + b"\xfa\x01\x03abc"  # field 31 LEN
        + b"\xfd\x01"
        + b"\x02" * 4  # field 31 fixed32
        + b"\xfb\x01"
        + b'"\x01x'
        + b"\xfb\x01\xfc\x01"
        + b"\xfc\x01"  # field 31 nested groups
    )
    data = unknown + b'"\x03cds' + unknown + b"*\x01n"
    got = core.peek_response(data)
    assert (got.type_url, got.nonce) == ("cds", "n")
    assert_agrees(core, pb.DiscoveryResponse, data)


def test_fields_inside_a_group_are_not_top_level(core: ModuleType) -> None:
    data = b'"\x01a' + b"\xfb\x01" + b'"\x01b' + b"\xfc\x01"
    assert core.peek_response(data).type_url == "a"
    assert_agrees(core, pb.DiscoveryResponse, data)


MALFORMED = {
    "truncated tag": b"\x80",
    "truncated varint value": b"\x18\x80",
    "length past the end": b"\n\x05ab",
    "huge length": b"\n\xff\xff\xff\xff\x0fab",
    "field number 0": b"\x02\x00",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "truncated fixed64": b"\x19\x01\x02",
    "truncated fixed32": b"\x1d\x01",
    "unterminated group": b"\x1b",
    "end group without start": b"\x1c",
    "mismatched end group": b"\x1b\x24",
    "invalid UTF-8 in type_url": b'"\x02\xc3\x28',
    "varint over 10 bytes": b"\x18" + b"\x80" * 10 + b"\x01",
    "tag over 32 bits": b"\x80\x80\x80\x80\x80\x01",
    "groups nested too deep": b"\x1b" * 101 + b"\x1c" * 101,
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("cls", PEEKERS, ids=lambda c: c.__name__)
def test_malformed_raises_wire_error(core: ModuleType, cls: type[Message], data: bytes) -> None:
    if data.startswith(b'"') and cls is pb.DeltaDiscoveryRequest:
        data = b"\x12" + data[1:]  # type_url is field 2 there
    with pytest.raises(wire.WireError):
        getattr(core, PEEKERS[cls])(data)


def test_invalid_utf8_only_matters_where_returned(core: ModuleType) -> None:
    # resource_names (field 3) is counted, not returned: its bytes are not read.
    assert core.peek_request(b"\x1a\x02\xc3\x28").resource_name_count == 1
    with pytest.raises(wire.WireError):
        core.peek_request(b"\x2a\x02\xc3\x28")  # response_nonce is returned


def test_ten_byte_varint_is_accepted(core: ModuleType) -> None:
    data = b"\x18" + b"\xff" * 9 + b"\x01" + b'"\x01t'
    assert core.peek_response(data).type_url == "t"
    assert_agrees(core, pb.DiscoveryResponse, data)


def test_large_cds_response_hops_over_resources(core: ModuleType) -> None:
    resources = [any_pb2.Any(type_url=CDS, value=os.urandom(1200)) for _ in range(500)]
    data = pb.DiscoveryResponse(
        version_info="2026-11-27T00:00:00Z/42", resources=resources, type_url=CDS, nonce="x"
    ).SerializeToString()
    got = core.peek_response(data)
    assert (got.type_url, got.resource_count) == (CDS, 500)


# -- property-based equivalence -----------------------------------------------------------

text = st.text(max_size=40)
names = st.lists(text, max_size=5)
anys = st.lists(st.builds(any_pb2.Any, type_url=text, value=st.binary(max_size=64)), max_size=4)


@st.composite
def requests(draw: st.DrawFn) -> pb.DiscoveryRequest:
    msg = pb.DiscoveryRequest(
        version_info=draw(text),
        type_url=draw(text),
        response_nonce=draw(text),
        resource_names=draw(names),
    )
    if draw(st.booleans()):
        msg.node.id = draw(text)
    if draw(st.booleans()):
        msg.error_detail.code = draw(st.integers(0, 16))
        msg.error_detail.message = draw(text)
    return msg


@st.composite
def responses(draw: st.DrawFn) -> pb.DiscoveryResponse:
    msg = pb.DiscoveryResponse(
        version_info=draw(text),
        resources=draw(anys),
        canary=draw(st.booleans()),
        type_url=draw(text),
        nonce=draw(text),
    )
    if draw(st.booleans()):
        msg.control_plane.identifier = draw(text)
    return msg


@st.composite
def delta_requests(draw: st.DrawFn) -> pb.DeltaDiscoveryRequest:
    msg = pb.DeltaDiscoveryRequest(
        type_url=draw(text),
        resource_names_subscribe=draw(names),
        resource_names_unsubscribe=draw(names),
        initial_resource_versions=draw(st.dictionaries(text, text, max_size=3)),
        response_nonce=draw(text),
    )
    if draw(st.booleans()):
        msg.node.id = draw(text)
    if draw(st.booleans()):
        msg.error_detail.code = 13
        msg.error_detail.message = draw(text)
    return msg


@st.composite
def delta_responses(draw: st.DrawFn) -> pb.DeltaDiscoveryResponse:
    resources = [pb.Resource(name=draw(text), version=draw(text), resource=a) for a in draw(anys)]
    return pb.DeltaDiscoveryResponse(
        system_version_info=draw(text),
        resources=resources,
        type_url=draw(text),
        nonce=draw(text),
        removed_resources=draw(names),
    )


messages = st.one_of(requests(), responses(), delta_requests(), delta_responses())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def split_fields(data: bytes) -> list[bytes]:
    """Cut a well-formed message into its top-level records (tag included)."""
    records = []
    pos = 0
    while pos < len(data):
        start = pos
        tag = 0
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            tag |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        wire_type = tag & 7
        if wire_type == 0:
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        elif wire_type == 2:
            length = 0
            shift = 0
            while True:
                byte = data[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            pos += length
        else:  # generated messages only use varint and LEN at the top level here
            raise AssertionError(f"unexpected wire type {wire_type}")
        records.append(data[start:pos])
    return records


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """A record with a field number no discovery message uses."""
    field = draw(st.integers(10, 5000))
    kind = draw(st.sampled_from([0, 1, 2, 3, 5]))
    tag = _varint(field << 3 | kind)
    if kind == 0:
        return tag + _varint(draw(st.integers(0, 2**64 - 1)))
    if kind == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if kind == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if kind == 2:
        body = draw(st.binary(max_size=30))
        return tag + _varint(len(body)) + body
    inner = draw(st.binary(max_size=10))
    body = _varint(7 << 3 | 2) + _varint(len(inner)) + inner
    return tag + body + _varint(field << 3 | 4)


@st.composite
def spliced(draw: st.DrawFn) -> tuple[type[Message], bytes]:
    """A valid message re-laid: records shuffled, some doubled, unknown fields mixed in."""
    message = draw(messages)
    records = split_fields(message.SerializeToString())
    extra = [
        draw(messages.filter(lambda m: type(m) is type(message))).SerializeToString()
        for _ in range(draw(st.integers(0, 2)))
    ]
    for other in extra:  # repeat singular fields: a later value must win
        records += split_fields(other)
    records += draw(st.lists(unknown_fields(), max_size=4))
    rng = random.Random(draw(st.integers(0, 2**32)))
    rng.shuffle(records)
    return type(message), b"".join(records)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=messages)
def test_equivalent_to_protobuf(core: ModuleType, message: Message) -> None:
    data = message.SerializeToString()
    assert peeked(core, type(message), data) == expected(message)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=spliced())
def test_spliced_equivalent_to_protobuf(
    core: ModuleType, case: tuple[type[Message], bytes]
) -> None:
    cls, data = case
    assert peeked(core, cls, data) == expected(cls.FromString(data))


# -- fuzzing: only ever a result or WireError ----------------------------------------------


def _outcome(fn: Callable[[bytes], object], data: bytes) -> object:
    try:
        result = fn(data)
    except wire.WireError as exc:
        return ("WireError", str(exc))
    return repr(result)


def assert_sound(core: ModuleType, cls: type[Message], data: bytes) -> None:
    """Both twins end the same way; whatever protobuf accepts, the peeker reads alike.

    The peeker looks only at the top level, so it may accept bytes protobuf
    rejects for what lies inside a sub-message; never the other way round.
    """
    outcome = _outcome(getattr(core, PEEKERS[cls]), data)  # any other exception fails
    assert outcome == _outcome(getattr(_core_py, PEEKERS[cls]), data)
    try:
        message = cls.FromString(data)
    except DecodeError:
        return
    assert peeked(core, cls, data) == expected(message)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), cls=st.sampled_from(list(PEEKERS)))
def test_fuzz_raw_bytes(core: ModuleType, data: bytes, cls: type[Message]) -> None:
    assert_sound(core, cls, data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    message=messages,
    cuts=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    truncate=st.integers(0, 10**6),
)
def test_fuzz_mutated_messages(
    core: ModuleType, message: Message, cuts: list[tuple[int, int]], truncate: int
) -> None:
    data = bytearray(message.SerializeToString())
    for where, value in cuts:
        if data:
            data[where % len(data)] = value
    if data and truncate % 3 == 0:
        del data[truncate % len(data) :]
    assert_sound(core, type(message), bytes(data))


# -- runs of resources (the compiled core hops over them in a tight loop) ------------------


@pytest.mark.parametrize("sizes", [[0] * 50, [1, 127, 128, 16383, 16384, 70000, 5], [300] * 20])
def test_resource_runs(core: ModuleType, sizes: list[int]) -> None:
    resources = [any_pb2.Any(type_url="t", value=b"v" * size) for size in sizes]
    message = pb.DiscoveryResponse(resources=resources, type_url=CDS, nonce="n")
    data = message.SerializeToString()
    assert peeked(core, pb.DiscoveryResponse, data) == expected(message)


def test_every_truncation_and_corruption_of_a_run(core: ModuleType) -> None:
    resources = [any_pb2.Any(type_url="t", value=b"v" * size) for size in (3, 200, 0, 129, 7)]
    data = pb.DiscoveryResponse(
        version_info="1", resources=resources, type_url=CDS, nonce="n"
    ).SerializeToString()
    for cut in range(len(data)):
        assert_sound(core, pb.DiscoveryResponse, data[:cut])
    for where in range(len(data)):
        for value in (0x00, 0x12, 0x7F, 0x80, 0xFF):
            corrupted = bytearray(data)
            corrupted[where] = value
            assert_sound(core, pb.DiscoveryResponse, bytes(corrupted))
