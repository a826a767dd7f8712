"""The fast engine's dialer: istiod's side, a fresh connection (TLS or plaintext) per stream.

The TLS context is loaded at each dial, so rotated certificates apply; ALPN must agree
to h2.  Dial failures come back as ``DialError`` with the reason an operator needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import unquote

from xdsfast._errors import H2ConnectionError
from xdsfast.engines import (
    SERVICE,
    Code,
    DialError,
    DialSettings,
    Mode,
    Opener,
    Sink,
    Status,
    StreamError,
    Through,
    Upstream,
)
from xdsfast.engines.fast import protocol
from xdsfast.engines.fast.h2numbers import ErrorCode, Flag, FrameType
from xdsfast.engines.fast.protocol import CONTENT_TYPE, Connection, Stream, frame_header
from xdsfast.upstream import bearer_token, load_tls

UNLIMITED = 2**62
CLOSE_WAIT = 1.0  # how long closing an upstream stream waits for istiod to end it

# gRPC's mapping of HTTP status codes (for a response that is not gRPC).
_HTTP_TO_GRPC = {400: Code.INTERNAL, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
                 404: Code.UNIMPLEMENTED, 429: Code.UNAVAILABLE, 502: Code.UNAVAILABLE,
                 503: Code.UNAVAILABLE, 504: Code.UNAVAILABLE}  # fmt: skip
# RST_STREAM codes as gRPC statuses (gRPC's HTTP/2 transport spec).
_RST_TO_GRPC: dict[int, Code] = {
    ErrorCode.NO_ERROR: Code.INTERNAL,
    ErrorCode.REFUSED_STREAM: Code.UNAVAILABLE,
    ErrorCode.CANCEL: Code.CANCELLED,
    ErrorCode.ENHANCE_YOUR_CALM: Code.RESOURCE_EXHAUSTED,
}


class _ClientConnection(Connection):
    def __init__(self, settings: DialSettings) -> None:
        super().__init__(settings.keepalive_interval, settings.keepalive_timeout, client=True)
        self.coalesce = settings.tls is not None  # one TLS record for the ACKs a read carried
        self.stream: Stream | None = None
        self.headers_seen = False

    def last_own_stream(self) -> int:
        return 1 if self.stream is not None else 0

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        stream = self.streams.get(sid)
        if sid % 2 == 0:
            raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, "server opened a stream")
        if stream is None:
            self.check_not_idle(sid, "HEADERS")
            return
        fields = dict(headers)
        if not self.headers_seen:
            self.headers_seen = True
            http = fields.get(b":status", b"")
            if http != b"200":
                code = int(http) if http.isdigit() else 0
                status = Status(_HTTP_TO_GRPC.get(code, Code.UNKNOWN), f"HTTP status {code}")
                if b"grpc-status" not in fields:
                    self._end(stream, status)
                    return
        if end:
            self._end(stream, _status_of(fields))

    def _end(self, stream: Stream, status: Status) -> None:
        stream.status = status
        if status.code != Code.OK:
            stream.fail(StreamError(status))
        stream.on_end()
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.release_stream(stream)  # (what it holds is still read: credit is moot now)

    def on_end_stream(self, stream: Stream) -> None:  # END_STREAM on DATA: no trailers
        self._end(stream, Status(Code.INTERNAL, "server closed the stream without trailers"))

    def on_bad_message(self, stream: Stream, status: Status) -> None:
        self.reset(stream, ErrorCode.CANCEL)

    def on_reset(self, stream: Stream, code: int) -> None:
        self.forget(stream)
        status = Status(_RST_TO_GRPC.get(code, Code.INTERNAL), f"RST_STREAM with error code {code}")
        self.stream_lost(stream, StreamError(status))

    def on_goaway(self, last: int, code: int, debug: str) -> None:
        self.goaway_received = last
        why = f"GOAWAY received (code {code}{': ' + debug if debug else ''})"
        self.close_reason = why
        for stream in list(self.streams.values()):
            if stream.id > last:
                self.forget(stream)
                self.stream_lost(stream, StreamError(Status(Code.UNAVAILABLE, why)))
        if code != ErrorCode.NO_ERROR:
            self.close(why)


def _status_of(fields: dict[bytes, bytes]) -> Status:
    raw = fields.get(b"grpc-status")
    if raw is None or not raw.isdigit():
        return Status(Code.UNKNOWN, "missing grpc-status")
    number = int(raw)
    code = Code(number) if number in Code._value2member_map_ else Code.UNKNOWN
    message = unquote(fields.get(b"grpc-message", b"").decode("utf-8", "replace"))
    return Status(code, message)


class _Upstream:
    """istiod's side of one stream, over its own connection."""

    __slots__ = ("_conn", "_half_closed", "_stream", "offer_queued", "try_send")

    def __init__(self, conn: _ClientConnection, stream: Stream) -> None:
        self._conn = conn
        self._stream = stream
        self._half_closed = False
        stream.sendable = True  # its headers are out
        self.try_send = stream.try_send  # the core's, called straight from the relay's sink
        self.offer_queued = stream.offer_queued  # the core's too

    async def half_close(self) -> None:
        conn, stream = self._conn, self._stream
        if not self._half_closed and not conn.closed and not stream.closed:
            self._half_closed = True
            stream.sendable = False
            conn.write(frame_header(0, FrameType.DATA, Flag.END_STREAM, stream.id))

    async def recv(self) -> bytes | Through | None:
        stream = self._stream
        data = await stream.next_message()
        if data is None and stream.status is None:  # ended without trailers
            raise StreamError(Status(Code.INTERNAL, "stream ended without trailers"))
        return data

    async def send(self, data: bytes) -> None:
        stream = self._stream
        if stream.closed:
            if stream.error is not None:
                raise stream.failure()
            raise StreamError(stream.status or self._conn.lost_status())
        await stream.write_message(data)

    def set_sink(self, sink: Sink | None) -> bool:
        self._stream.sink = sink
        return True

    def set_through(self, opener: Opener | None) -> bool:
        assembler = self._stream.assembler
        assembler.opener = opener
        assembler.through_min = max(1, protocol.THROUGH_MIN)
        return True

    async def close(self) -> None:
        """Half-close first, so what was sent is read before the stream goes; then cancel.

        A RST_STREAM right behind the last DATA frames would let the server drop
        requests it has received but not yet read (Envoy's half-close flushes them)."""
        conn, stream = self._conn, self._stream
        if not conn.closed and not stream.closed:
            await self.half_close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stream.finished(), CLOSE_WAIT)
        if not conn.closed and not stream.closed:
            conn.reset(stream, ErrorCode.CANCEL)
        conn.close("closed by the relay")
        conn.stream = None  # (it and the stream refer to each other)
        if conn.transport is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), 1.0)


class FastDialer:
    """A fresh connection per Envoy stream, as Istio's agent does."""

    def __init__(self, settings: DialSettings) -> None:
        self._settings = settings

    async def open(self, mode: Mode, metadata: tuple[tuple[str, str], ...]) -> Upstream:
        s = self._settings
        token = bearer_token(s.token_path)
        if token is not None:
            metadata = (*metadata, ("authorization", f"Bearer {token}"))
        loop = asyncio.get_running_loop()
        material = None if s.tls is None else load_tls(s.tls)  # read now: rotations apply
        context = None if material is None else material.context  # checked, or DialError
        server_name = None if material is None else material.server_name
        conn: _ClientConnection | None = None

        def factory() -> _ClientConnection:
            nonlocal conn
            conn = _ClientConnection(s)
            return conn

        async def connect() -> None:
            if s.target.startswith("unix:"):
                path = s.target[len("unix:") :].removeprefix("//")
                await loop.create_unix_connection(
                    factory, path, ssl=context, server_hostname=server_name if context else None
                )
            else:
                from xdsfast.config import split_host_port

                host, port = split_host_port(s.target)
                await loop.create_connection(
                    factory, host, port, ssl=context, server_hostname=server_name
                )
            assert conn is not None
            if context is not None:
                protocol = conn.transport.get_extra_info("ssl_object") if conn.transport else None
                if protocol is not None and protocol.selected_alpn_protocol() not in (None, "h2"):
                    raise DialError("istiod did not agree to HTTP/2 (ALPN)")
            await conn.ready

        try:
            await asyncio.wait_for(connect(), s.connect_timeout)
        except asyncio.TimeoutError:
            if conn is not None:
                conn.close("connect timeout")
            raise DialError(f"timed out connecting to {s.target}") from None
        except DialError:
            if conn is not None:
                conn.close("dial failed")
            raise
        except (OSError, ConnectionError, ValueError) as exc:
            if conn is not None:
                conn.close("dial failed")
            raise DialError(f"cannot connect to {s.target}: {_why(exc, conn)}") from None
        except asyncio.CancelledError:  # a newer Envoy stream replaced this one: no socket left
            if conn is not None:
                conn.close("dial cancelled")
            raise
        assert conn is not None
        stream = Stream(conn, 1, UNLIMITED)
        conn.stream = stream
        conn.streams[1] = stream
        authority = (server_name or s.target).encode()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https" if context else b"http"),
            (b":path", f"/{SERVICE}/{mode.value}".encode()),
            (b":authority", authority),
            (b"content-type", CONTENT_TYPE),
            (b"te", b"trailers"),
            (b"user-agent", b"xdsfast"),
            *((k.lower().encode(), v.encode()) for k, v in metadata),
        ]
        conn.send_headers(1, headers, False)
        return _Upstream(conn, stream)


def _why(exc: BaseException, conn: Connection | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = exc.verify_message or str(exc)
        if "hostname" in text.lower() or "ip address mismatch" in text.lower():
            return f"TLS: hostname verification failed: {text} (CERTIFICATE_VERIFY_FAILED)"
        return f"TLS: CERTIFICATE_VERIFY_FAILED: {text}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, FileNotFoundError):
        return f"no such socket ({exc.filename or exc})"
    if isinstance(exc, ConnectionError) and conn is not None:
        return f"socket closed during the handshake ({conn.close_reason})"
    return str(exc) or type(exc).__name__
