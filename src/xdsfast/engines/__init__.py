"""The seam between the relay and the transports that carry its streams.

The relay sees a stream as ``recv() -> bytes | None`` and ``send(bytes)``;
an engine never knows what a NameTable is, the relay never imports grpcio.
An engine that can relay a big response as it arrives (cut-through) hands it
to the relay as a :class:`Through` instead of bytes, once the relay's judge
(:class:`Head`) has said yes on its first bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from xdsfast.config import (
    DEFAULT_ENVOY_SEND_BUFFER,
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


class SourceError(StreamError):
    """The stream a cut-through message comes from ended or failed before its last byte,
    or the relay's judge refused the rest of it (``Through.failed``)."""


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


class Head(Protocol):
    """The relay's judge of one big message, fed its bytes as they arrive."""

    def feed(self, chunk: bytes) -> bool | None:
        """The next bytes of the head: True, relay the message as it comes; False, hold
        it whole; None, not known yet.  Never raises."""

    @property
    def scan(self) -> Callable[[bytes], object]:
        """Reads each later chunk once ``feed`` said yes; raising stops the message (it
        must not reach Envoy complete).  A compiled call: it runs per DATA frame."""


# Called at the prefix of each message of the engine's cut-through size or more: its
# length (without the prefix) -> the judge that sees its bytes, or None (held whole).
Opener = Callable[[int], Head | None]


class Through(Protocol):
    """A message being relayed as it arrives: the engine queues its bytes (the gRPC prefix
    first) and credits its source only as the other side's writer takes them."""

    @property
    def length(self) -> int:
        """The whole message's bytes, its 5-byte prefix included."""

    @property
    def head(self) -> Head:
        """Its judge, which has seen every byte received."""

    @property
    def failed(self) -> bool:
        """The judge refused it on the way."""

    @property
    def arrived(self) -> float:
        """``time.perf_counter()`` when its last byte came (0 before)."""


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

    async def send_through(self, through: Through, whole: bool) -> None:
        """Write ``through`` as its bytes arrive: not ``whole``, all but its last byte,
        returning once every byte has arrived; ``whole``, the rest.  Raises SourceError if
        its source fails first, StreamError if this stream does.  Only called with an
        engine whose upstream's ``set_through`` said yes."""


class Upstream(_Stream, Protocol):
    """istiod's side of one stream."""

    async def recv(self) -> bytes | Through | None:
        """The next response (a Through once ``set_through`` said yes); None once istiod
        ended the stream with OK. Raises StreamError."""

    async def send(self, data: bytes) -> None:
        """Write one request. Raises StreamError."""

    def set_through(self, opener: Opener | None) -> bool:
        """Ask ``opener`` about each big response, and hand those it says yes to as
        ``Through``; False if this engine cannot (every response then comes whole)."""

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
    send_buffer: int = DEFAULT_ENVOY_SEND_BUFFER  # SO_SNDBUF on Unix connections (fast engine)


@dataclass(frozen=True)
class DialSettings:
    """How to reach istiod, whichever engine dials it."""

    target: str  # "host:port" or "unix:/path"
    tls: TlsFiles | None = None  # None: plaintext
    token_path: str | None = None
    connect_timeout: float = 5.0
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
