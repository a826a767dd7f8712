"""Tests of the real xDS peers (control plane, Envoy launcher, ADS client, backend).

They run the peers against each other directly, without xdsfast in the
middle, so a failing relay test can be told apart from a broken peer.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from support import MODES, acks, body_becomes, envoy_scenario, free_port, needs_envoy

from xdsfast import nds_pb2
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient, Response, subscribe_all_and_ack
from xdsfast.peers.backend import DEFAULT_BODY, Backend, http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.envoy import EnvoyProcess
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE


def shm_files() -> set[Path]:
    return set(Path("/dev/shm").glob("envoy_shared_memory_*"))


def payloads(resp: Response) -> list[any_pb2.Any]:
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return [r.resource for r in resp.resources]
    return list(resp.resources)


# ----- Envoy <-> ControlPlane, no relay ----------------------------------------------


@pytest.mark.envoy
@needs_envoy
@pytest.mark.asyncio
@pytest.mark.parametrize("delta", MODES)
async def test_envoy_routes_pushes_nacks_and_reconnects(
    delta: bool, control_plane: ControlPlane, backend: Backend, short_tmp: Path
) -> None:
    cp = control_plane
    shm_before = shm_files()
    port = free_port()
    cp.set_mesh(mesh.sample_mesh(listener_port=port, backend_port=backend.port))
    envoy = EnvoyProcess(cp.address, delta=delta, workdir=short_tmp)
    await envoy.start()
    try:
        await envoy_scenario(cp, envoy, backend, port, delta=delta, relayed=False)
    finally:
        await envoy.stop()
    assert shm_files() == shm_before  # --disable-hot-restart: no shared memory left behind


@pytest.mark.envoy
@needs_envoy
@pytest.mark.asyncio
@pytest.mark.parametrize("delta", MODES)
async def test_envoy_over_unix_socket_with_big_cds(
    delta: bool, backend: Backend, short_tmp: Path
) -> None:
    """Istio's way in (a pipe), Istio-sized clusters stock Envoy accepts, an Envoy restart."""
    n = 200
    async with ControlPlane(f"unix:{short_tmp}/XDS") as cp:
        port = free_port()
        sample = mesh.sample_mesh(listener_port=port, backend_port=backend.port)
        sample[CLUSTER].update(mesh.big_cds(n))
        sample[ENDPOINT].update({mesh.big_cluster_name(i): mesh.small_eds(i) for i in range(n)})
        versions = cp.set_mesh(sample)
        async with EnvoyProcess(cp.address, delta=delta, workdir=short_tmp) as envoy:
            await envoy.wait_ready()
            for type_url in (CLUSTER, ENDPOINT):
                await cp.wait_for_request(partial(acks, type_url, versions[type_url]))
            assert not [r for r in cp.requests if r.is_nack]
            await envoy.wait_stat("cluster_manager.active_clusters", lambda v: v >= n + 2)
            assert (await envoy.stats())["cluster_manager.warming_clusters"] == 0
            await body_becomes(port, DEFAULT_BODY)
            dump = await envoy.config_dump()
            assert any("ListenersConfigDump" in c["@type"] for c in dump["configs"])

            # A killed Envoy restarts in the same workdir and opens a new stream.
            await envoy.kill()
            await cp.wait_for(lambda: cp.active_streams == 0)
            since = len(cp.requests)
            await envoy.start()
            await envoy.wait_ready()
            await cp.wait_for_request(lambda r: r.type_url == CLUSTER and r.is_ack, since=since)
            await body_becomes(port, DEFAULT_BODY)


# ----- AdsClient <-> ControlPlane ------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("delta", MODES)
async def test_name_table_only_when_asked(delta: bool, control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.set_mesh(mesh.sample_mesh(listener_port=1, backend_port=2))
    client = AdsClient(cp.address, delta=delta)
    await client.open(metadata={"clusterid": "Kubernetes", "x-demo": "yes"})
    try:
        await client.request(CLUSTER)
        assert (await client.recv()).type_url == CLUSTER
        assert not [s for s in cp.responses if s.type_url == NAME_TABLE]  # not pushed unasked
        assert cp.stream_metadata[-1]["clusterid"] == "Kubernetes"
        assert cp.stream_metadata[-1]["x-demo"] == "yes"

        await client.request(NAME_TABLE)
        resp = await client.recv()
        assert resp.type_url == NAME_TABLE and len(resp.resources) == 1
        if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
            assert resp.resources[0].name == ""
        table = nds_pb2.NameTable()
        assert payloads(resp)[0].Unpack(table)
        info = table.table["backend.default.svc.cluster.local"]
        assert (list(info.ips), info.registry, info.shortname, info.namespace) == (
            ["10.0.0.1"],
            "Kubernetes",
            "backend",
            "default",
        )
        assert table.table["api.example.com"].registry == "External"
        await client.ack(resp)
        await cp.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)

        # A table change is pushed to the stream that asked.
        table.table["new.default.svc.cluster.local"].ips.append("10.0.0.9")
        version = cp.set_name_table(table)
        pushed = await client.recv()
        assert pushed.type_url == NAME_TABLE
        again = nds_pb2.NameTable()
        assert payloads(pushed)[0].Unpack(again) and "new.default.svc.cluster.local" in again.table
        assert cp.version(NAME_TABLE) == version
    finally:
        await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("delta", MODES)
async def test_empty_and_unrequested_pushes(delta: bool, control_plane: ControlPlane) -> None:
    cp = control_plane
    async with AdsClient(cp.address, delta=delta) as client:
        await client.request(LISTENER)
        await cp.wait_for(lambda: cp.active_streams == 1 and len(cp.requests) == 1)

        cp.push_empty(NAME_TABLE)
        empty = await client.recv()
        assert (empty.type_url, len(empty.resources)) == (NAME_TABLE, 0)

        for type_url in (
            "type.googleapis.com/istio.security.Authorization",
            "type.example/unknown",
        ):
            blob = any_pb2.Any(type_url=type_url, value=b"\x0a\x03abc")
            (nonce,) = cp.push_raw(type_url, [blob], version="raw-1")
            resp = await client.recv()
            assert (resp.type_url, resp.nonce) == (type_url, nonce)
            assert payloads(resp) == [blob]


@pytest.mark.asyncio
async def test_sotw_stale_nonces_and_nacks_are_not_answered(control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.set_resources(CLUSTER, {"a": mesh.eds_cluster("a")})
    async with AdsClient(cp.address) as client:
        await client.request(CLUSTER)
        first = await client.recv()
        await client.ack(first)
        cp.set_resources(CLUSTER, {"b": mesh.eds_cluster("b")})
        v3 = cp.set_resources(CLUSTER, {"c": mesh.eds_cluster("c")})
        older, newest = await client.recv(), await client.recv()
        assert newest.version_info == v3
        sent = len(cp.responses)

        await client.ack(older)  # carries a nonce that is no longer the latest
        await client.ack(newest, error="rejected for the test")
        nack = await cp.wait_for_request(lambda r: r.is_nack)
        stale = cp.requests[nack.seq - 1]
        assert stale.stale and stale.nonce == older.nonce
        assert (
            not nack.stale and nack.response_version == v3 and nack.error == "rejected for the test"
        )
        await client.ack(newest)
        await cp.wait_for_request(lambda r: r.is_ack and r.nonce == newest.nonce)
        assert (
            len(cp.responses) == sent
        )  # neither the stale ACK, the NACK nor the ACK got an answer


@pytest.mark.asyncio
async def test_delta_initial_versions_and_removals(control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.set_resources(CLUSTER, {n: mesh.eds_cluster(n) for n in ("a", "b", "c")})
    async with AdsClient(cp.address, delta=True) as client:
        await client.request(CLUSTER)
        resp = await client.recv()
        assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
        have = {r.name: r.version for r in resp.resources}
        assert set(have) == {"a", "b", "c"}

    changed = mesh.eds_cluster("b")
    changed.connect_timeout.seconds = 7
    cp.set_resources(CLUSTER, {"a": mesh.eds_cluster("a"), "b": changed})
    async with AdsClient(cp.address, delta=True) as client:
        await client.request(CLUSTER, initial_resource_versions=have)
        resp = await client.recv()
        assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
        assert [r.name for r in resp.resources] == ["b"]  # "a" is identical: not resent
        assert list(resp.removed_resources) == ["c"]
        await client.ack(resp)
        cp.set_resources(CLUSTER, {"b": changed})
        resp = await client.recv()
        assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse)
        assert (len(resp.resources), list(resp.removed_resources)) == (0, ["a"])


@pytest.mark.asyncio
@pytest.mark.parametrize("unix", [pytest.param(False, id="tcp"), pytest.param(True, id="unix")])
async def test_stop_ends_streams_and_restart_keeps_address(unix: bool, short_tmp: Path) -> None:
    cp = ControlPlane(f"unix:{short_tmp}/cp.sock" if unix else "127.0.0.1:0")
    await cp.start()
    try:
        address = cp.address
        cp.set_resources(CLUSTER, {"a": mesh.eds_cluster("a")})
        survivor, leaver = AdsClient(address), AdsClient(address, delta=True)
        await survivor.open()
        await leaver.open()
        for client in (survivor, leaver):
            await client.request(CLUSTER)
            await client.recv()
        await leaver.close()  # a client vanishing must not disturb the others
        await cp.wait_for(lambda: cp.active_streams == 1)
        cp.set_resources(CLUSTER, {"b": mesh.eds_cluster("b")})
        assert len((await survivor.recv()).resources) == 1

        await cp.stop()
        status = await survivor.wait_closed(5.0)
        assert status.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), status
        await survivor.close()

        await cp.restart()
        assert cp.address == address
        async with AdsClient(address) as client:
            await client.request(CLUSTER)
            assert (
                cluster_pb2.Cluster.FromString((await client.recv()).resources[0].value).name == "b"
            )
    finally:
        await cp.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("delta", MODES)
async def test_subscribe_all_and_ack(delta: bool, control_plane: ControlPlane) -> None:
    cp = control_plane
    cp.set_mesh(mesh.sample_mesh(listener_port=1, backend_port=2))
    async with AdsClient(cp.address, delta=delta) as client:
        summary = await subscribe_all_and_ack(client, timeout=5.0)
        types = {CLUSTER, ENDPOINT, LISTENER, ROUTE}
        # Wait inside the stream: close() cancels, which can drop a just-written ACK.
        await cp.wait_for(lambda: {r.type_url for r in cp.requests if r.is_ack} == types)
    assert set(summary.by_type()) == types
    assert summary.names[ENDPOINT] == {mesh.CLUSTER_NAME}
    assert summary.names[ROUTE] == {mesh.ROUTE_NAME}
    assert all(r.resources == 1 for r in summary.received)


@pytest.mark.asyncio
async def test_wait_for_request_times_out_with_context(control_plane: ControlPlane) -> None:
    async with AdsClient(control_plane.address) as client:
        await client.request(LISTENER)
        with pytest.raises(TimeoutError, match="Listener request"):
            await control_plane.wait_for_request(lambda r: r.is_nack, timeout=0.3)
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.05)  # nothing to serve: no listener snapshot yet


# ----- sample data and the backend -------------------------------------------------------


def test_mesh_sizes() -> None:
    clusters = mesh.big_cds(4000)
    response = discovery_pb2.DiscoveryResponse(resources=[_pack(c) for c in clusters.values()])
    assert 4_500_000 < response.ByteSize() < 5_500_000
    assert 200 <= mesh.small_eds(1234).ByteSize() <= 260
    assert mesh.small_eds(7).cluster_name == mesh.big_cluster_name(7) in clusters


def _pack(msg: cluster_pb2.Cluster) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


@pytest.mark.asyncio
async def test_backend_counts_and_answers() -> None:
    async with Backend(body=b"pong") as server:
        for i in range(2):
            status, headers, body = await http_get(
                "127.0.0.1", server.port, f"/x{i}", headers={"x-a": "1"}
            )
            assert (status, body, headers["content-length"]) == (200, b"pong", "4")
        assert server.requests == 2 and server.last_headers["x-a"] == "1"
