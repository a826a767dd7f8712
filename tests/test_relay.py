"""The relay with a scripted ADS client (grpc.aio) and the istiod stand-in, in both modes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from conftest import AgentFactory
from google.protobuf import any_pb2
from support import connect, socket_of

from xdsfast import xds_pb2
from xdsfast.agent import Agent
from xdsfast.config import Config
from xdsfast.engines import SERVICE, Mode
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient, StreamClosed
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER, NAME_TABLE

MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]


@pytest_asyncio.fixture
async def agent(make_agent: AgentFactory, control_plane: ControlPlane) -> Agent:
    return await make_agent(discovery_address=control_plane.address)


def serve_sample(cp: ControlPlane) -> None:
    cp.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080))


async def with_name_table(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> AdsClient:
    """A stream past its first LDS request, with the first NameTable applied."""
    control_plane.set_name_table(mesh.sample_name_table())
    client = await listening(agent, control_plane, clients, delta)
    await agent.dns_table.wait_updates(1)
    return client


async def listening(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> AdsClient:
    """A stream on the sample mesh, past Envoy's first LDS request and its answer."""
    serve_sample(control_plane)
    client = await connect(agent, clients, delta)
    await listen(client)
    return client


async def listen(client: AdsClient) -> None:
    """Envoy's first LDS request, and the response to it."""
    await client.request(LISTENER)
    response = await client.recv()
    assert response.type_url == LISTENER


# -- NameTable ------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", MODES)
async def test_name_table_requested_only_after_first_lds(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    serve_sample(control_plane)
    control_plane.set_name_table(mesh.sample_name_table())
    client = await connect(agent, clients, delta)
    await client.request(CLUSTER)
    assert (await client.recv()).type_url == CLUSTER
    await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER)
    assert not any(r.type_url == NAME_TABLE for r in control_plane.requests)

    await listen(client)
    ack = await control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)
    types = [r.type_url for r in control_plane.requests if r.stream_id == ack.stream_id]
    assert types.index(LISTENER) < types.index(NAME_TABLE)
    first = next(r for r in control_plane.requests if r.type_url == NAME_TABLE)
    assert first.kind == "request" and not first.request.HasField("node")
    assert agent.dns_table.hosts()["backend.default.svc.cluster.local"] == ["10.0.0.1"]

    # A second LDS request (an ACK) sends no second NameTable request.
    await client.request(LISTENER)
    await control_plane.wait_for_request(lambda r: r.type_url == LISTENER, since=ack.seq + 1)
    requests_for_nds = [
        r for r in control_plane.requests if r.type_url == NAME_TABLE and r.kind == "request"
    ]
    assert len(requests_for_nds) == 1


@pytest.mark.parametrize("delta", MODES)
async def test_name_table_pushes_are_applied_acked_and_never_forwarded(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    serve_sample(control_plane)
    v1 = control_plane.set_name_table(mesh.sample_name_table())
    client = await connect(agent, clients, delta)
    await listen(client)
    await agent.dns_table.wait_updates(1)
    assert agent.dns_table.version == v1

    table = mesh.sample_name_table()
    table.table["new.default.svc.cluster.local"].ips.append("10.0.0.9")
    v2 = control_plane.set_name_table(table)
    ack = await control_plane.wait_for_request(
        lambda r: r.type_url == NAME_TABLE and r.is_ack and r.response_version == v2
    )
    assert agent.dns_table.hosts()["new.default.svc.cluster.local"] == ["10.0.0.9"]
    if not delta:
        assert ack.request.version_info == v2
    # Envoy saw only the listener: a push after the NameTable is the next thing it gets.
    control_plane.set_resources(LISTENER, {"x": mesh.listener(port=15002, name="x")})
    assert (await client.recv()).type_url == LISTENER
    assert agent.metrics.sample("xdsfast_xds_consumed_responses_total", {"result": "applied"}) == 2


@pytest.mark.parametrize("delta", MODES)
async def test_undecodable_name_table_is_nacked(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    await with_name_table(agent, control_plane, clients, delta)

    bad = any_pb2.Any(type_url=NAME_TABLE, value=b"\x0a\x05ab")  # a truncated map entry
    (nonce,) = control_plane.push_raw(NAME_TABLE, [bad], version="bad-1")
    nack = await control_plane.wait_for_request(lambda r: r.nonce == nonce)
    assert nack.is_nack
    assert nack.request.error_detail.code == 13
    assert "NameTable" in nack.error
    assert agent.dns_table.updates == 1  # the old table stays
    assert agent.metrics.sample("xdsfast_xds_consumed_responses_total", {"result": "rejected"}) == 1


@pytest.mark.parametrize("delta", MODES)
async def test_empty_name_table_is_neither_applied_nor_acked(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    await with_name_table(agent, control_plane, clients, delta)

    (empty,) = control_plane.push_empty(NAME_TABLE)
    changed = mesh.sample_name_table()
    changed.table["later.default.svc.cluster.local"].ips.append("10.0.0.7")
    v = control_plane.set_name_table(changed)
    # Responses are handled in order: once the later push is ACKed, the empty one was seen.
    await control_plane.wait_for_request(
        lambda r: r.type_url == NAME_TABLE and r.is_ack and r.response_version == v
    )
    assert not any(r.nonce == empty for r in control_plane.requests)
    assert agent.dns_table.updates == 2


async def test_name_table_is_forwarded_untouched_when_dns_is_off(
    make_agent: AgentFactory, control_plane: ControlPlane, clients: list[AdsClient]
) -> None:
    agent = await make_agent(discovery_address=control_plane.address, dns_enabled=False)
    client = await listening(agent, control_plane, clients, False)
    control_plane.push_raw(NAME_TABLE, [mesh.sample_name_table()])
    control_plane.push_raw(CLUSTER, [mesh.eds_cluster("c")])
    # Not an envoy.* type: dropped by the allow-list, never requested by the agent.
    assert (await client.recv()).type_url == CLUSTER
    assert not any(r.type_url == NAME_TABLE for r in control_plane.requests)
    assert agent.dns_table.updates == 0


# -- forwarding -----------------------------------------------------------------------------


@pytest.mark.parametrize("delta", MODES)
async def test_only_envoy_types_and_workload_are_forwarded(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    client = await listening(agent, control_plane, clients, delta)
    control_plane.push_raw("type.googleapis.com/istio.security.Authorization")
    control_plane.push_raw("type.googleapis.com/istio.workload.Address")
    control_plane.push_raw("type.example.com/unknown")
    control_plane.push_raw("type.googleapis.com/istio.workload.Workload", version="w1")
    control_plane.push_raw(ENDPOINT, [mesh.endpoints(port=8080)], version="e1")
    first, second = await client.recv(), await client.recv()
    assert first.type_url == "type.googleapis.com/istio.workload.Workload"
    assert second.type_url == ENDPOINT
    dropped = agent.metrics.sample(
        "xdsfast_xds_dropped_responses_total", {"reason": "type_not_forwarded"}
    )
    assert dropped == 3


@pytest.mark.parametrize("delta", MODES)
async def test_many_responses_arrive_once_in_order(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    client = await listening(agent, control_plane, clients, delta)
    sent = [
        control_plane.push_raw(ENDPOINT, [mesh.small_eds(i)], version=f"e{i}")[0]
        for i in range(200)
    ]
    got = [(await client.recv()).nonce for _ in sent]
    assert got == sent
    with pytest.raises(TimeoutError):
        await client.recv(timeout=0.2)


@pytest.mark.parametrize("delta", MODES)
async def test_requests_are_forwarded_verbatim(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    serve_sample(control_plane)
    client = await connect(agent, clients, delta)
    await client.request(CLUSTER, ["a", "b"], response_nonce="no-such-nonce")
    seen = await control_plane.wait_for_request(lambda r: r.type_url == CLUSTER)
    assert seen.request.node.id == mesh_node_id()
    names = seen.request.resource_names_subscribe if delta else seen.request.resource_names
    assert list(names) == ["a", "b"]
    assert seen.request.response_nonce == "no-such-nonce"


def mesh_node_id() -> str:
    from xdsfast.peers.adsclient import default_node

    return str(default_node().id)


# -- pairing and termination ----------------------------------------------------------------


async def test_metadata_cluster_id_and_xds_headers(
    make_agent: AgentFactory, control_plane: ControlPlane, clients: list[AdsClient]
) -> None:
    env = {
        "ISTIO_META_CLUSTER_ID": "east-1",
        "XDS_HEADER_X_TENANT": "blue",
        "XDS_HEADER_Trace_Id": "abc",
    }
    config = Config.build({"discovery_address": control_plane.address, "plaintext": True}, env)
    agent = await make_agent(
        discovery_address=control_plane.address,
        cluster_id=config.cluster_id,
        xds_headers=config.xds_headers,
    )
    await listening(agent, control_plane, clients, False)
    metadata = control_plane.stream_metadata[-1]
    assert metadata["clusterid"] == "east-1"
    assert metadata["x_tenant"] == "blue"
    assert metadata["trace_id"] == "abc"


async def test_cluster_id_is_sent_even_when_empty(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient]
) -> None:
    await listening(agent, control_plane, clients, True)
    assert control_plane.stream_metadata[-1]["clusterid"] == ""


@pytest.mark.parametrize("delta", MODES)
async def test_a_new_stream_ends_the_old_one_with_ok(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    serve_sample(control_plane)
    old = await connect(agent, clients, delta)
    await listen(old)
    new = await connect(agent, clients, delta)
    await listen(new)
    status = await old.wait_closed()
    assert status.code == grpc.StatusCode.OK
    await control_plane.wait_for(lambda: control_plane.active_streams == 1)
    control_plane.set_resources(CLUSTER, {"c": mesh.eds_cluster("c")})
    # The new stream is the live one: it still gets pushes.
    await new.request(CLUSTER)
    assert (await new.recv()).type_url == CLUSTER


@pytest.mark.parametrize("delta", MODES)
async def test_envoy_going_away_ends_the_upstream_stream(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    client = await listening(agent, control_plane, clients, delta)
    await client.close()
    await control_plane.wait_for(lambda: control_plane.active_streams == 0)
    terminations = agent.metrics.envoy_connection_terminations
    await wait_until(lambda: terminations.get("cancelled") == 1)


@pytest.mark.parametrize("delta", MODES)
async def test_envoy_half_close_ends_the_pair_cleanly(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    client = await listening(agent, control_plane, clients, delta)
    await client.done_writing()
    status = await client.wait_closed()
    assert status.code == grpc.StatusCode.OK
    await control_plane.wait_for(lambda: control_plane.active_streams == 0)
    assert agent.metrics.envoy_connection_terminations.get("cancelled") == 1


@pytest.mark.parametrize("delta", MODES)
async def test_istiod_going_away_ends_envoys_stream_and_next_stream_works(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    client = await listening(agent, control_plane, clients, delta)
    await control_plane.stop()
    status = await client.wait_closed()
    assert status.code != grpc.StatusCode.OK
    assert sum(agent.metrics.istiod_connection_terminations.by.values()) == 1

    await control_plane.restart()
    again = await connect(agent, clients, delta)
    await listen(again)


async def test_unreachable_istiod_fails_envoys_stream_and_counts(
    make_agent: AgentFactory, short_tmp: Path, clients: list[AdsClient]
) -> None:
    agent = await make_agent(discovery_address=f"unix:{short_tmp}/nobody-home")
    # The relay dials istiod as Envoy's stream opens, so the client writes nothing: grpcio's
    # client reports "Internal error from Core" instead of the status when a server ends a
    # bidi call under a write in flight (a grpc quirk, seen with every server).
    client = await connect(agent, clients, False)
    status = await client.wait_closed()
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert "cannot connect" in status.details
    assert agent.metrics.istiod_connection_failures.get() == 1


# -- malformed frames -----------------------------------------------------------------------


class RawControlPlane:
    """Answers every stream's first request with the given raw frames, then holds it open."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.streams = 0
        self.server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(self._serve)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {m.value: handler for m in Mode})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _serve(self, _: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        self.streams += 1
        await context.read()
        for frame in self.frames:
            await context.write(frame)
        await context.read()  # until the client goes


async def test_malformed_response_ends_the_stream_and_is_counted(
    make_agent: AgentFactory, clients: list[AdsClient]
) -> None:
    good = xds_pb2.DiscoveryResponse(type_url=CLUSTER, nonce="1").SerializeToString()
    raw = RawControlPlane([good, b"\x0a\xff\xff\x00"])  # a length past the end
    await raw.server.start()
    try:
        agent = await make_agent(discovery_address=f"127.0.0.1:{raw.port}")
        client = await connect(agent, clients, False)
        await client.request(CLUSTER)
        assert (await client.recv()).nonce == "1"  # what came before is delivered
        with pytest.raises(StreamClosed) as closed:
            await client.recv()
        assert closed.value.code == grpc.StatusCode.INTERNAL
        assert agent.metrics.bad_messages.get("response") == 1
        assert agent.metrics.istiod_connection_terminations.get("error") == 1
        # The next stream works again (here: up to the same bad frame).
        again = await connect(agent, clients, False)
        await again.request(CLUSTER)
        assert (await again.recv()).nonce == "1"
    finally:
        await raw.server.stop(0)


async def test_malformed_request_ends_the_stream(
    agent: Agent, control_plane: ControlPlane, short_tmp: Path
) -> None:
    channel = grpc.aio.insecure_channel(socket_of(agent))
    call = channel.stream_stream(f"/{SERVICE}/{Mode.SOTW.value}")()
    await call.write(b"\x0f")  # wire type 7: not a DiscoveryRequest
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call.read()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert agent.metrics.bad_messages.get("request") == 1
    await channel.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


async def test_requests_over_the_receive_limit_end_the_stream(
    make_agent: AgentFactory, control_plane: ControlPlane, clients: list[AdsClient]
) -> None:
    """ISTIO_GPRC_MAXRECVMSGSIZE bounds what Envoy may send (4 MiB by default)."""
    agent = await make_agent(discovery_address=control_plane.address, max_recv_msg_size=4096)
    client = await connect(agent, clients, False)
    await client.request(CLUSTER, ["x" * 5000])
    status = await client.wait_closed()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not any(r.type_url == CLUSTER for r in control_plane.requests)


@pytest.mark.parametrize("delta", MODES)
async def test_requests_sent_before_a_half_close_still_reach_istiod(
    agent: Agent, control_plane: ControlPlane, clients: list[AdsClient], delta: bool
) -> None:
    serve_sample(control_plane)
    client = await connect(agent, clients, delta)
    for i in range(50):
        await client.request(CLUSTER, [f"c{i}"])
    await client.done_writing()
    assert (await client.wait_closed()).code == grpc.StatusCode.OK
    await control_plane.wait_for(
        lambda: sum(r.type_url == CLUSTER for r in control_plane.requests) == 50
    )
