"""Smoke test with Istio's own binaries: istiod's real xDS generation (``istiod-fake``)
reaches an Envoy-like ADS client through the stock ``pilot-agent`` and through
``xdsfast run``, and both agents hold the same NameTable and answer DNS from it. Then a
push of istiod's own making over the cut-through threshold (``THROUGH_MIN``, 8 MiB)
through ``xdsfast run`` on each engine.

The peers are built by scripts/build-istio-peers (see tests/istio_peers.py): without Go
these tests ERROR, naming the README section; ``XDSFAST_SKIP_ISTIO=1`` skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import pytest_asyncio
from conftest import XdsfastFactory, XdsfastProcess
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from istio_peers import (
    YAML_DIR,
    IstiodFake,
    Peers,
    istio_node,
    peers,
    start_istiod_fake,
    start_pilot_agent,
    wait_ready,
)
from support import free_port

from xdsfast.engines.fast import protocol
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.backend import http_get
from xdsfast.typeurls import CLUSTER, LISTENER

# The peers' build is fixture set-up (minutes when cold): the timeout covers the test only.
pytestmark = pytest.mark.timeout(120, func_only=True)

NAMESPACE = "smoke"
SERVICE = "hello.smoke.svc.cluster.local"
SERVICE_IP = "10.96.0.10"
SERVICE_CLUSTER = f"outbound|80||{SERVICE}"
AUTO_HOST = "api.smoke.test"  # a ServiceEntry without addresses
# A ServiceEntry that makes istiod's CDS response about 11 MB (about 570 bytes a cluster,
# one cluster a host and port): over THROUGH_MIN, so the fast engine cuts it through.
BIG_HOSTS, BIG_PORTS = 2500, range(8000, 8008)
DEADLINE = 20.0


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


async def fetch(
    client: AdsClient, type_url: str, node: base_pb2.Node
) -> discovery_pb2.DiscoveryResponse:
    """Subscribe to every resource of ``type_url`` (SotW, as Envoy does), ACK the answer."""
    await client.send(discovery_pb2.DiscoveryRequest(type_url=type_url, node=node))
    while True:
        resp = await client.recv(timeout=20.0)
        await client.ack(resp)
        if resp.type_url == type_url:
            assert isinstance(resp, discovery_pb2.DiscoveryResponse)
            return resp


@contextlib.asynccontextmanager
async def sidecar(address: str) -> AsyncIterator[tuple[set[str], set[str]]]:
    """An Istio sidecar's stream on ``address`` (an agent's socket): the cluster and listener
    names it got. The stream stays open inside the block, as Envoy's does: the agent's own
    NameTable request rides on it (an agent drops its upstream when Envoy's stream ends)."""
    node = istio_node(namespace=NAMESPACE)
    client = AdsClient(address)
    await client.open()
    try:
        cds = await fetch(client, CLUSTER, node)
        lds = await fetch(client, LISTENER, node)
        yield names(cds, cluster_pb2.Cluster), names(lds, listener_pb2.Listener)
    finally:
        await client.close()


def names(resp: discovery_pb2.DiscoveryResponse, message: type[Any]) -> set[str]:
    found = set()
    for packed in resp.resources:
        resource = message()
        assert packed.Unpack(resource), packed.type_url
        found.add(resource.name)
    return found


async def name_table(status_port: int) -> dict[str, Any]:
    status, _, body = await http_get("127.0.0.1", status_port, "/debug/ndsz")
    assert status == 200, body
    table: dict[str, Any] = json.loads(body)["table"]
    return table


async def a_record(dns_port: int, name: str) -> list[str]:
    reply = await dns.asyncquery.udp(
        dns.message.make_query(name, dns.rdatatype.A), "127.0.0.1", port=dns_port, timeout=5.0
    )
    assert reply.rcode() == dns.rcode.NOERROR
    return sorted(item.to_text() for rrset in reply.answer for item in rrset)


async def start_xdsfast(run: XdsfastFactory, fake: IstiodFake) -> tuple[XdsfastProcess, int]:
    """``xdsfast run`` for a sidecar in NAMESPACE, upstream ``fake``, its DNS proxy on a
    free port (returned with it)."""
    dns_port = free_port()
    proc = await run(
        "--discovery-address",
        fake.xds_address,
        "--dns",
        "--dns-address",
        f"127.0.0.1:{dns_port}",
        env={"POD_NAMESPACE": NAMESPACE, "ISTIO_META_CLUSTER_ID": "Kubernetes"},
    )
    return proc, dns_port


def check_config(clusters: set[str], listeners: set[str]) -> None:
    # Istio's generator, not a stand-in: its fixed clusters, and the Service's own.
    assert {"BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster"} <= clusters
    assert SERVICE_CLUSTER in clusters
    assert f"outbound|443||{AUTO_HOST}" in clusters
    assert {"virtualOutbound", "virtualInbound"} <= listeners


def check_table(table: dict[str, Any]) -> None:
    assert table[SERVICE]["ips"] == [SERVICE_IP]
    assert table[SERVICE]["shortname"] == "hello"
    assert table[SERVICE]["namespace"] == NAMESPACE
    # Auto-allocated in the proxy's table, as the node asks (DNS_AUTO_ALLOCATE).
    assert [ip.startswith("240.240.") for ip in table[AUTO_HOST]["ips"]] == [True]


async def test_pilot_agent_and_xdsfast_relay_istiods_own_config(
    istio: Peers, istiod: IstiodFake, short_tmp: Path, xdsfast_run: XdsfastFactory
) -> None:
    """The same CDS/LDS names, NameTable and DNS answers through both agents."""
    agent = await start_pilot_agent(
        istio, istiod.xds_address, short_tmp / "agent", namespace=NAMESPACE
    )
    try:
        async with sidecar(agent.xds_address) as agent_config:
            await agent.wait_ready()  # the NameTable came (asked for after the first LDS)
            agent_table = await name_table(agent.status_port)
            agent_answer = await a_record(agent.dns_port, SERVICE)
    finally:
        assert await agent.stop() == 0

    xdsfast, dns_port = await start_xdsfast(xdsfast_run, istiod)
    assert xdsfast.status_port is not None
    async with sidecar(f"unix:{xdsfast.socket_path}") as xdsfast_config:
        await wait_ready(xdsfast.status_port)
        xdsfast_table = await name_table(xdsfast.status_port)
        xdsfast_answer = await a_record(dns_port, SERVICE)

    check_config(*agent_config)
    check_table(agent_table)
    assert agent_answer == [SERVICE_IP]
    assert xdsfast_config == agent_config
    # Not the same: pilot-agent's /debug/ndsz (at the pinned Istio) also lists the extra
    # names its DNS proxy answers (BuildAlternateHosts), each with a trailing dot and
    # registry "Kubernetes"; xdsfast shows the NameTable as received.
    received = {host: info for host, info in agent_table.items() if not host.endswith(".")}
    assert xdsfast_table == received
    assert set(agent_table) - set(received) == {
        "hello.",
        "hello.smoke.",
        "hello.smoke.svc.",
        f"{SERVICE}.",
        f"{AUTO_HOST}.",
    }
    assert xdsfast_answer == agent_answer


async def clusters_until(
    client: AdsClient, predicate: Callable[[set[str]], bool]
) -> tuple[str, set[str]]:
    """ACK CDS pushes until one's cluster names satisfy ``predicate``: (version, names)."""
    while True:
        resp = await client.recv(timeout=20.0)
        await client.ack(resp)
        assert isinstance(resp, discovery_pb2.DiscoveryResponse)
        if resp.type_url == CLUSTER:
            found = names(resp, cluster_pb2.Cluster)
            if predicate(found):
                return resp.version_info, found


async def test_istiod_fake_control_interface(istiod: IstiodFake) -> None:
    """Config applied, deleted or pushed through the control port reaches a connected
    proxy as istiod would send it; bad input is refused with the reason."""
    extra = "outbound|81||two.smoke.svc.cluster.local"
    service = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: two, namespace: smoke}\n"
        "spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 81}]}\n"
    )
    client = AdsClient(istiod.xds_address)  # straight to istiod-fake, over TCP
    await client.open()
    try:
        await client.send(
            discovery_pb2.DiscoveryRequest(type_url=CLUSTER, node=istio_node(namespace=NAMESPACE))
        )
        await clusters_until(client, lambda found: SERVICE_CLUSTER in found)
        assert (await istiod.health())["clients"] == 1

        assert await istiod.apply(service) == ["Service smoke/two created"]
        await clusters_until(client, lambda found: extra in found)
        assert await istiod.apply(service) == ["Service smoke/two updated"]

        assert await istiod.delete_object("v1", "Service", "two", "smoke") == [
            "Service smoke/two deleted"
        ]
        before, _ = await clusters_until(client, lambda found: extra not in found)
        await istiod.push()
        after, found = await clusters_until(client, lambda found: True)
        assert after != before and SERVICE_CLUSTER in found

        with pytest.raises(RuntimeError, match="at least one host"):
            await istiod.apply(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
                "metadata: {name: bad, namespace: smoke}\nspec: {hosts: []}\n"
            )
        with pytest.raises(RuntimeError, match=r"needs metadata\.namespace"):
            await istiod.apply(service.replace(", namespace: smoke", ""))
    finally:
        await client.close()
    assert await istiod.stop() == 0


def big_service_entry() -> str:
    """One ServiceEntry in the proxy's namespace: BIG_HOSTS hosts x 8 ports, no
    addresses (istiod allocates each host a VIP for the proxy's NameTable)."""
    lines = ["apiVersion: networking.istio.io/v1", "kind: ServiceEntry"]
    lines += [f"metadata: {{name: big, namespace: {NAMESPACE}}}", "spec:", "  hosts:"]
    lines += [f"  - {big_host(i)}" for i in range(BIG_HOSTS)]
    lines.append("  ports:")  # (several hosts: each port's protocol must be HTTP or TLS)
    lines += [f"  - {{number: {port}, name: http-{port}, protocol: HTTP}}" for port in BIG_PORTS]
    lines += ["  resolution: DNS", "  location: MESH_EXTERNAL"]
    return "\n".join(lines) + "\n"


def big_host(i: int) -> str:
    return f"h{i}.big.test"


async def debug_clusters(status_port: int) -> dict[str, Any]:
    """xdsfast's ``/debug/xds`` for CDS on its one stream."""
    status, _, body = await http_get("127.0.0.1", status_port, "/debug/xds")
    assert status == 200, body[:200]
    (stream,) = json.loads(body)["streams"]
    clusters: dict[str, Any] = stream["types"][CLUSTER]
    return clusters


async def streamed_responses(status_port: int) -> float:
    """xdsfast's ``xdsfast_xds_streamed_responses_total``."""
    status, _, body = await http_get("127.0.0.1", status_port, "/stats/prometheus")
    assert status == 200, body[:200]
    for line in body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == "xdsfast_xds_streamed_responses_total":
            return float(value)
    raise AssertionError("no xdsfast_xds_streamed_responses_total in /stats/prometheus")


async def test_a_push_over_the_cut_through_threshold_from_istiod(
    istio: Peers, short_tmp: Path, xdsfast_run: XdsfastFactory, engine: str
) -> None:
    """istiod's 11 MB CDS response reaches the client whole, with every cluster, and is
    ACKed through xdsfast; /debug/xds names its version and nonce (the streaming peeker's,
    on the fast engine); the fast engine counts it cut through, grpcio holds it whole; the
    NameTable istiod sends next is still consumed (DNS answers a big entry's host)."""
    big = short_tmp / "big.yaml"
    big.write_text(big_service_entry())
    fake = await start_istiod_fake(istio, [YAML_DIR / "smoke.yaml", big], short_tmp / "big")
    try:
        xdsfast, dns_port = await start_xdsfast(xdsfast_run, fake)
        assert xdsfast.status_port is not None
        node = istio_node(namespace=NAMESPACE)
        client = AdsClient(f"unix:{xdsfast.socket_path}")
        await client.open()
        try:
            cds = await fetch(client, CLUSTER, node)
            await fetch(client, LISTENER, node)  # (xdsfast asks for the NameTable after it)
            await wait_ready(xdsfast.status_port)
            table = await name_table(xdsfast.status_port)
            answer = await a_record(dns_port, big_host(BIG_HOSTS - 1))
            deadline = time.monotonic() + DEADLINE
            while (seen := await debug_clusters(xdsfast.status_port))["ack_nonce"] != cds.nonce:
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.05)
            streamed = await streamed_responses(xdsfast.status_port)
        finally:
            await client.close()
    finally:
        assert await fake.stop() == 0

    assert cds.ByteSize() > protocol.THROUGH_MIN
    found = names(cds, cluster_pb2.Cluster)
    expected = {f"outbound|{port}||{big_host(i)}" for i in range(BIG_HOSTS) for port in BIG_PORTS}
    assert expected <= found and SERVICE_CLUSTER in found
    assert (seen["version"], seen["nonce"], seen["ack"]) == (cds.version_info, cds.nonce, "ACK")
    assert streamed == (1 if engine == "fast" else 0)
    assert table[big_host(BIG_HOSTS - 1)]["ips"] == answer
    assert answer[0].startswith("240.240.")
