"""Proxyless gRPC: grpcio's own xDS client finds a service through xdsfast.

The client runs in its own process (gRPC's xDS client is a process-wide
singleton configured once from GRPC_XDS_BOOTSTRAP).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio
from conftest import XdsfastFactory

from xdsfast.peers import mesh
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import LISTENER

METHOD = "/xdsfast.test.Echo/Say"

CLIENT = """
import sys, grpc
with grpc.insecure_channel("xds:///echo") as channel:
    say = channel.unary_unary("/xdsfast.test.Echo/Say")
    print(say(b"hello through xds", timeout=30).decode())
"""


class EchoServer:
    """A plain gRPC server (the proxyless client's destination), raw bytes in and out."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._say)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("xdsfast.test.Echo", {"Say": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def _say(self, request: bytes, _: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return b"echo: " + request


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    await echo.server.start()
    yield echo
    await echo.server.stop(0)


async def test_grpc_xds_client_resolves_through_xdsfast(
    xdsfast_run: XdsfastFactory,
    control_plane: ControlPlane,
    echo_server: EchoServer,
    short_tmp: Path,
) -> None:
    control_plane.set_mesh(mesh.proxyless_mesh("echo", echo_server.port))
    bootstrap_path = short_tmp / "grpc-bootstrap.json"
    relay = await xdsfast_run(
        "--discovery-address",
        control_plane.address,
        env={
            "GRPC_XDS_BOOTSTRAP": str(bootstrap_path),
            "POD_NAME": "echo-client-7d9",
            "POD_NAMESPACE": "apps",
            "INSTANCE_IP": "10.1.2.3",
            "ISTIO_META_CLUSTER_ID": "east",
        },
    )
    document = json.loads(bootstrap_path.read_text())
    (server,) = document["xds_servers"]
    assert server["server_uri"] == f"unix://{relay.socket_path}"
    assert server["channel_creds"] == [{"type": "insecure"}]
    assert server["server_features"] == ["xds_v3"]
    node = document["node"]
    assert node["id"] == "sidecar~10.1.2.3~echo-client-7d9.apps~apps.svc.cluster.local"
    assert node["metadata"]["GENERATOR"] == "grpc"
    assert node["metadata"]["CLUSTER_ID"] == "east"

    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(client.communicate(), 60)
    assert client.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip() == "echo: hello through xds"

    lds = await control_plane.wait_for_request(lambda r: r.type_url == LISTENER)
    assert lds.request.node.id == node["id"]
    assert lds.request.node.metadata.fields["GENERATOR"].string_value == "grpc"
    assert list(lds.request.resource_names) == ["echo"]
    assert control_plane.stream_metadata[-1]["clusterid"] == "east"


async def test_run_writes_the_bootstrap_where_istio_does(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane
) -> None:
    relay = await xdsfast_run("--discovery-address", control_plane.address)
    default = relay.socket_path.parent / "etc/istio/proxy/grpc-bootstrap.json"
    document = json.loads(default.read_text())
    assert document["xds_servers"][0]["server_uri"] == f"unix://{relay.socket_path}"
