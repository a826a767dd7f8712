"""The fast engine: gRPC over HTTP/2 written for this one job, on asyncio Protocols.

One connection (an ``asyncio.BufferedProtocol``) per TCP/Unix/TLS connection; the server
side serves Envoy (h2c, many streams), the client side carries one stream to istiod per
connection.  The per-read path is the core, ``_h2`` (Cython, or its twin ``_h2_py``, as
``xdsfast._ext`` chose): reads land in the connection's own buffer (``ConnCore.get_buffer``;
over TLS, uvloop decrypts into it), where ``ConnCore.buffer_updated`` finds frames, keeps
the windows, feeds DATA to the stream's reassembler and hands complete messages to the
relay's sink, calling back into ``protocol`` only for the other frames.  Outgoing messages
go to the transport as frame headers plus slices of the message, never joined; only over
TLS are the small writes one read callback made joined, into one record
(``ConnCore.coalesce``).

Flow control bounds memory both ways: a stream's receive window, and the connection's,
are credited back only for bytes the relay has taken with ``recv()`` (or that belong to a
message still being reassembled for a stream the relay reads, which must complete), and
``send()`` waits for the peer's window and for the transport's write buffer to drain.
Hostile peers (either side) meet the core's budgets: messages held for streams the relay
does not read yet, control frames per second, replies queued for a peer that does not
read; past one, ENHANCE_YOUR_CALM, counted and logged (``HOSTILE``).

Modules: ``protocol`` (streams and the connection, either side), ``server`` (Envoy's
side), ``dialer`` (istiod's side, TLS included), ``h2numbers`` (HTTP/2's numbers),
``_h2``/``_h2_py`` (the core and its twin).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from xdsfast.engines import DialSettings, ServerSettings

if TYPE_CHECKING:
    from xdsfast.engines.fast.dialer import FastDialer
    from xdsfast.engines.fast.h2numbers import ErrorCode, Flag, FrameType, SettingCode
    from xdsfast.engines.fast.protocol import (
        CONN_WINDOW,
        HOSTILE,
        IMPLEMENTATION,
        PREFACE,
        RECV_FRAME,
        STREAM_WINDOW,
    )
    from xdsfast.engines.fast.server import FastServer

__all__ = [
    "CONN_WINDOW",
    "HOSTILE",
    "IMPLEMENTATION",
    "PREFACE",
    "RECV_FRAME",
    "STREAM_WINDOW",
    "DialSettings",
    "ErrorCode",
    "FastDialer",
    "FastServer",
    "Flag",
    "FrameType",
    "ServerSettings",
    "SettingCode",
]

# Where each name lives, imported at first use: loading the core (``_h2``, a module of
# this package) must not load the engine, as ``_ext`` does for ``xdsfast version`` and
# the core-info metric whichever engine serves.
_WHERE = {
    "FastDialer": "dialer",
    "FastServer": "server",
    "ErrorCode": "h2numbers",
    "Flag": "h2numbers",
    "FrameType": "h2numbers",
    "SettingCode": "h2numbers",
    "CONN_WINDOW": "protocol",
    "HOSTILE": "protocol",
    "IMPLEMENTATION": "protocol",
    "PREFACE": "protocol",
    "RECV_FRAME": "protocol",
    "STREAM_WINDOW": "protocol",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # (found directly from now on)
    return value
