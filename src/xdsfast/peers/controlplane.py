"""An istiod stand-in: an ADS server (SotW and delta) over grpc.aio.

It is a *fake peer* for tests and the demo, so unlike xdsfast itself it decodes
every message. It keeps one snapshot per type URL, pushes changes to the
streams that subscribed, and records every request (with its ACK/NACK meaning)
so tests can assert on what a client really sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from xdsfast.typeurls import CLUSTER, LISTENER, NAME_TABLE, PROXY_CONFIG

log = logging.getLogger(__name__)

Mode = Literal["sotw", "delta"]
Request = Union[discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest]
Response = Union[discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse]


#: Types where an empty subscription means "everything" (SotW legacy wildcard).
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER, NAME_TABLE, PROXY_CONFIG})

_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),  # a restarted server must own its port alone
]


@dataclass(frozen=True)
class Recorded:
    """One request as received, with what it meant.

    ``kind`` is ``"request"`` (no nonce: initial or re-subscribe), ``"ack"`` or
    ``"nack"`` (``error_detail`` set). ``stale`` marks a SotW request whose
    nonce is not the latest sent for its type (ignored, as a control plane
    must). ``response_version`` is the version of the response that ``nonce``
    answers (delta ACKs carry no version, so it is looked up).
    """

    seq: int
    stream_id: int
    mode: Mode
    request: Request
    kind: Literal["request", "ack", "nack"]
    nonce: str
    response_version: str | None
    stale: bool
    at: float

    @property
    def type_url(self) -> str:
        return str(self.request.type_url)

    @property
    def is_ack(self) -> bool:
        return self.kind == "ack"

    @property
    def is_nack(self) -> bool:
        return self.kind == "nack"

    @property
    def error(self) -> str:
        """The NACK reason ("" unless a NACK)."""
        return str(self.request.error_detail.message)

    def summary(self) -> str:
        short = self.type_url.rsplit(".", 1)[-1]
        extra = f" err={self.error[:80]!r}" if self.is_nack else ""
        stale = " stale" if self.stale else ""
        return (
            f"#{self.seq} stream={self.stream_id} {self.mode} {short} {self.kind}{stale} "
            f"nonce={self.nonce!r} version={self.response_version!r}{extra}"
        )


@dataclass(frozen=True)
class Sent:
    """One response the control plane sent."""

    stream_id: int
    mode: Mode
    type_url: str
    version: str
    nonce: str
    names: tuple[str, ...]
    removed: tuple[str, ...]
    size: int


@dataclass
class _Snapshot:
    version: str
    resources: dict[str, any_pb2.Any]
    hashes: dict[str, str]


@dataclass
class _Sub:
    """One stream's subscription to one type."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    last_nonce: str = ""  # SotW: latest nonce sent for this type
    known: dict[str, str] = field(default_factory=dict)  # delta: name -> version the client has

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


@dataclass
class _Stream:
    id: int
    mode: Mode
    outbox: asyncio.Queue[Response | bytes | None]
    subs: dict[str, _Sub] = field(default_factory=dict)


def _pack(resource: Message) -> any_pb2.Any:
    if isinstance(resource, any_pb2.Any):
        return resource
    packed = any_pb2.Any()
    packed.Pack(resource, deterministic=True)
    return packed


def _hash(packed: any_pb2.Any) -> str:
    return hashlib.sha256(packed.value).hexdigest()[:16]


class ControlPlane:
    """Minimal istiod stand-in serving ``AggregatedDiscoveryService``.

    ``address`` is ``"HOST:PORT"`` (port 0 picks one) or ``"unix:/path"``.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        credentials: grpc.ServerCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        """``credentials``: serve TLS (e.g. requiring client certificates); ``token``:
        refuse streams without ``authorization: Bearer <token>`` (UNAUTHENTICATED);
        ``options``: more gRPC server options (e.g. ``grpc.max_connection_age_ms``)."""
        self.address = address
        self.options = list(options)
        self.credentials = credentials
        self.token = token
        self.port = 0
        self.requests: list[Recorded] = []
        self.responses: list[Sent] = []
        self.stream_metadata: list[dict[str, str]] = []
        self._snapshots: dict[str, _Snapshot] = {}
        self._counters: dict[str, int] = {}
        self._nonce_versions: dict[str, str] = {}
        self._nonces = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._streams: dict[int, _Stream] = {}
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Event()

    # ----- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Listen; afterwards ``.address``/``.port`` name the real endpoint."""
        server = grpc.aio.server(options=[*_GRPC_OPTIONS, *self.options])
        servicer = _Servicer(self)
        server.add_generic_rpc_handlers([_handlers(servicer)])
        if self.credentials is None:
            port = server.add_insecure_port(self.address)
        else:
            port = server.add_secure_port(self.address, self.credentials)
        if not self.address.startswith("unix:"):
            if port == 0:
                raise OSError(f"cannot listen on {self.address}")
            self.port = port
            self.address = f"{self.address.rsplit(':', 1)[0]}:{port}"
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = 0) -> None:
        """Stop serving: every open stream ends (clients see UNAVAILABLE or CANCELLED)."""
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop(grace)
        self._streams.clear()
        self._notify()

    async def restart(self) -> None:
        """Stop, then listen again on the same address and port; snapshots are kept."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def stream_ids(self) -> list[int]:
        """Ids of the currently open streams, oldest first."""
        return sorted(self._streams)

    # ----- configuration ---------------------------------------------------------

    def version(self, type_url: str) -> str | None:
        """Current snapshot version of ``type_url`` (None if never set)."""
        snap = self._snapshots.get(type_url)
        return snap.version if snap else None

    def set_resources(
        self, type_url: str, resources: Mapping[str, Message], *, version: str | None = None
    ) -> str:
        """Replace the snapshot of ``type_url`` and push it to subscribed streams.

        Returns the new version ("1", "2", ... per type unless given).
        """
        self._counters[type_url] = self._counters.get(type_url, 0) + 1
        version = version if version is not None else str(self._counters[type_url])
        packed = {name: _pack(msg) for name, msg in resources.items()}
        self._snapshots[type_url] = _Snapshot(
            version, packed, {n: _hash(a) for n, a in packed.items()}
        )
        for stream in list(self._streams.values()):
            sub = stream.subs.get(type_url)
            if sub is None:
                continue
            if stream.mode == "sotw":
                self._send_sotw(stream, type_url, sub)
            else:
                self._send_delta(stream, type_url, sub, force=False)
        return version

    def set_mesh(self, mesh: Mapping[str, Mapping[str, Message]]) -> dict[str, str]:
        """Set several types at once (e.g. :func:`.mesh.sample_mesh`); returns their versions.

        Types are set in the order given, so put clusters before endpoints and
        listeners before routes, as a real control plane pushes them.
        """
        return {type_url: self.set_resources(type_url, res) for type_url, res in mesh.items()}

    def set_name_table(self, table: Message, *, version: str | None = None) -> str:
        """Serve Istio's NameTable as istiod does: one resource with no name."""
        return self.set_resources(NAME_TABLE, {"": table}, version=version)

    def push_raw(
        self,
        type_url: str,
        resources: Sequence[Message] = (),
        *,
        version: str | None = None,
        stream_id: int | None = None,
    ) -> list[str]:
        """Send a response of any type to every open stream (or one), asked for or not.

        ``resources`` may be ``Any`` messages with arbitrary type URLs. The
        snapshot is not touched. Returns the nonces sent.
        """
        version = version if version is not None else f"raw-{time.monotonic_ns()}"
        packed = [_pack(r) for r in resources]
        nonces = []
        for stream in list(self._streams.values()):
            if stream_id is not None and stream.id != stream_id:
                continue
            nonce = self._new_nonce(version)
            if stream.mode == "sotw":
                resp: Response = discovery_pb2.DiscoveryResponse(
                    version_info=version, type_url=type_url, nonce=nonce, resources=packed
                )
                names: tuple[str, ...] = ()
            else:
                names = tuple("" if len(packed) == 1 else f"raw-{i}" for i in range(len(packed)))
                resp = discovery_pb2.DeltaDiscoveryResponse(
                    system_version_info=version,
                    type_url=type_url,
                    nonce=nonce,
                    resources=[
                        discovery_pb2.Resource(name=n, version=version, resource=a)
                        for n, a in zip(names, packed, strict=True)
                    ],
                )
            self._emit(stream, resp, type_url, version, nonce, names, ())
            nonces.append(nonce)
        return nonces

    def push_bytes(
        self,
        data: bytes,
        *,
        type_url: str = "",
        version: str = "",
        nonce: str = "",
        stream_id: int | None = None,
    ) -> int:
        """Send ``data`` as one response frame, as is (garbage, or a response built elsewhere),
        to every open stream (or one); recorded with the given labels. Returns the streams."""
        streams = [s for s in self._streams.values() if stream_id in (None, s.id)]
        for stream in streams:
            stream.outbox.put_nowait(data)
            self.responses.append(
                Sent(stream.id, stream.mode, type_url, version, nonce, (), (), len(data))
            )
        self._notify()
        return len(streams)

    def push_empty(self, type_url: str, *, stream_id: int | None = None) -> list[str]:
        """Send a response with zero resources (e.g. an empty NDS push)."""
        return self.push_raw(type_url, (), stream_id=stream_id)

    # ----- waiting ---------------------------------------------------------------

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition()`` holds; raise ``TimeoutError`` at the deadline."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s\n{self.describe()}")
            event = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, 0.5))

    async def wait_for_request(
        self, predicate: Callable[[Recorded], bool], timeout: float = 10.0, *, since: int = 0
    ) -> Recorded:
        """Return the first recorded request (index >= ``since``) matching ``predicate``."""
        found: list[Recorded] = []

        def match() -> bool:
            found[:] = [r for r in self.requests[since:] if predicate(r)][:1]
            return bool(found)

        try:
            await self.wait_for(match, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no matching request within {timeout}s (since #{since})\n{self.describe()}"
            ) from None
        return found[0]

    def describe(self, last: int = 30) -> str:
        """Human-readable tail of what was received and sent, for failure messages."""
        lines = [f"active streams: {self.stream_ids}; received {len(self.requests)} requests:"]
        lines += ["  " + r.summary() for r in self.requests[-last:]]
        lines.append(f"sent {len(self.responses)} responses:")
        lines += [
            f"  stream={s.stream_id} {s.type_url.rsplit('.', 1)[-1]} v={s.version!r} "
            f"nonce={s.nonce!r} n={len(s.names)} removed={len(s.removed)}"
            for s in self.responses[-last:]
        ]
        return "\n".join(lines)

    # ----- stream handling (called by the servicer) -----------------------------

    def _open_stream(self, mode: Mode, context: grpc.aio.ServicerContext) -> _Stream:
        stream = _Stream(next(self._stream_ids), mode, asyncio.Queue())
        self._streams[stream.id] = stream
        md = context.invocation_metadata() or ()
        self.stream_metadata.append({k: v for k, v in md if isinstance(v, str)})
        self._notify()
        return stream

    def _close_stream(self, stream: _Stream) -> None:
        self._streams.pop(stream.id, None)
        self._notify()

    def _on_request(self, stream: _Stream, req: Request) -> None:
        if isinstance(req, discovery_pb2.DiscoveryRequest):
            self._on_sotw(stream, req)
        else:
            self._on_delta(stream, req)
        self._notify()

    def _record(self, stream: _Stream, req: Request, stale: bool) -> None:
        nonce = req.response_nonce
        kind: Literal["request", "ack", "nack"] = (
            "nack" if req.HasField("error_detail") else "ack" if nonce else "request"
        )
        self.requests.append(
            Recorded(
                len(self.requests),
                stream.id,
                stream.mode,
                req,
                kind,
                nonce,
                self._nonce_versions.get(nonce),
                stale,
                time.monotonic(),
            )
        )

    def _on_sotw(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        type_url = req.type_url
        sub = stream.subs.get(type_url)
        first = sub is None or not sub.last_nonce
        stale = not first and bool(req.response_nonce) and req.response_nonce != sub.last_nonce  # type: ignore[union-attr]
        self._record(stream, req, stale)
        if stale:
            return
        if sub is None:
            sub = stream.subs[type_url] = _Sub()
        names = set(req.resource_names)
        wildcard = "*" in names or (not names and type_url in WILDCARD_TYPES)
        changed = (wildcard, names) != (sub.wildcard, sub.names)
        sub.wildcard, sub.names = wildcard, names - {"*"}
        snap = self._snapshots.get(type_url)
        if snap is None:
            return  # nothing to serve yet; set_resources will push
        if req.HasField("error_detail") and not changed:
            return  # a NACK: resending the same thing would loop
        if first or changed or req.version_info != snap.version:
            self._send_sotw(stream, type_url, sub)

    def _on_delta(self, stream: _Stream, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = req.type_url
        self._record(stream, req, stale=False)
        sub = stream.subs.get(type_url)
        first = sub is None
        if sub is None:
            sub = stream.subs[type_url] = _Sub(known=dict(req.initial_resource_versions))
            if not req.resource_names_subscribe and type_url in WILDCARD_TYPES:
                sub.wildcard = True
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        if "*" in subscribe:
            sub.wildcard = True
        if "*" in unsubscribe:
            sub.wildcard = False
        sub.names |= subscribe - {"*"}
        sub.names -= unsubscribe
        for name in unsubscribe:
            sub.known.pop(name, None)
        if first or subscribe:
            self._send_delta(stream, type_url, sub, force=first)

    def _send_sotw(self, stream: _Stream, type_url: str, sub: _Sub) -> None:
        snap = self._snapshots[type_url]
        names = tuple(n for n in snap.resources if sub.wants(n))
        nonce = self._new_nonce(snap.version)
        sub.last_nonce = nonce
        resp = discovery_pb2.DiscoveryResponse(
            version_info=snap.version,
            type_url=type_url,
            nonce=nonce,
            resources=[snap.resources[n] for n in names],
        )
        self._emit(stream, resp, type_url, snap.version, nonce, names, ())

    def _send_delta(self, stream: _Stream, type_url: str, sub: _Sub, *, force: bool) -> None:
        """Send what the client lacks or has stale, and what was deleted.

        With ``force`` (a stream's first request of a type) an empty response
        is sent too, so the client always hears back once.
        """
        snap = self._snapshots.get(type_url)
        if snap is None:
            return
        names = tuple(
            n for n in snap.resources if sub.wants(n) and sub.known.get(n) != snap.hashes[n]
        )
        removed = tuple(n for n in sub.known if n not in snap.resources and sub.wants(n))
        if not (names or removed or force):
            return
        for n in names:
            sub.known[n] = snap.hashes[n]
        for n in removed:
            del sub.known[n]
        nonce = self._new_nonce(snap.version)
        resp = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.version,
            type_url=type_url,
            nonce=nonce,
            removed_resources=removed,
            resources=[
                discovery_pb2.Resource(name=n, version=snap.hashes[n], resource=snap.resources[n])
                for n in names
            ],
        )
        self._emit(stream, resp, type_url, snap.version, nonce, names, removed)

    def _emit(
        self,
        stream: _Stream,
        resp: Response,
        type_url: str,
        version: str,
        nonce: str,
        names: tuple[str, ...],
        removed: tuple[str, ...],
    ) -> None:
        stream.outbox.put_nowait(resp)
        size = resp.ByteSize()
        self.responses.append(
            Sent(stream.id, stream.mode, type_url, version, nonce, names, removed, size)
        )
        self._notify()

    def _new_nonce(self, version: str) -> str:
        nonce = f"n{next(self._nonces)}"
        self._nonce_versions[nonce] = version
        return nonce

    def _notify(self) -> None:
        """Wake every waiter; a fresh Event makes the next wait block again."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()


def _serialize(message: Response | bytes) -> bytes:
    """Responses are messages, or bytes already (``push_bytes``) sent as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _handlers(servicer: _Servicer) -> grpc.GenericRpcHandler:
    """ADS with the usual request decoding and a response serializer that passes bytes."""
    service = "envoy.service.discovery.v3.AggregatedDiscoveryService"
    methods = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=_serialize,
        ),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources,
            request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    return grpc.method_handlers_generic_handler(service, methods)


class _Servicer:
    """gRPC glue: one reader task per stream feeds the control plane; the
    handler itself (an async generator, as grpc.aio requires) drains the outbox.
    """

    def __init__(self, cp: ControlPlane) -> None:
        self._cp = cp

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse | bytes]:
        async for resp in self._serve("sotw", request_iterator, context):
            yield resp

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse | bytes]:
        async for resp in self._serve("delta", request_iterator, context):
            yield resp

    async def _serve(
        self,
        mode: Mode,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Response | bytes]:
        stream = self._cp._open_stream(mode, context)
        token = self._cp.token
        if token is not None and self._cp.stream_metadata[-1].get("authorization") != (
            f"Bearer {token}"
        ):
            self._cp._close_stream(stream)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while (resp := await stream.outbox.get()) is not None:
                yield resp
        finally:
            reader.cancel()
            self._cp._close_stream(stream)

    async def _read(self, stream: _Stream, request_iterator: AsyncIterator[Request]) -> None:
        """Feed requests in; when the client half-closes or fails, end the stream."""
        try:
            async for req in request_iterator:
                self._cp._on_request(stream, req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one bad stream must not affect others
            log.debug("stream %d ended: %r", stream.id, exc)
        stream.outbox.put_nowait(None)
