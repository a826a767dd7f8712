"""The grpc.aio engine: raw-bytes gRPC server (Envoy's side) and dialer (istiod's side).

No serializer on either side: every frame stays the ``bytes`` gRPC delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import grpc
from grpc import aio

from xdsfast.engines import (
    SERVICE,
    Code,
    DialError,
    DialSettings,
    Mode,
    Opener,
    ServerSettings,
    Sink,
    Status,
    StreamError,
    StreamHandler,
    Through,
    Upstream,
)
from xdsfast.engines._sockets import prepare_socket_path
from xdsfast.upstream import bearer_token, load_tls

_TO_GRPC = {code.value[0]: code for code in grpc.StatusCode}
_ENDED = "{} Envoy failed: the stream has ended"


def _status(error: aio.AioRpcError) -> Status:
    code = error.code()
    return Status(Code(code.value[0]), error.details() or "")


class _AsyncOnly:
    """grpc.aio has no synchronous write or read callback: every message takes a task hop."""

    __slots__ = ()

    def try_send(self, data: bytes) -> bool:
        return False

    def set_sink(self, sink: Sink | None) -> bool:
        return False

    def offer_queued(self) -> None:
        pass


class _Downstream(_AsyncOnly):
    """Envoy's side of one stream, over a grpc.aio servicer context."""

    __slots__ = ("_context", "peer")

    def __init__(self, context: aio.ServicerContext[bytes, bytes]) -> None:
        self._context = context
        self.peer = context.peer() or "unknown"

    async def recv(self) -> bytes | None:
        try:
            message = await self._context.read()
        except (aio.AioRpcError, grpc.RpcError, RuntimeError) as exc:
            raise StreamError(Status(Code.UNKNOWN, f"receive from Envoy failed: {exc}")) from exc
        except aio.BaseError:  # grpc-core's own (e.g. the batch of a call Envoy reset)
            raise StreamError(Status(Code.UNKNOWN, _ENDED.format("receive from"))) from None
        if message is aio.EOF:
            return None
        assert isinstance(message, bytes)
        return message

    async def send(self, data: bytes) -> None:
        try:
            await self._context.write(data)
        except (aio.AioRpcError, grpc.RpcError, RuntimeError) as exc:
            raise StreamError(Status(Code.UNAVAILABLE, f"send to Envoy failed: {exc}")) from exc
        except aio.BaseError:  # e.g. ExecuteBatchError: Envoy reset the stream mid-write
            raise StreamError(Status(Code.UNAVAILABLE, _ENDED.format("send to"))) from None

    async def send_through(self, through: Through, whole: bool) -> None:
        raise NotImplementedError("grpc.aio holds every message whole (store-and-forward)")


class GrpcioServer:
    """Serves both ADS methods on a Unix socket and/or a TCP address."""

    def __init__(self, handler: StreamHandler, settings: ServerSettings | None = None) -> None:
        self._handler = handler
        self._settings = settings or ServerSettings()
        self._server: aio.Server | None = None
        self._unix_path: str | None = None
        self.tcp_port: int | None = None

    async def _serve(self, context: aio.ServicerContext[bytes, bytes], mode: Mode) -> None:
        status = await self._handler(_Downstream(context), mode)
        if status.code != Code.OK:
            context.set_code(_TO_GRPC[int(status.code)])
            context.set_details(status.details)

    async def _sotw(self, _: Any, context: aio.ServicerContext[bytes, bytes]) -> None:
        await self._serve(context, Mode.SOTW)

    async def _delta(self, _: Any, context: aio.ServicerContext[bytes, bytes]) -> None:
        await self._serve(context, Mode.DELTA)

    async def start(self, unix_path: str | None, tcp_address: str | None) -> None:
        s = self._settings
        options = [
            ("grpc.max_receive_message_length", s.max_recv_msg_size),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", s.max_concurrent_streams),
            ("grpc.keepalive_time_ms", int(s.keepalive_interval * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout * 1000)),
            # gRPC C-core (1.85) waits for a PING ACK this long, not keepalive_timeout_ms
            # (default 60 s): without it a peer that stopped answering goes unnoticed.
            ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(s.keepalive_interval * 500)),
            ("grpc.so_reuseport", 0),
        ]
        handlers = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                Mode.SOTW.value: grpc.stream_stream_rpc_method_handler(self._sotw),
                Mode.DELTA.value: grpc.stream_stream_rpc_method_handler(self._delta),
            },
        )
        server = aio.server(handlers=[handlers], options=options)
        if unix_path:
            prepare_socket_path(unix_path)
            _listen(server, f"unix:{unix_path}")
            self._unix_path = unix_path
        if tcp_address:
            self.tcp_port = _listen(server, tcp_address)
        await server.start()
        if unix_path:
            os.chmod(unix_path, 0o666)  # Envoy may run as another user (Istio does the same)
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._unix_path)
            self._unix_path = None


def _listen(server: aio.Server, address: str) -> int:
    try:
        return int(server.add_insecure_port(address))
    except RuntimeError:  # gRPC says no more than "failed to bind"
        raise OSError(f"cannot listen on {address} (in use, or not allowed)") from None


class _Upstream(_AsyncOnly):
    """istiod's side of one stream, over its own channel."""

    __slots__ = ("_call", "_channel")

    def __init__(self, channel: aio.Channel, call: aio.StreamStreamCall[bytes, bytes]) -> None:
        self._channel = channel
        self._call = call

    async def _final(self) -> Status:
        code = await self._call.code()
        return Status(Code(code.value[0]), await self._call.details() or "")

    async def recv(self) -> bytes | None:
        try:
            message = await self._call.read()
        except aio.AioRpcError as exc:
            raise StreamError(_status(exc)) from exc
        if message is aio.EOF:
            status = await self._final()
            if status.code == Code.OK:
                return None
            raise StreamError(status)
        assert isinstance(message, bytes)
        return message

    async def send(self, data: bytes) -> None:
        try:
            await self._call.write(data)
        except aio.AioRpcError as exc:
            raise StreamError(_status(exc)) from exc
        except (aio.UsageError, asyncio.InvalidStateError) as exc:  # the call already ended
            raise StreamError(await self._final()) from exc

    def set_through(self, opener: Opener | None) -> bool:
        return False  # grpc.aio hands over whole messages only: store-and-forward

    async def half_close(self) -> None:
        with contextlib.suppress(aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError):
            await self._call.done_writing()

    async def close(self) -> None:
        self._call.cancel()
        await self._channel.close()


class GrpcioDialer:
    """A fresh channel per Envoy stream, as Istio's agent does.

    A local subchannel pool keeps a failed connection's backoff from leaking
    into the next stream's channel, so Envoy's retry after an istiod restart
    connects at once.
    """

    def __init__(self, settings: DialSettings) -> None:
        self._settings = settings
        s = settings
        self._options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.keepalive_time_ms", int(s.keepalive_interval * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout * 1000)),
            # gRPC C-core (1.85) waits for a PING ACK this long, not keepalive_timeout_ms
            # (default 60 s): without it a peer that stopped answering goes unnoticed.
            ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]

    async def _connect(self, channel: aio.Channel) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.connect_timeout
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                raise DialError(f"cannot connect to {self._settings.target}: {await _why(channel)}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DialError(f"timed out connecting to {self._settings.target}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
            state = channel.get_state(try_to_connect=True)

    def _channel(self) -> aio.Channel:
        """A new channel; TLS material is read from disk now, so rotations apply."""
        s = self._settings
        if s.tls is None:
            return aio.insecure_channel(s.target, options=self._options)
        tls = load_tls(s.tls)
        credentials = grpc.ssl_channel_credentials(tls.root_ca, tls.client_key, tls.client_cert)
        options = [*self._options, ("grpc.ssl_target_name_override", tls.server_name)]
        return aio.secure_channel(s.target, credentials, options=options)

    async def open(self, mode: Mode, metadata: tuple[tuple[str, str], ...]) -> Upstream:
        token = bearer_token(self._settings.token_path)
        if token is not None:
            metadata = (*metadata, ("authorization", f"Bearer {token}"))
        channel = self._channel()
        try:
            await self._connect(channel)
        except BaseException:
            await channel.close()
            raise
        method = channel.stream_stream(
            f"/{SERVICE}/{mode.value}", request_serializer=None, response_deserializer=None
        )
        call = method(metadata=metadata)
        return _Upstream(channel, call)


async def _why(channel: aio.Channel) -> str:
    """gRPC's reason for a failed connection (e.g. a TLS verification error).

    A call on a channel in TRANSIENT_FAILURE fails at once, without reaching
    any server, and carries the last connection error in its details.
    """
    call = channel.unary_unary("/xdsfast.Probe/Connect")(b"", timeout=1.0)
    try:
        await call
    except aio.AioRpcError as exc:
        details = exc.details() or str(exc.code())
        return details.removeprefix("failed to connect to all addresses; last error: ")
    return "unknown reason"
