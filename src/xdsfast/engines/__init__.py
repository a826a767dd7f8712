"""The seam between the relay and the transports that carry its streams.

The relay sees a stream as ``recv() -> bytes | None`` and ``send(bytes)``;
an engine never knows what a NameTable is, the relay never imports grpcio.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from xdsfast.config import (
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_RECV_MSG_SIZE,
    TlsFiles,
)


class Code(enum.IntEnum):
    """gRPC status codes (the numbers are the wire's)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class Status:
    """How a stream ended, or how to end one."""

    code: Code = Code.OK
    details: str = ""

    def __str__(self) -> str:
        return self.code.name if not self.details else f"{self.code.name}: {self.details}"


OK = Status()


class StreamError(Exception):
    """The stream ended with a non-OK status (or the connection broke)."""

    def __init__(self, status: Status) -> None:
        super().__init__(str(status))
        self.status = status


class DialError(Exception):
    """The upstream could not be reached at all."""


class Mode(enum.Enum):
    """Which ADS flavour a stream speaks."""

    SOTW = "StreamAggregatedResources"
    DELTA = "DeltaAggregatedResources"


SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


# Takes one message as it arrives, inside the engine's read callback, and says whether it
# took it whole (True) or left it, untouched, for recv() (False).  It saves the relay a task
# switch per message; it must not block and must not have acted on a message it leaves.
Sink = Callable[[bytes], bool]


class _Stream(Protocol):
    """What both sides of a stream offer besides recv and send: the synchronous fast path."""

    def try_send(self, data: bytes) -> bool:
        """Write one message now if nothing would have to wait (flow-control windows open,
        the socket not backed up); False, having written nothing, otherwise."""

    def set_sink(self, sink: Sink | None) -> bool:
        """Offer arriving messages to ``sink`` while recv() is awaited and nothing is queued
        (so the order holds); False if this engine cannot (recv() then gets every message)."""

    def offer_queued(self) -> None:
        """Offer the sink the messages queued for recv(), in order, until it declines: the
        relay calls it before each recv(), so once one message has had to wait, those
        queued behind it still take the fast path."""


class Downstream(_Stream, Protocol):
    """Envoy's side of one stream."""

    peer: str

    async def recv(self) -> bytes | None:
        """The next request; None once Envoy has half-closed. Raises StreamError."""

    async def send(self, data: bytes) -> None:
        """Write one response. Raises StreamError."""


class Upstream(_Stream, Protocol):
    """istiod's side of one stream."""

    async def recv(self) -> bytes | None:
        """The next response; None once istiod ended the stream with OK. Raises StreamError."""

    async def send(self, data: bytes) -> None:
        """Write one request. Raises StreamError."""

    async def half_close(self) -> None:
        """No more requests (after those already sent); istiod may still answer."""

    async def close(self) -> None:
        """Cancel the stream and drop its connection."""


class Dialer(Protocol):
    """Opens one upstream stream per Envoy stream."""

    async def open(self, mode: Mode, metadata: tuple[tuple[str, str], ...]) -> Upstream:
        """Connect and open a stream. Raises DialError."""


# What a server engine calls for every Envoy stream; its result ends the stream.
StreamHandler = Callable[[Downstream, Mode], Awaitable[Status]]


@dataclass(frozen=True)
class ServerSettings:
    """Istio's downstream server options, whichever engine serves Envoy."""

    max_recv_msg_size: int = DEFAULT_MAX_RECV_MSG_SIZE
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT


@dataclass(frozen=True)
class DialSettings:
    """How to reach istiod, whichever engine dials it."""

    target: str  # "host:port" or "unix:/path"
    tls: TlsFiles | None = None  # None: plaintext
    token_path: str | None = None
    connect_timeout: float = 5.0
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
