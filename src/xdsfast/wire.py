"""The wire peeker, from the compiled core or its pure-Python twin.

``peek_*`` read a whole message; :class:`ResponseScanner` reads a response as it arrives,
chunk by chunk, in bounded memory, and ends with the same result or error.

Chosen by the one switch, :mod:`xdsfast._ext` (``XDSFAST_NO_EXTENSIONS``, or the
compiled ``xdsfast._core`` missing); ``IMPLEMENTATION`` says which one is active.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xdsfast import _ext
from xdsfast._errors import WireError

__all__ = [
    "IMPLEMENTATION",
    "STRING_LIMIT",
    "DeltaRequestPeek",
    "DeltaResponsePeek",
    "RequestPeek",
    "ResponsePeek",
    "ResponseScanner",
    "WireError",
    "length_delimited",
    "peek_delta_request",
    "peek_delta_response",
    "peek_request",
    "peek_response",
    "varint",
]

if TYPE_CHECKING:  # both have the same API; the twin is the reference
    from xdsfast._core_py import (
        STRING_LIMIT,
        DeltaRequestPeek,
        DeltaResponsePeek,
        RequestPeek,
        ResponsePeek,
        ResponseScanner,
        peek_delta_request,
        peek_delta_response,
        peek_request,
        peek_response,
    )

    IMPLEMENTATION = "python"
else:
    _impl = _ext.load("_core")
    IMPLEMENTATION = _ext.implementation("_core")
    RequestPeek = _impl.RequestPeek
    ResponsePeek = _impl.ResponsePeek
    DeltaRequestPeek = _impl.DeltaRequestPeek
    DeltaResponsePeek = _impl.DeltaResponsePeek
    peek_request = _impl.peek_request
    peek_response = _impl.peek_response
    peek_delta_request = _impl.peek_delta_request
    peek_delta_response = _impl.peek_delta_response
    ResponseScanner = _impl.ResponseScanner
    STRING_LIMIT = _impl.STRING_LIMIT


def varint(value: int) -> bytes:
    """A protobuf varint: for the few bytes xdsfast writes itself (health requests, the
    node patch), where building a message would cost an import or a decode."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (wire type 2): tag, length, payload."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload
