"""A scripted ADS client (SotW or delta) over grpc.aio.

Tests use it to play Envoy, or the Istio agent, message by message; the demo
uses :func:`subscribe_all_and_ack` when no Envoy binary is available.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from xdsfast.peers.envoy import DEFAULT_NODE_ID
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

Request = Union[discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest]
Response = Union[discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse]

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class StreamClosed(Exception):
    """The ADS stream ended; ``code``/``details`` are its final gRPC status."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"ADS stream closed: {code} {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Status:
    """Final status of a stream."""

    code: grpc.StatusCode | None
    details: str


def default_node() -> base_pb2.Node:
    """A sidecar node like Envoy's in :mod:`.envoy`."""
    return base_pb2.Node(id=DEFAULT_NODE_ID, cluster="Kubernetes")


class AdsClient:
    """One ADS stream to ``address`` ("unix:/path" or "HOST:PORT")."""

    def __init__(self, address: str, *, delta: bool = False) -> None:
        self.address = address
        self.delta = delta
        self.status: Status | None = None
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._inbox: asyncio.Queue[Response | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, metadata: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> None:
        """Open the channel and the stream (gRPC metadata keys must be lower-case)."""
        self._channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        items = tuple(metadata.items()) if isinstance(metadata, Mapping) else tuple(metadata)
        method = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
        self._call = method(metadata=items)
        self._reader = asyncio.create_task(self._read(self._call))

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while (msg := await call.read()) is not grpc.aio.EOF:
                self._inbox.put_nowait(msg)
        except grpc.aio.AioRpcError:
            pass  # the status is read below
        except asyncio.CancelledError:
            pass
        with contextlib.suppress(Exception):
            self.status = Status(await call.code(), await call.details() or "")
        if self.status is None:
            self.status = Status(grpc.StatusCode.CANCELLED, "client closed")
        self._inbox.put_nowait(None)

    async def send(self, msg: Request) -> None:
        """Write one request (raises :class:`StreamClosed` if the stream has ended)."""
        if self._call is None:
            raise RuntimeError("open() first")
        if self.status is not None:
            raise StreamClosed(self.status.code, self.status.details)
        try:
            await self._call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            await self.wait_closed(5.0)
            status = self.status or Status(None, str(exc))
            raise StreamClosed(status.code, status.details) from exc

    async def recv(self, timeout: float = 10.0) -> Response:
        """Next response; ``TimeoutError`` at the deadline, :class:`StreamClosed` at the end."""
        try:
            msg = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no ADS response within {timeout}s") from None
        if msg is None:
            self._inbox.put_nowait(None)  # later recv() calls see the end too
            status = self.status or Status(None, "")
            raise StreamClosed(status.code, status.details)
        return msg

    async def request(self, type_url: str, names: Sequence[str] = (), **fields: object) -> None:
        """Send a subscription request (with the node) in this client's mode."""
        if self.delta:
            await self.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=type_url,
                    node=default_node(),
                    resource_names_subscribe=names,
                    **fields,
                )
            )
        else:
            await self.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    node=default_node(),
                    resource_names=names,
                    **fields,
                )
            )

    async def ack(
        self, resp: Response, *, error: str | None = None, names: Sequence[str] | None = None
    ) -> None:
        """ACK (or NACK, with ``error``) ``resp``, as Envoy would."""
        detail = {"error_detail": {"code": 13, "message": error}} if error is not None else {}
        if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
            await self.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=resp.type_url, response_nonce=resp.nonce, **detail
                )
            )
        else:
            await self.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=resp.type_url,
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    resource_names=names or (),
                    **detail,
                )
            )

    async def done_writing(self) -> None:
        """Half-close: no more requests."""
        if self._call is not None:
            await self._call.done_writing()

    async def wait_closed(self, timeout: float = 10.0) -> Status:
        """Wait for the stream to end; return its final status."""
        if self._reader is None:
            raise RuntimeError("open() first")
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"ADS stream still open after {timeout}s") from None
        assert self.status is not None
        return self.status

    async def close(self) -> None:
        """Cancel the stream (like a client that dies) and close the channel.

        Cancelling can drop requests written just before; for an orderly end,
        ``done_writing()`` then ``wait_closed()`` first.
        """
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AdsClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ----- an Envoy-like subscription script -------------------------------------------


@dataclass(frozen=True)
class Received:
    """One response seen by :func:`subscribe_all_and_ack`."""

    type_url: str
    version: str
    nonce: str
    resources: int
    size: int


@dataclass
class Summary:
    """What :func:`subscribe_all_and_ack` received."""

    received: list[Received] = field(default_factory=list)
    names: dict[str, set[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def by_type(self) -> dict[str, Received]:
        """Latest response per type URL."""
        return {r.type_url: r for r in self.received}

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.received)


def _eds_names(resources: Sequence[any_pb2.Any]) -> set[str]:
    names = set()
    for packed in resources:
        cluster = cluster_pb2.Cluster()
        if packed.Unpack(cluster) and cluster.type == cluster_pb2.Cluster.EDS:
            names.add(cluster.eds_cluster_config.service_name or cluster.name)
    return names


def _rds_names(resources: Sequence[any_pb2.Any]) -> set[str]:
    names = set()
    for packed in resources:
        listener = listener_pb2.Listener()
        if not packed.Unpack(listener):
            continue
        for chain in listener.filter_chains:
            for flt in chain.filters:
                manager = hcm_pb2.HttpConnectionManager()
                if flt.typed_config.Unpack(manager) and manager.HasField("rds"):
                    names.add(manager.rds.route_config_name)
    return names


def _payloads(resp: Response) -> list[any_pb2.Any]:
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return [r.resource for r in resp.resources]
    return list(resp.resources)


async def subscribe_all_and_ack(client: AdsClient, *, timeout: float = 10.0) -> Summary:
    """Behave like Envoy at start-up: CDS, then EDS for the clusters; LDS, then RDS.

    Every response is ACKed. Returns once each subscribed type has answered at
    least once (EDS/RDS only if something referenced them), or raises
    ``TimeoutError`` at the deadline.
    """
    start = time.monotonic()
    deadline = start + timeout
    summary = Summary()
    subscribed: dict[str, set[str]] = {CLUSTER: set(), LISTENER: set()}
    answered: set[str] = set()
    await client.request(CLUSTER)
    await client.request(LISTENER)
    while answered < set(subscribed):
        resp = await client.recv(timeout=max(0.0, deadline - time.monotonic()))
        payloads = _payloads(resp)
        version = (
            resp.system_version_info
            if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
            else resp.version_info
        )
        summary.received.append(
            Received(resp.type_url, version, resp.nonce, len(payloads), resp.ByteSize())
        )
        answered.add(resp.type_url)
        follow = {CLUSTER: (ENDPOINT, _eds_names), LISTENER: (ROUTE, _rds_names)}.get(resp.type_url)
        await client.ack(resp, names=sorted(subscribed.get(resp.type_url, ())) or None)
        if follow is not None:
            child, extract = follow
            wanted = extract(payloads) - subscribed.get(child, set())
            if wanted:
                subscribed.setdefault(child, set()).update(wanted)
                await _subscribe_more(client, child, wanted, subscribed[child])
    summary.names = {t: set(n) for t, n in subscribed.items()}
    summary.seconds = time.monotonic() - start
    return summary


async def _subscribe_more(
    client: AdsClient, type_url: str, new: set[str], all_names: set[str]
) -> None:
    """SotW re-sends the whole name list; delta sends only the additions."""
    await client.request(type_url, sorted(new if client.delta else all_names))
