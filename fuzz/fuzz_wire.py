"""Fuzz both wire peekers: same answer or both WireError, and nothing but WireError.

The streaming peekers (ResponseScanner) are fed each input cut at random places (drawn
from the input itself, so a run is repeatable) and must end as the whole-message peeker
does, error message included, and agree on the first resource's type.

python fuzz/fuzz_wire.py -runs=5000000
"""

from __future__ import annotations

import itertools
import random
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


def _told(peek: Callable[[Any], Any], data: Any, fields: tuple[str, ...]) -> tuple[Any, ...]:
    """As _outcome, with the error's message: the streaming peeker must say the same."""
    try:
        result = peek(data)
    except WireError as exc:
        return ("WireError", str(exc))
    return tuple(getattr(result, f) for f in fields)


def _streamed(
    module: Any, delta: bool, data: bytes, cuts: list[int], known: bool, fields: tuple[str, ...]
) -> tuple[tuple[Any, ...], Any]:
    """Feed ``data`` cut at ``cuts``: the outcome and the first resource's type."""
    scanner = module.ResponseScanner(delta, len(data) if known else None)
    view = memoryview(data)
    try:
        for start, end in itertools.pairwise([0, *cuts, len(data)]):
            scanner.feed(view[start:end])
        result = scanner.finish()
    except WireError as exc:
        return ("WireError", str(exc)), scanner.first_resource_type
    return tuple(getattr(result, f) for f in fields), scanner.first_resource_type


def _cuts(data: bytes) -> list[int]:
    rng = random.Random(data)
    if len(data) <= 256 and rng.random() < 0.25:
        return list(range(1, len(data)))  # one byte at a time
    return sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 8)))


def test_one_input(data: bytes) -> None:
    view = memoryview(bytearray(data))
    for name, compiled, python, fields in _PAIRS:
        fast = _outcome(compiled, data, fields)
        slow = _outcome(python, data, fields)
        if fast != slow:
            raise AssertionError(f"{name}: cython {fast!r} != python {slow!r} for {data!r}")
        if _outcome(compiled, view, fields) != fast:
            raise AssertionError(f"{name}: memoryview differs from bytes for {data!r}")
    cuts = _cuts(data)
    for name, delta in (("peek_response", False), ("peek_delta_response", True)):
        fields = _FIELDS[name]
        whole = _told(getattr(_core, name), data, fields)
        for known in (False, True):
            fast, first = _streamed(_core, delta, data, cuts, known, fields)
            slow, slow_first = _streamed(_core_py, delta, data, cuts, known, fields)
            if fast != whole or slow != whole or first != slow_first:
                raise AssertionError(
                    f"{name} streamed (cuts {cuts}, length told: {known}): cython {fast!r} "
                    f"{first!r}, python {slow!r} {slow_first!r}, whole {whole!r} for {data!r}"
                )


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
    # Pushes with several resources, for the streaming peekers' walk into the first one.
    push = xds_pb2.DiscoveryResponse(version_info="8", type_url=t, nonce="n6")
    for size in (0, 3, 130):
        push.resources.add(type_url=t, value=b"v" * size)
    delta_push = xds_pb2.DeltaDiscoveryResponse(system_version_info="10", type_url=t, nonce="n7")
    for name in ("a", "b"):
        resource = delta_push.resources.add(name=name, version="1")
        resource.resource.type_url = t
        resource.resource.value = b"\x0a\x01" + name.encode()
    out += [push.SerializeToString(), delta_push.SerializeToString()]
    return out


if __name__ == "__main__":
    sys.exit(main(test_one_input, seeds()))
