"""The fast engine's server: Envoy's side, both ADS methods on a Unix socket and/or TCP (h2c).

Each stream Envoy opens runs the relay's handler in its own task; gRPC's status goes back
as trailers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import TYPE_CHECKING, cast
from urllib.parse import quote

from xdsfast import log
from xdsfast._errors import H2ConnectionError
from xdsfast.engines import (
    SERVICE,
    Code,
    Mode,
    ServerSettings,
    Sink,
    Status,
    StreamError,
    StreamHandler,
    Through,
)
from xdsfast.engines._sockets import prepare_socket_path
from xdsfast.engines.fast.h2numbers import ErrorCode, FrameType, SettingCode
from xdsfast.engines.fast.protocol import CONTENT_TYPE, Connection, Stream, frame_u32

if TYPE_CHECKING:
    from xdsfast.engines.fast import _h2_py as _h2

_log = log.scope("xdsproxy")

_PATHS = {f"/{SERVICE}/{mode.value}".encode(): mode for mode in Mode}


def _percent(message: str) -> bytes:
    return quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


class _Downstream:
    """Envoy's side of one stream."""

    __slots__ = ("_stream", "offer_queued", "peer", "try_send")

    def __init__(self, stream: Stream, peer: str) -> None:
        self._stream = stream
        self.peer = peer
        self.try_send = stream.try_send  # the core's, called straight from the relay's sink
        self.offer_queued = stream.offer_queued  # the core's too

    async def recv(self) -> bytes | None:
        return await self._stream.next_message()

    def _ready(self) -> Stream:
        """The stream, its response headers sent; raises StreamError if it failed."""
        stream = self._stream
        if not stream.sent_headers:
            stream.sent_headers = stream.sendable = True
            stream.conn.send_headers(
                stream.id, [(b":status", b"200"), (b"content-type", CONTENT_TYPE)], False
            )
        if stream.error is not None and stream.closed:
            raise StreamError(Status(Code.UNAVAILABLE, f"send to Envoy failed: {stream.error}"))
        return stream

    async def send(self, data: bytes) -> None:
        await self._ready().write_message(data)

    async def send_through(self, through: Through, whole: bool) -> None:
        await self._ready().write_through(cast("_h2.Through", through), whole)

    def set_sink(self, sink: Sink | None) -> bool:
        self._stream.sink = sink
        return True


class _ServerConnection(Connection):
    def __init__(self, server: FastServer) -> None:
        s = server.settings
        super().__init__(s.keepalive_interval, s.keepalive_timeout, client=False)
        self.server = server
        self.peer = "unknown"

    def extra_settings(self) -> dict[int, int]:
        return {
            SettingCode.MAX_CONCURRENT_STREAMS: min(
                self.server.settings.max_concurrent_streams, 2**31
            )
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)
        size = self.server.settings.send_buffer
        sock = transport.get_extra_info("socket")
        if size and sock is not None and sock.family == socket.AF_UNIX:
            # (Not on TCP: there, setting it would turn the kernel's autotuning off.)
            self.wide_send_buffer(sock, size)
        name = transport.get_extra_info("peername")
        if isinstance(name, tuple) and len(name) >= 2:
            self.peer = (
                f"ipv4:{name[0]}:{name[1]}" if ":" not in name[0] else f"ipv6:[{name[0]}]:{name[1]}"
            )
        else:
            self.peer = f"unix:{name or ''}"

    def who(self) -> str:
        return f"Envoy side, {self.peer}"

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)

    def stream_lost(self, stream: Stream, error: StreamError) -> None:
        super().stream_lost(stream, error)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()  # Envoy went away: the handler is cancelled, as with grpc.aio

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from Envoy: must end the stream
            if not end:
                self.count_reply()
                self.reset(stream, ErrorCode.PROTOCOL_ERROR)
                self.stream_lost(stream, StreamError(Status(Code.INTERNAL, "bad trailers")))
                return
            self.on_end_stream(stream)
            return
        if sid % 2 == 0 or sid <= self.last_peer_stream:
            if sid % 2 == 0 or sid > self.last_peer_stream:
                raise H2ConnectionError(ErrorCode.PROTOCOL_ERROR, f"bad stream id {sid}")
            raise H2ConnectionError(ErrorCode.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self.last_peer_stream = sid
        if self.goaway_sent:
            self.reply(frame_u32(FrameType.RST_STREAM, sid, ErrorCode.REFUSED_STREAM))
            return
        if len(self.streams) >= self.server.settings.max_concurrent_streams:
            self.reply(frame_u32(FrameType.RST_STREAM, sid, ErrorCode.REFUSED_STREAM))
            return
        fields = dict(headers)
        method, path = fields.get(b":method"), fields.get(b":path", b"")
        mode = _PATHS.get(path)
        if method != b"POST" or mode is None:
            code = Code.UNIMPLEMENTED if method == b"POST" else Code.INTERNAL
            why = f"unknown method {path.decode('latin-1')}" if method == b"POST" else "not POST"
            self._trailers_only(sid, Status(code, why), end)
            return
        if fields.get(b"grpc-encoding", b"identity") not in (b"identity", b""):
            self._trailers_only(sid, Status(Code.UNIMPLEMENTED, "compression unsupported"), end)
            return
        stream = Stream(self, sid, self.server.settings.max_recv_msg_size)
        self.streams[sid] = stream
        if end:
            stream.on_end()
        stream.task = self.loop.create_task(self._serve(stream, mode))
        stream.task.add_done_callback(stream.handled)

    def _trailers_only(self, sid: int, status: Status, ended: bool) -> None:
        self.count_reply()
        self.send_headers(sid, _trailers(status, with_status=True), True)
        if not ended:
            self.write(frame_u32(FrameType.RST_STREAM, sid, ErrorCode.NO_ERROR))

    async def _serve(self, stream: Stream, mode: Mode) -> None:
        try:
            status = await self.server.handler(_Downstream(stream, self.peer), mode)
        except asyncio.CancelledError:
            if not stream.closed:  # cancelled by us (server stop), not by Envoy
                self.send_headers(
                    stream.id,
                    _trailers(Status(Code.CANCELLED, "server stopping"), not stream.sent_headers),
                    True,
                )
                self._finish(stream)
            raise
        except Exception as exc:  # a bug in the handler: INTERNAL, as grpc.aio does
            _log.error("stream handler failed", exc_info=exc)
            status = Status(Code.UNKNOWN, f"Unexpected {exc!r}")
        if stream.closed or self.closed:
            return
        self.send_headers(stream.id, _trailers(status, not stream.sent_headers), True)
        self._finish(stream)

    def _finish(self, stream: Stream) -> None:
        """Trailers sent: the stream is done on our side."""
        if not stream.ended:
            self.write(frame_u32(FrameType.RST_STREAM, stream.id, ErrorCode.NO_ERROR))
        self.forget(stream)

    def on_bad_message(self, stream: Stream, status: Status) -> None:
        pass  # recv() raises; the relay ends the stream with that status

    def on_reset(self, stream: Stream, code: int) -> None:
        self.forget(stream)
        self.stream_lost(
            stream, StreamError(Status(Code.CANCELLED, f"RST_STREAM with error code {code}"))
        )

    def on_goaway(self, last: int, code: int, debug: str) -> None:
        self.goaway_received = last
        if code != ErrorCode.NO_ERROR:
            self.close(f"GOAWAY from Envoy ({code}): {debug}")


def _trailers(status: Status, with_status: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b":status", b"200"), (b"content-type", CONTENT_TYPE)] if with_status else []
    headers.append((b"grpc-status", str(int(status.code)).encode()))
    if status.details:
        headers.append((b"grpc-message", _percent(status.details)))
    return headers


class FastServer:
    """Serves both ADS methods on a Unix socket and/or a TCP address (h2c)."""

    def __init__(self, handler: StreamHandler, settings: ServerSettings | None = None) -> None:
        self.handler = handler
        self.settings = settings or ServerSettings()
        self.connections: set[_ServerConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_path: str | None = None
        self.tcp_port: int | None = None

    async def start(self, unix_path: str | None, tcp_address: str | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            if unix_path:
                prepare_socket_path(unix_path)
                server = await loop.create_unix_server(lambda: _ServerConnection(self), unix_path)
                self._servers.append(server)
                self._unix_path = unix_path
                os.chmod(unix_path, 0o666)  # Envoy may run as another user (as Istio does)
            if tcp_address:
                host, _, port = tcp_address.rpartition(":")
                host = host.strip("[]") or None  # type: ignore[assignment]
                try:
                    server = await loop.create_server(
                        lambda: _ServerConnection(self), host, int(port), reuse_address=True
                    )
                except OSError as exc:
                    raise OSError(f"cannot listen on {tcp_address} ({exc.strerror})") from None
                self._servers.append(server)
                self.tcp_port = int(server.sockets[0].getsockname()[1])
        except BaseException:
            await self.stop(0)
            raise

    async def stop(self, grace: float | None = None) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        for conn in list(self.connections):
            conn.goaway(ErrorCode.NO_ERROR, "server shutting down")
        tasks = [
            s.task for c in self.connections for s in c.streams.values()
            if s.task is not None and not s.task.done()
        ]  # fmt: skip
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace or 0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.close("server stopped")
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None
