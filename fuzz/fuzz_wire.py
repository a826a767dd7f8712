"""Fuzz both wire peekers: same answer or both WireError, and nothing but WireError.

python fuzz/fuzz_wire.py -runs=5000000
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from _driver import instrumented, main
from envoy.service.discovery.v3 import discovery_pb2 as xds_pb2

with instrumented():
    from xdsfast import _core, _core_py
    from xdsfast._errors import WireError

_FIELDS = {
    "peek_request": (
        "type_url",
        "version_info",
        "response_nonce",
        "has_node",
        "has_error_detail",
        "resource_name_count",
    ),
    "peek_response": ("type_url", "version_info", "nonce", "resource_count"),
    "peek_delta_request": (
        "type_url",
        "response_nonce",
        "has_node",
        "has_error_detail",
        "subscribe_count",
        "unsubscribe_count",
    ),
    "peek_delta_response": (
        "type_url",
        "system_version_info",
        "nonce",
        "resource_count",
        "removed_count",
    ),
}

_PAIRS: list[tuple[str, Callable[[Any], Any], Callable[[Any], Any], tuple[str, ...]]] = [
    (name, getattr(_core, name), getattr(_core_py, name), fields)
    for name, fields in _FIELDS.items()
]


def _outcome(peek: Callable[[Any], Any], data: Any, fields: tuple[str, ...]) -> tuple[Any, ...]:
    try:
        result = peek(data)
    except WireError:
        return ("WireError",)
    return tuple(getattr(result, f) for f in fields)


def test_one_input(data: bytes) -> None:
    view = memoryview(bytearray(data))
    for name, compiled, python, fields in _PAIRS:
        fast = _outcome(compiled, data, fields)
        slow = _outcome(python, data, fields)
        if fast != slow:
            raise AssertionError(f"{name}: cython {fast!r} != python {slow!r} for {data!r}")
        if _outcome(compiled, view, fields) != fast:
            raise AssertionError(f"{name}: memoryview differs from bytes for {data!r}")


def seeds() -> list[bytes]:
    t = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    request = xds_pb2.DiscoveryRequest(
        version_info="1", type_url=t, response_nonce="n1", resource_names=["a", "b"]
    )
    request.node.id = "sidecar~1.2.3.4~x.y~y.svc.cluster.local"
    nack = xds_pb2.DiscoveryRequest(type_url=t, response_nonce="n2")
    nack.error_detail.code = 13
    nack.error_detail.message = "rejected"
    response = xds_pb2.DiscoveryResponse(version_info="7", type_url=t, nonce="n3")
    response.resources.add(type_url=t, value=b"\x0a\x03abc")
    delta_request = xds_pb2.DeltaDiscoveryRequest(
        type_url=t,
        response_nonce="n4",
        resource_names_subscribe=["a"],
        resource_names_unsubscribe=["b"],
    )
    delta_request.node.id = "n"
    delta_response = xds_pb2.DeltaDiscoveryResponse(
        system_version_info="9", type_url=t, nonce="n5", removed_resources=["z"]
    )
    delta_response.resources.add(name="a", version="v")
    out = [m.SerializeToString() for m in (request, nack, response, delta_request, delta_response)]
    # Groups, fixed64/fixed32 fields and an unknown field, by hand.
    out += [b"\x0b\x08\x01\x0c\x12\x01x", b"\x09" + bytes(8) + b"\x15" + bytes(4), b"\xf8\x07\x01"]
    return out


if __name__ == "__main__":
    sys.exit(main(test_one_input, seeds()))
