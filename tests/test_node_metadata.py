"""With xdsfast's DNS on, the node of each stream's first request gets ``DNS_CAPTURE`` and
``DNS_PROXY_ADDR`` on its way upstream (pilot-agent's DNS, which would put them in Envoy's
bootstrap, is off when xdsfast serves DNS beside it): istiod reads them to auto-allocate
ServiceEntry addresses. Everything else of that request, and every later request, reaches
istiod as the client sent it; ``XDSFAST_NODE_DNS_CAPTURE=false`` or DNS off changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype
import pytest
import pytest_asyncio
from conftest import XdsfastFactory, XdsfastProcess
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from istio_peers import (
    YAML_DIR,
    IstiodFake,
    Peers,
    istio_node,
    peers,
    start_istiod_fake,
    wait_ready,
)
from support import MODES, free_port

from xdsfast.peers.adsclient import AdsClient, Request
from xdsfast.peers.backend import http_get
from xdsfast.peers.controlplane import ControlPlane, Recorded
from xdsfast.typeurls import CLUSTER, LISTENER, NAME_TABLE

TWINS = [pytest.param({}, id="compiled"), pytest.param({"XDSFAST_NO_EXTENSIONS": "1"}, id="twin")]


def client_node() -> base_pb2.Node:
    """A node whose metadata already has the two keys (to be replaced) and others (kept)."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "DNS_CAPTURE": "false",
            "DNS_PROXY_ADDR": "192.0.2.1:53",
            "NAMESPACE": "default",
            "LABELS": {"app": "client", "version": "v1"},
            "DNS_AUTO_ALLOCATE": "true",
        }
    )
    return base_pb2.Node(
        id="sidecar~10.1.1.1~client.default~default.svc.cluster.local",
        cluster="client.default",
        metadata=metadata,
        user_agent_name="envoy",
    )


def request(delta: bool, type_url: str, node: base_pb2.Node | None, names: list[str]) -> Request:
    if delta:
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, node=node, resource_names_subscribe=names
        )
    return discovery_pb2.DiscoveryRequest(type_url=type_url, node=node, resource_names=names)


def same(received: Recorded, sent: Request) -> bool:
    """The request reached the control plane as the client sent it."""
    got: bytes = received.request.SerializeToString(deterministic=True)
    expected: bytes = sent.SerializeToString(deterministic=True)
    return got == expected


async def relay_requests(
    cp: ControlPlane, xdsfast: XdsfastProcess, delta: bool, *, first_has_node: bool = True
) -> tuple[list[Request], list[Recorded]]:
    """A client's requests through xdsfast, and what the control plane got of them.

    The first request goes once xdsfast's upstream stream is open (the relay's fast path
    is then in place); the second one carries a node too."""
    client = AdsClient(f"unix:{xdsfast.socket_path}", delta=delta)
    await client.open()
    try:
        await cp.wait_for(lambda: cp.active_streams == 1)
        sent = [
            request(delta, CLUSTER, client_node() if first_has_node else None, ["c1"]),
            request(delta, LISTENER, client_node(), []),
            request(delta, CLUSTER, None, ["c1", "c2"]),
        ]
        for message in sent:
            await client.send(message)
        own = NAME_TABLE if "--dns" in xdsfast.args else None

        def arrived() -> bool:
            kinds = [r.type_url for r in cp.requests]
            return kinds.count(CLUSTER) == 2 and LISTENER in kinds and (own is None or own in kinds)

        await cp.wait_for(arrived)
    finally:
        await client.close()
    return sent, [r for r in cp.requests if r.type_url != NAME_TABLE]


def with_dns_keys(node: base_pb2.Node, dns_address: str) -> base_pb2.Node:
    expected = base_pb2.Node()
    expected.CopyFrom(node)
    expected.metadata.update({"DNS_CAPTURE": "true", "DNS_PROXY_ADDR": dns_address})
    return expected


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("delta", MODES)
async def test_first_request_node_gets_dns_keys(
    control_plane: ControlPlane, xdsfast_run: XdsfastFactory, delta: bool, twin: dict[str, str]
) -> None:
    dns_address = f"127.0.0.1:{free_port()}"
    xdsfast = await xdsfast_run(
        "--discovery-address",
        control_plane.address,
        "--dns",
        "--dns-address",
        dns_address,
        env=twin,
    )
    sent, got = await relay_requests(control_plane, xdsfast, delta)
    assert len(got) == 3
    first = got[0].request
    assert first.node == with_dns_keys(client_node(), dns_address)
    assert first.node != client_node()
    first.ClearField("node")
    bare = type(sent[0])()
    bare.CopyFrom(sent[0])
    bare.ClearField("node")
    assert first == bare  # the rest of the first request as sent
    assert same(got[1], sent[1])  # a later request with a node: untouched
    assert same(got[2], sent[2])


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("delta", MODES)
async def test_first_request_without_node_stays_as_sent(
    control_plane: ControlPlane, xdsfast_run: XdsfastFactory, delta: bool, twin: dict[str, str]
) -> None:
    """Only a first request that carries a node is changed: a later one with a node is not."""
    xdsfast = await xdsfast_run(
        "--discovery-address",
        control_plane.address,
        "--dns",
        "--dns-address",
        f"127.0.0.1:{free_port()}",
        env=twin,
    )
    sent, got = await relay_requests(control_plane, xdsfast, delta, first_has_node=False)
    assert [same(r, s) for r, s in zip(got, sent, strict=True)] == [True, True, True]


OFF = [
    pytest.param(("--dns",), {"XDSFAST_NODE_DNS_CAPTURE": "false"}, id="option-off"),
    pytest.param(("--no-dns",), {}, id="dns-off"),
]


@pytest.mark.parametrize(("flags", "env"), OFF)
@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("delta", MODES)
async def test_untouched_when_off(
    control_plane: ControlPlane,
    xdsfast_run: XdsfastFactory,
    delta: bool,
    twin: dict[str, str],
    flags: tuple[str, ...],
    env: dict[str, str],
) -> None:
    xdsfast = await xdsfast_run(
        "--discovery-address",
        control_plane.address,
        *flags,
        "--dns-address",
        f"127.0.0.1:{free_port()}",
        env={**twin, **env},
    )
    sent, got = await relay_requests(control_plane, xdsfast, delta)
    assert [same(r, s) for r, s in zip(got, sent, strict=True)] == [True, True, True]


# -- against Istio's own generator -----------------------------------------------------

NAMESPACE = "smoke"  # tests/istio/smoke.yaml
SERVICE = "hello.smoke.svc.cluster.local"
AUTO_HOST = "api.smoke.test"  # a ServiceEntry without addresses


@pytest.fixture(scope="session")
def istio() -> Peers:
    return peers()


@pytest_asyncio.fixture
async def istiod(istio: Peers, short_tmp: Path) -> AsyncIterator[IstiodFake]:
    fake = await start_istiod_fake(istio, [YAML_DIR / "smoke.yaml"], short_tmp / "istiod")
    try:
        yield fake
    finally:
        await fake.stop()


def node_without_dns_capture(capture: str | None) -> base_pb2.Node:
    """An Istio sidecar's node as Envoy has it when pilot-agent's DNS is off: asks for
    auto-allocation, but does not say that DNS is captured (``DNS_CAPTURE`` absent, or
    "false" as pilot-agent writes it from ``ISTIO_META_DNS_CAPTURE=false``)."""
    node = istio_node(namespace=NAMESPACE)
    if capture is None:
        del node.metadata.fields["DNS_CAPTURE"]
    else:
        node.metadata.fields["DNS_CAPTURE"].string_value = capture
    return node


async def table_through(xdsfast: XdsfastProcess, capture: str | None) -> dict[str, Any]:
    """Subscribe as a sidecar (CDS, then LDS: the NameTable is asked for after it) and
    return xdsfast's NameTable once it is ready."""
    assert xdsfast.status_port is not None
    node = node_without_dns_capture(capture)
    client = AdsClient(f"unix:{xdsfast.socket_path}")
    await client.open()
    try:
        await client.send(discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=node))
        await client.send(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
        await wait_ready(xdsfast.status_port)
        status, _, body = await http_get("127.0.0.1", xdsfast.status_port, "/debug/ndsz")
        assert status == 200, body
        table: dict[str, Any] = json.loads(body)["table"]
        return table
    finally:
        await client.close()


def allocated(table: dict[str, Any]) -> list[str]:
    ips: list[str] = table.get(AUTO_HOST, {}).get("ips", [])
    return [ip for ip in ips if ip.startswith("240.240.")]


@pytest.mark.parametrize("capture", [None, "false"], ids=["absent", "false"])
@pytest.mark.timeout(120, func_only=True)
async def test_istiod_allocates_for_a_node_without_dns_capture(
    istiod: IstiodFake, xdsfast_run: XdsfastFactory, capture: str | None
) -> None:
    """istiod's own generator: the auto-allocated ServiceEntry address (240.240.0.0/16)
    reaches xdsfast's NameTable and DNS only because xdsfast told istiod DNS is captured
    (a "false" in the client's node is replaced: Go's protobuf keeps a map key's last entry)."""
    env = {"POD_NAMESPACE": NAMESPACE, "ISTIO_META_CLUSTER_ID": "Kubernetes"}
    dns_port = free_port()
    on = await xdsfast_run(
        "--discovery-address",
        istiod.xds_address,
        "--dns",
        "--dns-address",
        f"127.0.0.1:{dns_port}",
        env=env,
    )
    table = await table_through(on, capture)
    assert len(allocated(table)) == 1
    reply = await dns.asyncquery.udp(
        dns.message.make_query(AUTO_HOST, dns.rdatatype.A), "127.0.0.1", port=dns_port, timeout=5
    )
    assert [item.to_text() for rrset in reply.answer for item in rrset] == allocated(table)
    await on.stop()

    off = await xdsfast_run(
        "--discovery-address",
        istiod.xds_address,
        "--dns",
        "--dns-address",
        f"127.0.0.1:{free_port()}",
        env={**env, "XDSFAST_NODE_DNS_CAPTURE": "false"},
    )
    table = await table_through(off, capture)
    assert SERVICE in table  # the NameTable came all the same
    assert allocated(table) == []
