"""HTTP/2's numbers (RFC 9113), in one place: frame types, flags, error codes, settings.

The engine and the twin read them here; the compiled core cimports the same numbers from
``h2numbers.pxd`` (``cdef enum``s, compile-time constants), and ``test_h2`` holds the two
equal.  As in the ``h2`` library, each vocabulary is an ``IntEnum``: a number off the wire
compares equal to its member, and a member logs by its name.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = [
    "DEFAULT_FRAME",
    "DEFAULT_WINDOW",
    "MAX_FRAME",
    "MAX_WINDOW",
    "ErrorCode",
    "Flag",
    "FrameType",
    "SettingCode",
]


class FrameType(IntEnum):
    """A frame header's type octet (section 6)."""

    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag(IntEnum):
    """A frame header's flag bits; which apply depends on the frame type (section 6)."""

    END_STREAM = 0x1  # DATA, HEADERS
    ACK = 0x1  # SETTINGS, PING (the same bit)
    END_HEADERS = 0x4  # HEADERS, CONTINUATION
    PADDED = 0x8  # DATA, HEADERS
    PRIORITY = 0x20  # HEADERS


class ErrorCode(IntEnum):
    """RST_STREAM and GOAWAY error codes (section 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class SettingCode(IntEnum):
    """SETTINGS parameter identifiers (section 6.5.2)."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


DEFAULT_WINDOW: Final = 65_535  # every flow-control window before SETTINGS / WINDOW_UPDATE
MAX_WINDOW: Final = 2**31 - 1  # the largest a window may grow
DEFAULT_FRAME: Final = 16_384  # SETTINGS_MAX_FRAME_SIZE's initial value, and its floor
MAX_FRAME: Final = 2**24 - 1  # ... and its ceiling
