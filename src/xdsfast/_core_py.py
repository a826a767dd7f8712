"""Pure-Python twin of :mod:`xdsfast._core`: the reference and the fallback.

The peeker reads the handful of top-level fields the relay routes on
straight from protobuf wire bytes, without decoding the message.  Every
rule here (last one wins, unknown fields skipped, groups balanced, the
same errors) is mirrored line for line by ``_core.pyx``; the tests run
both against protobuf's own parser so the two cannot drift.
"""

from __future__ import annotations

from typing import Union

from xdsfast._errors import WireError

Buffer = Union[bytes, bytearray, memoryview]

# Field actions: what the scanner does with a length-delimited field.
# kind in the high nibble, slot in the low nibble.
_STR = 0x10  # keep the position of the last occurrence of a string
_CNT = 0x20  # count occurrences (a repeated field)
_HAS = 0x30  # note presence (a sub-message)

_MAX_DEPTH = 100  # protobuf's own recursion limit, applied to nested groups

# Per message kind: action for field numbers 0..15 (all fields peeked are < 16).
# Slots: strings 0..2, counts 0..1, presence 0..1.
_REQUEST = (0, _STR | 0, _HAS | 0, _CNT | 0, _STR | 1, _STR | 2, _HAS | 1) + (0,) * 9
_RESPONSE = (0, _STR | 0, _CNT | 0, 0, _STR | 1, _STR | 2) + (0,) * 10
_DELTA_REQUEST = (0, _HAS | 0, _STR | 1, _CNT | 0, _CNT | 1, 0, _STR | 2, _HAS | 1) + (0,) * 8
_DELTA_RESPONSE = (0, _STR | 0, _CNT | 0, 0, _STR | 1, _STR | 2, _CNT | 1) + (0,) * 9


class RequestPeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DiscoveryRequest``."""

    __slots__ = (
        "has_error_detail",
        "has_node",
        "resource_name_count",
        "response_nonce",
        "type_url",
        "version_info",
    )

    def __init__(
        self,
        type_url: str,
        version_info: str,
        response_nonce: str,
        has_node: bool,
        has_error_detail: bool,
        resource_name_count: int,
    ) -> None:
        self.type_url = type_url
        self.version_info = version_info
        self.response_nonce = response_nonce
        self.has_node = has_node
        self.has_error_detail = has_error_detail
        self.resource_name_count = resource_name_count

    def __repr__(self) -> str:
        return (
            f"RequestPeek(type_url={self.type_url!r}, version_info={self.version_info!r}, "
            f"response_nonce={self.response_nonce!r}, has_node={self.has_node}, "
            f"has_error_detail={self.has_error_detail}, "
            f"resource_name_count={self.resource_name_count})"
        )


class ResponsePeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DiscoveryResponse``."""

    __slots__ = ("nonce", "resource_count", "type_url", "version_info")

    def __init__(self, type_url: str, version_info: str, nonce: str, resource_count: int) -> None:
        self.type_url = type_url
        self.version_info = version_info
        self.nonce = nonce
        self.resource_count = resource_count

    def __repr__(self) -> str:
        return (
            f"ResponsePeek(type_url={self.type_url!r}, version_info={self.version_info!r}, "
            f"nonce={self.nonce!r}, resource_count={self.resource_count})"
        )


class DeltaRequestPeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DeltaDiscoveryRequest``."""

    __slots__ = (
        "has_error_detail",
        "has_node",
        "response_nonce",
        "subscribe_count",
        "type_url",
        "unsubscribe_count",
    )

    def __init__(
        self,
        type_url: str,
        response_nonce: str,
        has_node: bool,
        has_error_detail: bool,
        subscribe_count: int,
        unsubscribe_count: int,
    ) -> None:
        self.type_url = type_url
        self.response_nonce = response_nonce
        self.has_node = has_node
        self.has_error_detail = has_error_detail
        self.subscribe_count = subscribe_count
        self.unsubscribe_count = unsubscribe_count

    def __repr__(self) -> str:
        return (
            f"DeltaRequestPeek(type_url={self.type_url!r}, "
            f"response_nonce={self.response_nonce!r}, has_node={self.has_node}, "
            f"has_error_detail={self.has_error_detail}, "
            f"subscribe_count={self.subscribe_count}, "
            f"unsubscribe_count={self.unsubscribe_count})"
        )


class DeltaResponsePeek:
    """What the relay needs of an ``envoy.service.discovery.v3.DeltaDiscoveryResponse``.

    ``removed_count`` counts ``removed_resources`` (field 6).
    """

    __slots__ = ("nonce", "removed_count", "resource_count", "system_version_info", "type_url")

    def __init__(
        self,
        type_url: str,
        system_version_info: str,
        nonce: str,
        resource_count: int,
        removed_count: int,
    ) -> None:
        self.type_url = type_url
        self.system_version_info = system_version_info
        self.nonce = nonce
        self.resource_count = resource_count
        self.removed_count = removed_count

    def __repr__(self) -> str:
        return (
            f"DeltaResponsePeek(type_url={self.type_url!r}, "
            f"system_version_info={self.system_version_info!r}, nonce={self.nonce!r}, "
            f"resource_count={self.resource_count}, removed_count={self.removed_count})"
        )


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint of at most 10 bytes at ``pos``; return (value, next pos)."""
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos  # protobuf keeps 64 bits
        shift += 7


def _scan(data: Buffer, table: tuple[int, ...]) -> tuple[list[int], list[int], list[bool]]:
    """Walk the top level once; return (string spans, counts, presence).

    String spans are stored flat as [start0, len0, start1, len1, ...]; -1 means absent.
    """
    buf = memoryview(data).cast("B")
    end = len(buf)
    spans = [-1, 0, -1, 0, -1, 0]
    counts = [0, 0]
    has = [False, False]
    groups: list[int] = []  # field numbers of the groups we are inside
    pos = 0
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag > 0xFFFFFFFF:
            raise WireError("tag out of range")
        field = tag >> 3
        wire_type = tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            _, pos = _varint(buf, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(buf, pos, end)
            if length > end - pos:
                raise WireError("length past the end of the message")
            if not groups and field < 16:
                action = table[field]
                if action:
                    slot = action & 0x0F
                    kind = action & 0xF0
                    if kind == _STR:
                        spans[2 * slot] = pos
                        spans[2 * slot + 1] = length
                    elif kind == _CNT:
                        counts[slot] += 1
                    else:
                        has[slot] = True
            pos += length
        elif wire_type == 3:
            if len(groups) >= _MAX_DEPTH:
                raise WireError("groups nested too deeply")
            groups.append(field)
        elif wire_type == 4:
            if not groups or groups.pop() != field:
                raise WireError("unbalanced group")
        else:
            raise WireError(f"invalid wire type {wire_type}")
        if pos > end:
            raise WireError("field past the end of the message")
    if groups:
        raise WireError("unterminated group")
    return spans, counts, has


def _string(data: Buffer, spans: list[int], slot: int) -> str:
    start = spans[2 * slot]
    if start < 0:
        return ""
    raw = memoryview(data).cast("B")[start : start + spans[2 * slot + 1]]
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise WireError("string field is not valid UTF-8") from None


def peek_request(data: Buffer) -> RequestPeek:
    """Peek a SotW ``DiscoveryRequest``; raise :class:`WireError` if malformed."""
    spans, counts, has = _scan(data, _REQUEST)
    return RequestPeek(
        _string(data, spans, 1),
        _string(data, spans, 0),
        _string(data, spans, 2),
        has[0],
        has[1],
        counts[0],
    )


def peek_response(data: Buffer) -> ResponsePeek:
    """Peek a SotW ``DiscoveryResponse``; raise :class:`WireError` if malformed."""
    spans, counts, _ = _scan(data, _RESPONSE)
    return ResponsePeek(
        _string(data, spans, 1),
        _string(data, spans, 0),
        _string(data, spans, 2),
        counts[0],
    )


def peek_delta_request(data: Buffer) -> DeltaRequestPeek:
    """Peek a ``DeltaDiscoveryRequest``; raise :class:`WireError` if malformed."""
    spans, counts, has = _scan(data, _DELTA_REQUEST)
    return DeltaRequestPeek(
        _string(data, spans, 1),
        _string(data, spans, 2),
        has[0],
        has[1],
        counts[0],
        counts[1],
    )


def peek_delta_response(data: Buffer) -> DeltaResponsePeek:
    """Peek a ``DeltaDiscoveryResponse``; raise :class:`WireError` if malformed."""
    spans, counts, _ = _scan(data, _DELTA_RESPONSE)
    return DeltaResponsePeek(
        _string(data, spans, 1),
        _string(data, spans, 0),
        _string(data, spans, 2),
        counts[0],
        counts[1],
    )
