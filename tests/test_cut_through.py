"""Cut-through with the relay in the loop: a big response reaches Envoy's side while istiod is
still sending it (fast engine), the same bytes as held whole (grpcio); what fails on the way
(istiod gone, a type_url unlike its first resource's, a malformed tail) ends Envoy's stream
before it has the message whole; consumed types are still held whole and applied."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable

import hpack
import pytest
import pytest_asyncio
from conftest import AgentFactory, asyncio_timeout
from hostile_envoy import HostileEnvoy, frame
from support import connect

from xdsfast import xds_pb2
from xdsfast.agent import Agent
from xdsfast.engines.fast import protocol
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER

MiB = 1 << 20
DATA, HEADERS, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 4, 6, 8
END_STREAM = ACK = 1
END_HEADERS = 4


def big_cds(clusters: int, *, type_url: str = CLUSTER, nonce: str = "n1") -> bytes:
    """A SotW CDS response of ``clusters`` Istio-like clusters (~1.2 KB each)."""
    response = xds_pb2.DiscoveryResponse(version_info="v1", type_url=type_url, nonce=nonce)
    for cluster in mesh.big_cds(clusters).values():
        response.resources.add().Pack(cluster)
    return response.SerializeToString()


def grpc_message(body: bytes) -> bytes:
    return b"\0" + struct.pack(">I", len(body)) + body


class RawIstiod:
    """istiod as a hand-driven HTTP/2 server: it answers the relay's stream with headers,
    then writes exactly the bytes a test gives it, as the relay's windows allow, and can
    drop the connection at any byte."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.stream = 0
        self.opened = asyncio.Event()
        self.windows = {0: 65_535}
        self.initial = 65_535
        self.credited = asyncio.Event()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readexactly(24)  # the preface
            writer.write(frame(SETTINGS, 0, 0))
            while True:
                head = await reader.readexactly(9)
                length, ftype, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                sid = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if ftype == SETTINGS and not flags & ACK:
                    for pos in range(0, length, 6):
                        key, value = struct.unpack(">HI", payload[pos : pos + 6])
                        if key == 4:  # INITIAL_WINDOW_SIZE
                            for stream in self.windows:
                                if stream:
                                    self.windows[stream] += value - self.initial
                            self.initial = value
                    writer.write(frame(SETTINGS, ACK, 0))
                elif ftype == PING and not flags & ACK:
                    writer.write(frame(PING, ACK, 0, payload))
                elif ftype == HEADERS and not self.stream:
                    self.stream = sid
                    self.windows[sid] = self.initial
                    block = hpack.Encoder().encode(
                        [(":status", "200"), ("content-type", "application/grpc")]
                    )
                    writer.write(frame(HEADERS, END_HEADERS, sid, block))
                    self.opened.set()
                elif ftype == WINDOW_UPDATE:
                    self.windows[sid] = self.windows.get(sid, 0) + int.from_bytes(payload, "big")
                    self.credited.set()

    async def send(self, data: bytes) -> None:
        """Write ``data`` on the stream as DATA frames, waiting for the relay's credit."""
        assert self.writer is not None
        view = memoryview(data)
        while view:
            window = min(self.windows[0], self.windows[self.stream], 16_384)
            if window <= 0:
                self.credited.clear()
                async with asyncio_timeout(10):
                    await self.credited.wait()
                continue
            n = min(window, len(view))
            self.writer.write(frame(DATA, 0, self.stream, bytes(view[:n])))
            self.windows[0] -= n
            self.windows[self.stream] -= n
            view = view[n:]
            await self.writer.drain()

    def drop(self) -> None:
        assert self.writer is not None
        self.writer.transport.abort()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self.server is not None:
            self.server.close()


@pytest.fixture
def engine() -> str:
    """Cut-through is the fast engine's (the conftest's fixture runs both)."""
    return "fast"


Rig = tuple[Agent, RawIstiod, HostileEnvoy, int]


@pytest_asyncio.fixture
async def rig(make_agent: AgentFactory) -> AsyncIterator[Rig]:
    """An agent between a hand-driven istiod and a hand-driven Envoy, one stream open and
    answered; cut-through from 64 KiB up."""
    istiod = RawIstiod()
    address = await istiod.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "THROUGH_MIN", 64 << 10)
        agent = await make_agent(discovery_address=address, dns_enabled=False)
        envoy = await HostileEnvoy.open(agent.config.xds_socket)
        try:
            sid = envoy.stream()
            async with asyncio_timeout(10):
                await istiod.opened.wait()
            yield agent, istiod, envoy, sid
        finally:
            await envoy.close()
            await istiod.close()


async def wait(envoy: HostileEnvoy, condition: Callable[[], bool]) -> None:
    await envoy.wait(condition, timeout=20)


async def test_a_big_response_reaches_envoy_while_istiod_still_sends_it(rig: Rig) -> None:
    agent, istiod, envoy, sid = rig
    body = big_cds(2000)  # ~2.4 MB
    message = grpc_message(body)
    half = len(message) // 2
    await istiod.send(message[:half])
    # Envoy has all it can have of the first half (the last byte is only ever written once
    # the message has been read to its end), and no message yet.
    await wait(envoy, lambda: len(envoy.data[sid]) >= half - 1)
    assert bytes(envoy.data[sid]) == message[: len(envoy.data[sid])]
    assert envoy.messages(sid) == [] and agent.metrics.streamed_responses.get() == 0
    await istiod.send(message[half:])
    await wait(envoy, lambda: len(envoy.messages(sid)) == 1)
    assert envoy.messages(sid) == [body]
    assert agent.metrics.streamed_responses.get() == 1
    assert agent.metrics.xds_proxy_responses.get() == 1
    state = agent.relay.debug_state()["streams"][0]["types"][CLUSTER]
    assert (state["nonce"], state["version"], state["bytes"]) == ("n1", "v1", len(body))
    assert agent.metrics.push_latency.count == 1
    # The next response, small, follows it in order.
    small = xds_pb2.DiscoveryResponse(type_url=ENDPOINT, nonce="n2").SerializeToString()
    await istiod.send(grpc_message(small))
    await wait(envoy, lambda: len(envoy.messages(sid)) == 2)
    assert envoy.messages(sid)[1] == small


async def test_istiod_gone_mid_push_ends_envoys_stream(rig: Rig) -> None:
    agent, istiod, envoy, sid = rig
    message = grpc_message(big_cds(1000))
    await istiod.send(message[: len(message) // 2])
    await wait(envoy, lambda: len(envoy.data[sid]) >= len(message) // 2 - 1)
    istiod.drop()
    await wait(envoy, lambda: sid in envoy.ended)
    assert envoy.messages(sid) == []
    assert envoy.ended[sid].get("grpc-status") == "14"  # UNAVAILABLE: Envoy retries
    assert sum(agent.metrics.istiod_connection_terminations.by.values()) == 1


async def test_a_type_url_unlike_its_first_resources_ends_the_stream(rig: Rig) -> None:
    agent, istiod, envoy, sid = rig
    message = grpc_message(big_cds(500, type_url=ENDPOINT))
    await istiod.send(message)
    await wait(envoy, lambda: sid in envoy.ended)
    assert envoy.messages(sid) == [] and len(envoy.data[sid]) == len(message) - 1
    assert envoy.ended[sid].get("grpc-status") == "13"
    assert "is not its first resource's" in envoy.ended[sid].get("grpc-message", "")
    assert agent.metrics.dropped_responses.get("type_mismatch") == 1
    assert agent.metrics.streamed_responses.get() == 0


@pytest.mark.parametrize("where", ["on the way", "at the end"])
async def test_a_malformed_response_ends_the_stream_before_envoy_has_it(
    rig: Rig, where: str
) -> None:
    agent, istiod, envoy, sid = rig
    body = big_cds(500)
    if where == "on the way":  # a field whose length runs past the message: seen as it comes
        head = xds_pb2.DiscoveryResponse.FromString(body)
        head.ClearField("type_url")
        head.ClearField("nonce")
        body = head.SerializeToString() + b"\x22\xff\xff\xff\x0f" + bytes(300_000)
    else:  # a string cut by the message's end: only its last bytes show it
        body += b"\x2a\x05ab"
    message = grpc_message(body)
    sending = asyncio.ensure_future(istiod.send(message))  # (its end may never be read)
    try:
        await wait(envoy, lambda: sid in envoy.ended)
    finally:
        sending.cancel()
    assert envoy.messages(sid) == [] and len(envoy.data[sid]) < len(message)
    assert envoy.ended[sid].get("grpc-status") == "13"
    assert "malformed response" in envoy.ended[sid].get("grpc-message", "")
    assert agent.metrics.bad_messages.get("response") == 1
    assert agent.metrics.streamed_responses.get() == 0


# -- both engines, with the control plane stand-in and grpcio's client ------------------------


@pytest.mark.parametrize("engine", ["grpcio", "fast"])
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_big_pushes_arrive_once_in_order_on_either_engine(
    make_agent: AgentFactory,
    control_plane: ControlPlane,
    clients: list[AdsClient],
    engine: str,
    delta: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cut-through (fast) or held whole (grpcio), the client gets the same responses in
    the same order; a big NameTable is still consumed (held whole), never forwarded."""
    monkeypatch.setattr(protocol, "THROUGH_MIN", 1 << 20)
    control_plane.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080))
    table = mesh.sample_name_table()
    for i in range(20_000):  # ~1.4 MB: over THROUGH_MIN (1 MiB here)
        table.table[f"host-{i}.ns.svc.cluster.local"].ips.append(f"10.9.{i >> 8}.{i & 255}")
    control_plane.set_name_table(table)
    agent = await make_agent(discovery_address=control_plane.address)
    client = await connect(agent, clients, delta)
    await client.request(LISTENER)
    assert (await client.recv()).type_url == LISTENER
    await agent.dns_table.wait_updates(1)
    assert "host-19999.ns.svc.cluster.local" in agent.dns_table.hosts()
    clusters = mesh.big_cds(1500)  # ~1.8 MB: over THROUGH_MIN, lowered to 1 MiB here
    control_plane.set_resources(CLUSTER, clusters)
    await client.request(CLUSTER)
    first = await client.recv()
    assert first.type_url == CLUSTER and len(first.resources) == 1500
    control_plane.push_raw(ENDPOINT, [mesh.endpoints(80)])
    for cluster in clusters.values():  # every one changed: big in delta too
        cluster.connect_timeout.seconds = 7
    control_plane.set_resources(CLUSTER, clusters)
    second, third = await client.recv(), await client.recv()
    assert second.type_url == ENDPOINT and third.type_url == CLUSTER
    assert len(third.resources) == 1500
    assert agent.metrics.streamed_responses.get() == (2 if engine == "fast" else 0)
    assert agent.metrics.consumed_responses.get("applied") == 1
