"""Proxyless gRPC against Istio's real generator: grpcio's own xDS client resolves a
service of the sample mesh (``payments/pay``, gRPC on 9090) through ``xdsfast run``, with
``istiod-fake`` as the control plane and its ``grpc`` generator (the node xdsfast writes
into the gRPC bootstrap carries ``GENERATOR=grpc``).

The sample mesh's Pod IPs are not on this machine, so the test moves ``pay``'s only
endpoint to a local echo server (its Pod and EndpointSlice re-applied with 127.0.0.1 and
the server's port) before the client starts: the call then goes where istiod's EDS says.
The client runs in its own process (gRPC's xDS client is a process-wide singleton
configured once from GRPC_XDS_BOOTSTRAP).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from conftest import XdsfastFactory
from istio_peers import YAML_DIR, IstiodFake, Peers, peers, start_istiod_fake

from xdsfast.peers.backend import http_get
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

# The peers' build is fixture set-up (minutes when cold): the timeout covers the test only.
pytestmark = pytest.mark.timeout(150, func_only=True)

TARGET = "xds:///pay.payments.svc.cluster.local:9090"
METHOD = "/xdsfast.test.Echo/Say"

CLIENT = f"""
import grpc
with grpc.insecure_channel({TARGET!r}) as channel:
    say = channel.unary_unary({METHOD!r})
    print(say(b"hello through istiod", timeout=30).decode())
"""


def local_endpoint(port: int) -> str:
    """``pay``'s Pod and EndpointSlice (same names as in mesh.yaml) moved to 127.0.0.1."""
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: pay-0
  namespace: payments
  labels: {{app: pay, version: v1}}
spec:
  serviceAccountName: pay
  containers: [{{name: app, image: pay}}]
status:
  phase: Running
  podIP: 127.0.0.1
  podIPs: [{{ip: 127.0.0.1}}]
  conditions: [{{type: Ready, status: "True"}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: pay-ghi56
  namespace: payments
  labels: {{kubernetes.io/service-name: pay}}
addressType: IPv4
endpoints:
- addresses: [127.0.0.1]
  conditions: {{ready: true}}
  targetRef: {{kind: Pod, name: pay-0, namespace: payments}}
ports:
- {{name: grpc, port: {port}, protocol: TCP}}
"""


class EchoServer:
    """A plain gRPC server standing in for ``pay``: raw bytes in and out."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._say)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("xdsfast.test.Echo", {"Say": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.calls = 0

    async def _say(self, request: bytes, _: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        return b"pay: " + request


@pytest.fixture(scope="session")
def istio() -> Peers:
    return peers()


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    await echo.server.start()
    yield echo
    await echo.server.stop(0)


@pytest_asyncio.fixture
async def istiod(istio: Peers, short_tmp: Path) -> AsyncIterator[IstiodFake]:
    fake = await start_istiod_fake(istio, [YAML_DIR / "mesh.yaml"], short_tmp / "istiod")
    try:
        yield fake
    finally:
        await fake.stop()


async def test_grpc_xds_client_resolves_a_mesh_service_through_xdsfast(
    istiod: IstiodFake, echo_server: EchoServer, xdsfast_run: XdsfastFactory, short_tmp: Path
) -> None:
    done = await istiod.apply(local_endpoint(echo_server.port))
    assert done == ["Pod payments/pay-0 updated", "EndpointSlice payments/pay-ghi56 updated"]
    bootstrap_path = short_tmp / "grpc-bootstrap.json"
    relay = await xdsfast_run(
        "--discovery-address",
        istiod.xds_address,
        env={
            "GRPC_XDS_BOOTSTRAP": str(bootstrap_path),
            "POD_NAME": "frontend-0",
            "POD_NAMESPACE": "shop",
            "INSTANCE_IP": "10.1.1.10",
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
        },
    )
    node = json.loads(bootstrap_path.read_text())["node"]
    assert node["id"] == "sidecar~10.1.1.10~frontend-0.shop~shop.svc.cluster.local"
    assert node["metadata"]["GENERATOR"] == "grpc"

    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap_path)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(client.communicate(), 60)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == "pay: hello through istiod"
    assert echo_server.calls == 1

    # The four xDS types a gRPC client needs came from istiod through xdsfast (the
    # endpoint itself only exists in istiod's EDS, after the apply above).
    assert relay.status_port is not None
    status, _, body = await http_get("127.0.0.1", relay.status_port, "/stats/prometheus")
    assert status == 200
    relayed = set(
        re.findall(
            r'xdsfast_xds_bytes_total\{type_url="([^"]+)",direction="response"\}', body.decode()
        )
    )
    assert {LISTENER, ROUTE, CLUSTER, ENDPOINT} <= relayed, relayed
