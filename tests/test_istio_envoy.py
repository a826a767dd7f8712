"""Differential tests with a real Envoy: Istio's own xDS generation (``istiod-fake``)
reaches the same Envoy bootstrap once through the stock ``pilot-agent`` and once through
``xdsfast run``, in SotW and in delta (Envoy's ADS ``api_type``; both agents follow it
upstream), and Envoy ends up with the same config, versions and no NACK either way.

The mesh is tests/istio/mesh.yaml with tests/istio/mesh-routing.yaml over it. The proxy
is an Istio sidecar in namespace ``shop`` with ``INTERCEPTION_MODE=NONE``: shop's Sidecar
binds one egress (HTTP proxy) and one ingress listener on 127.0.0.1, on ports picked per
test, so nothing binds 0.0.0.0 (and one Envoy runs at a time). The mesh is plaintext
(auto mTLS off, PeerAuthentication DISABLE): the test Envoy has no SDS server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import XdsfastFactory, XdsfastProcess
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from istio_peers import (
    YAML_DIR,
    IstiodFake,
    IstioEnvoy,
    Peers,
    PilotAgent,
    istio_node,
    peers,
    start_istiod_fake,
    start_pilot_agent,
)
from support import MODES, free_port, needs_envoy

from xdsfast.peers.backend import http_get
from xdsfast.peers.envoy import listener_port

# The peers' build is fixture set-up (minutes when cold): the timeout covers the test only.
pytestmark = [pytest.mark.envoy, needs_envoy, pytest.mark.timeout(150, func_only=True)]

NAMESPACE = "shop"  # the proxy's: its Sidecar (mesh-routing.yaml) binds on 127.0.0.1
CART = "cart.shop.svc.cluster.local"
# The clusters istiod builds for the proxy (besides the inbound one): shop's Sidecar
# imports shop, payments and ext (ext/private is exported to ext only), not data.
CLUSTERS = {
    "BlackHoleCluster",
    "PassthroughCluster",
    "InboundPassthroughCluster",
    "outbound|80||frontend.shop.svc.cluster.local",
    f"outbound|8080||{CART}",
    f"outbound|8080|v1|{CART}",
    f"outbound|8080|v2|{CART}",
    "outbound|9090||pay.payments.svc.cluster.local",
    "outbound|80||ledger.payments.svc.cluster.local",
    "outbound|443||api.partner.example",
    "outbound|5432||db.legacy.example",
    "outbound|80||*.wild.example",
    "outbound|80||a.multi.example",
    "outbound|80||b.multi.example",
    "outbound|443||one.auto.example",
    "outbound|443||two.auto.example",
    "outbound|80||vm.payments.svc.cluster.local",
    "outbound|80||v6.only.example",
    "outbound|80||big.example",
}
NEW_CLUSTER = "outbound|8080||checkout.shop.svc.cluster.local"
MULTI_CLUSTERS = {"outbound|80||a.multi.example", "outbound|80||b.multi.example"}
# A push version of istiod: its start time, then a counter.
VERSION = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/\d+$")
NONCE = re.compile(r"^(.+)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
DEADLINE = 20.0
_POLL = 0.05

# The change applied through istiod-fake's control port: a new Service (with its slice),
# a changed VirtualService; the ServiceEntry ext/multi is deleted beside it.
NEW_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: shop}
spec:
  type: ClusterIP
  clusterIP: 10.96.1.99
  selector: {app: checkout}
  ports: [{name: http, port: 8080, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: checkout-abc
  namespace: shop
  labels: {kubernetes.io/service-name: checkout}
addressType: IPv4
endpoints:
- addresses: [10.1.1.99]
  conditions: {ready: true}
ports: [{name: http, port: 8080, protocol: TCP}]
"""


def _document(file: str, kind: str, name: str) -> str:
    """One document of a YAML file in tests/istio, by kind and name."""
    for doc in (YAML_DIR / file).read_text().split("\n---\n"):
        if re.search(rf"^kind: {kind}$", doc, re.M) and re.search(rf"^  name: {name}$", doc, re.M):
            return doc
    raise LookupError(f"{file} has no {kind} {name}")


CHANGED_ROUTE_TIMEOUT = "7s"


def changed_virtual_service() -> str:
    """cart's VirtualService with another timeout and weights."""
    doc = _document("mesh-routing.yaml", "VirtualService", "cart")
    changed = doc.replace("timeout: 3s", f"timeout: {CHANGED_ROUTE_TIMEOUT}")
    changed = changed.replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50")
    assert changed.count("weight: 50") == 2 and CHANGED_ROUTE_TIMEOUT in changed
    return changed


# -- the mesh and the agents ----------------------------------------------------------


@dataclass
class Mesh:
    """mesh-routing.yaml with this test's listener ports, and istiod-fake's arguments."""

    files: list[Path]
    args: list[str]
    egress_port: int
    ingress_port: int

    @property
    def egress_listener(self) -> str:
        return f"127.0.0.1_{self.egress_port}"

    @property
    def ingress_listener(self) -> str:
        return f"127.0.0.1_{self.ingress_port}"


@pytest.fixture(scope="session")
def istio() -> Peers:
    return peers()


@pytest.fixture
def mesh(short_tmp: Path) -> Mesh:
    egress, ingress = listener_port(), listener_port()
    while ingress == egress:
        ingress = listener_port()
    text = (YAML_DIR / "mesh-routing.yaml").read_text()
    assert text.count("number: 15001") == 1 and text.count("number: 15006") == 1
    text = text.replace("number: 15001", f"number: {egress}")
    text = text.replace("number: 15006", f"number: {ingress}")
    routing = short_tmp / "mesh-routing.yaml"
    routing.write_text(text)
    mesh_config = short_tmp / "meshconfig.yaml"
    mesh_config.write_text("enableAutoMtls: false\n")  # no SDS for the test Envoy
    return Mesh([YAML_DIR / "mesh.yaml", routing], ["-mesh", str(mesh_config)], egress, ingress)


@pytest_asyncio.fixture
async def istiod(istio: Peers, mesh: Mesh, short_tmp: Path) -> AsyncIterator[list[IstiodFake]]:
    """istiod-fake with the mesh, in a list: a test that restarts it puts the new one last."""
    fakes = [await start_istiod_fake(istio, mesh.files, short_tmp / "istiod", args=mesh.args)]
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


async def restart(istio: Peers, mesh: Mesh, fakes: list[IstiodFake], workdir: Path) -> IstiodFake:
    """Stop the current istiod-fake and start a new one on the same xDS port, same YAML."""
    old = fakes[-1]
    assert await old.stop() == 0
    new = await start_istiod_fake(istio, mesh.files, workdir, xds_port=old.xds_port, args=mesh.args)
    fakes.append(new)
    return new


def sidecar_node() -> base_pb2.Node:
    """The proxy's node as Istio's injector and bootstrap set it, for a pod without
    traffic capture (sidecar.istio.io/interceptionMode: NONE)."""
    return istio_node(ip="127.0.0.1", namespace=NAMESPACE, extra={"INTERCEPTION_MODE": "NONE"})


@dataclass
class Agent:
    """Either agent, as the tests use it: its socket, how to stop it, its debug pages."""

    name: str
    xds_address: str
    stop: Callable[[], Awaitable[int]]
    status_port: int
    dns_port: int


async def pilot_agent(istio: Peers, fake: IstiodFake, workdir: Path) -> Agent:
    agent: PilotAgent = await start_pilot_agent(
        istio, fake.xds_address, workdir, namespace=NAMESPACE, instance_ip="127.0.0.1"
    )
    return Agent("pilot-agent", agent.xds_address, agent.stop, agent.status_port, agent.dns_port)


async def xdsfast_agent(run: XdsfastFactory, fake: IstiodFake) -> Agent:
    dns_port = free_port()
    proc: XdsfastProcess = await run(
        "--discovery-address",
        fake.xds_address,
        "--dns",
        "--dns-address",
        f"127.0.0.1:{dns_port}",
        env={
            "POD_NAMESPACE": NAMESPACE,
            "POD_NAME": "client",
            "INSTANCE_IP": "127.0.0.1",
            "ISTIO_META_CLUSTER_ID": "Kubernetes",
        },
    )
    assert proc.status_port is not None
    return Agent("xdsfast", f"unix:{proc.socket_path}", proc.stop, proc.status_port, dns_port)


# -- Envoy's config, normalised ---------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Envoy's dynamic config: per type, the last version Envoy accepted, and each resource
    with its own ``version_info`` (SotW only). Left out: ``last_updated`` timestamps, the
    static ``xds-grpc``/``sds-grpc`` clusters (their pipe is the agent's own socket) and
    the bootstrap (the same file but for that pipe)."""

    versions: dict[str, str]
    resources: dict[str, dict[str, Any]]
    unsettled: frozenset[str]  # clusters or listeners warming, draining or failed

    def names(self, kind: str) -> set[str]:
        return set(self.resources[kind])

    def without_versions(self) -> dict[str, dict[str, Any]]:
        """The resources alone (for comparing config across two istiod instances)."""
        return {
            kind: {name: entry["resource"] for name, entry in items.items()}
            for kind, items in self.resources.items()
        }


def _section(dump: dict[str, Any], kind: str) -> dict[str, Any]:
    for config in dump["configs"]:
        if config["@type"].endswith("." + kind):
            section: dict[str, Any] = config
            return section
    return {}


_IP_DOMAIN = re.compile(r"^(\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\])(:\d+)?$")


def _drop_vip_domains(route_config: dict[str, Any]) -> dict[str, Any]:
    """The route config without its VIP domains (``192.0.2.30``, ``192.0.2.30:80``).

    istiod's own nondeterminism, not an agent's: a ServiceEntry with several hosts or
    several addresses becomes one service per host and address, duplicates are dropped,
    and which VIP lands on which host's virtual host varies from one generation to the
    next. Seen through pilot-agent alone, across fresh istiods with the same YAML (a
    ServiceEntry with two hosts, one address: either host got it), and between two
    generations of one istiod (``big.example`` got another of its 40 addresses; the
    route had 16 or 18 VIP domains). Host names are all kept."""
    hosts = [
        {**host, "domains": [d for d in host.get("domains", []) if not _IP_DOMAIN.match(d)]}
        for host in route_config.get("virtual_hosts", [])
    ]
    return {**route_config, "virtual_hosts": hosts}


def normalise(dump: dict[str, Any], versions: dict[str, str]) -> Config:
    clusters = _section(dump, "ClustersConfigDump")
    listeners = _section(dump, "ListenersConfigDump")
    routes = _section(dump, "RoutesConfigDump")
    endpoints = _section(dump, "EndpointsConfigDump")
    warming = {item["cluster"]["name"] for item in clusters.get("dynamic_warming_clusters", [])}
    resources: dict[str, dict[str, Any]] = {
        "clusters": {
            item["cluster"]["name"]: {
                "version": item.get("version_info"),
                "resource": item["cluster"],
            }
            for item in clusters.get("dynamic_active_clusters", [])
        },
        "listeners": {},
        "routes": {
            item["route_config"]["name"]: {
                "version": item.get("version_info"),
                "resource": _drop_vip_domains(item["route_config"]),
            }
            for item in routes.get("dynamic_route_configs", [])
        },
        "endpoints": {
            item["endpoint_config"]["cluster_name"]: {
                "version": item.get("version_info"),
                "resource": item["endpoint_config"],
            }
            for item in endpoints.get("dynamic_endpoint_configs", [])
        },
    }
    for item in listeners.get("dynamic_listeners", []):
        if set(item) != {"name", "active_state"}:  # warming, draining, failed or unnamed
            # (an entry without its name was seen once, in CI's twins run: Envoy's dump
            # mid-update; unsettled, so the poll goes on)
            warming.add(item.get("name", "<unnamed>"))
        state = item.get("active_state")
        if state is None or "name" not in item:
            continue
        resources["listeners"][item["name"]] = {
            "version": state.get("version_info"),
            "resource": state["listener"],
        }
    return Config(versions, resources, frozenset(warming))


_VERSION_TEXT = re.compile(r'^(.+)\.version_text: "(.*)"$', re.M)


async def accepted_versions(envoy: IstioEnvoy) -> dict[str, str]:
    """The version Envoy last accepted per type (its ``*.version_text`` stats), named as
    istiod's /debug/syncz names types. Not the config dump's ``version_info``: Envoy
    leaves that alone when a push changes none of the type's resources."""
    status, body = await envoy.admin_get("/stats?filter=version_text")
    assert status == 200, body[:200]
    found: dict[str, set[str]] = {}
    for name, value in _VERSION_TEXT.findall(body.decode()):
        if not value:
            continue  # a subscription that never had an update (static or non-EDS cluster)
        if name == "cluster_manager.cds":
            kind = "cluster"
        elif name == "listener_manager.lds":
            kind = "listener"
        elif ".rds." in name:
            kind = "route"
        elif name.startswith("cluster."):
            kind = "endpoint"
        else:
            continue
        found.setdefault(kind, set()).add(value)
    return {kind: "|".join(sorted(values)) for kind, values in found.items()}


async def envoy_config(envoy: IstioEnvoy) -> Config:
    """Envoy's config and versions, read between two equal readings of the versions (a
    push landing between the two reads would pair one version with another's config)."""
    versions = await accepted_versions(envoy)
    deadline = time.monotonic() + DEADLINE
    while True:
        status, body = await envoy.admin_get("/config_dump?include_eds", timeout=10.0)
        assert status == 200, body[:200]
        after = await accepted_versions(envoy)
        if after == versions:
            return normalise(json.loads(body), versions)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Envoy's versions never settled in {DEADLINE}s: {after}")
        versions = after


async def config_until(envoy: IstioEnvoy, predicate: Callable[[Config], bool], what: str) -> Config:
    """Poll Envoy's config until ``predicate`` holds (with a deadline)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        config = await envoy_config(envoy)
        if predicate(config):
            return config
        if time.monotonic() > deadline:
            names = {kind: sorted(config.names(kind)) for kind in config.resources}
            raise TimeoutError(f"Envoy never had {what} in {DEADLINE}s: {config.versions} {names}")
        await _sleep()


def differences(left: Any, right: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, as paths (for readable assertion messages)."""
    if isinstance(left, dict) and isinstance(right, dict):
        out = []
        for key in sorted(set(left) | set(right)):
            if key not in left or key not in right:
                out.append(
                    f"{path}/{key}: {left.get(key, '<missing>')!r:.200} != "
                    f"{right.get(key, '<missing>')!r:.200}"
                )
            else:
                out += differences(left[key], right[key], f"{path}/{key}")
        return out
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return [
            d
            for i, (a, b) in enumerate(zip(left, right, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    if isinstance(left, list) and isinstance(right, list):
        only = [x for x in left if x not in right], [x for x in right if x not in left]
        return [f"{path}: only left {only[0]!r:.300}, only right {only[1]!r:.300}"]
    return [] if left == right else [f"{path}: {left!r:.200} != {right!r:.200}"]


def assert_same(left: Config, right: Config, *, resource_versions: bool = True) -> None:
    """Same accepted versions and resources. ``resource_versions=False`` leaves out each
    resource's own ``version_info``: in SotW Envoy keeps there the version that last
    *changed* the resource, so an Envoy that lived through a push and one that connected
    after it differ there, whatever the agent."""
    diff = differences(left.versions, right.versions, "versions")
    if resource_versions:
        diff += differences(left.resources, right.resources)
    else:
        diff += differences(left.without_versions(), right.without_versions())
    assert not diff, "\n".join(diff[:30])


async def _sleep() -> None:
    await asyncio.sleep(_POLL)


def complete(mesh: Mesh, clusters: set[str]) -> Callable[[Config], bool]:
    """The whole config for ``clusters``: every cluster with its endpoints, both listeners,
    the egress route."""

    def check(config: Config) -> bool:
        outbound = {name for name in config.names("clusters") if not name.startswith("inbound|")}
        return (
            not config.unsettled
            and outbound == clusters
            and config.names("listeners") == {mesh.egress_listener, mesh.ingress_listener}
            and config.names("routes") == {str(mesh.egress_port)}
            and config.names("clusters") <= config.names("endpoints")
        )

    return check


async def start_envoy(agent: Agent, delta: bool, workdir: Path) -> IstioEnvoy:
    envoy = IstioEnvoy(agent.xds_address, delta=delta, workdir=workdir, node=sidecar_node())
    await envoy.start()
    try:
        await envoy.wait_ready(DEADLINE)
    except BaseException:
        await envoy.stop()
        raise
    return envoy


async def acked(fake: IstiodFake) -> dict[str, str]:
    """The versions istiod saw ACKed by its one proxy (``/debug/syncz``), per type. istiod
    records nonces there (the version, then a UUID): the version part is returned."""
    status, body = await fake.debug("/debug/syncz")
    assert status == 200, body[:200]
    (proxy,) = json.loads(body)
    out = {}
    for kind in ("cluster", "listener", "route", "endpoint"):
        sent, ack = proxy[f"{kind}_sent"], proxy[f"{kind}_acked"]
        assert sent == ack, (kind, sent, ack)
        nonce = NONCE.match(ack)
        assert nonce is not None, (kind, ack)
        out[kind] = nonce.group(1)
    return out


async def acked_until(fake: IstiodFake, config: Config) -> None:
    """Wait until istiod saw ACKed, per type, the version Envoy's config shows (Envoy
    ACKs after applying), and every type it sent ACKed."""
    deadline = time.monotonic() + DEADLINE
    seen: dict[str, str] | str = {}
    while time.monotonic() < deadline:
        seen = await _acked_or_why(fake)
        if isinstance(seen, dict) and _matches(seen, config):
            return
        await _sleep()
    raise TimeoutError(f"istiod never saw {config.versions} ACKed: {seen}")


async def _acked_or_why(fake: IstiodFake) -> dict[str, str] | str:
    try:
        return await acked(fake)
    except (AssertionError, KeyError, ValueError) as exc:  # mid-push, or not connected yet
        return repr(exc)


def _matches(seen: dict[str, str], config: Config) -> bool:
    return all(seen.get(kind) == version for kind, version in config.versions.items())


async def back_on(fake: IstiodFake, envoy: IstioEnvoy, expected: Config) -> Config:
    """Wait until Envoy has ``expected``'s resources from ``fake`` (a restarted istiod):
    istiod saw it ACK the versions Envoy shows. Not "a new version": istiod's versions
    are its start time in seconds and a counter, so a restart within the same second
    sends the very same version strings."""
    deadline = time.monotonic() + DEADLINE
    while True:
        config = await envoy_config(envoy)
        seen = await _acked_or_why(fake)
        if (
            isinstance(seen, dict)
            and _matches(seen, config)
            and not differences(config.without_versions(), expected.without_versions())
        ):
            return config
        if time.monotonic() > deadline:
            diff = differences(config.without_versions(), expected.without_versions())
            raise TimeoutError(
                f"Envoy not back on the config in {DEADLINE}s: Envoy {config.versions}, "
                f"istiod {seen}; {diff[:10]}"
            )
        await _sleep()


async def node_metadata(fake: IstiodFake) -> dict[str, Any]:
    """The node metadata istiod holds for its one proxy (``/debug/adsz``)."""
    status, body = await fake.debug("/debug/adsz")
    assert status == 200, body[:200]
    (client,) = json.loads(body)["clients"]
    metadata: dict[str, Any] = client["metadata"]
    return metadata


async def rejected(envoy: IstioEnvoy) -> dict[str, int]:
    return await envoy.rejected()


TYPE_URLS = {
    "cluster": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "listener": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "route": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "endpoint": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
}


async def check_xdsfast_debug(status_port: int, config: Config, delta: bool) -> None:
    """xdsfast's /debug/xds saw Envoy ACK, per type, the version Envoy shows."""
    status, _, body = await http_get("127.0.0.1", status_port, "/debug/xds")
    assert status == 200, body[:200]
    (stream,) = json.loads(body)["streams"]
    assert stream["mode"] == ("delta" if delta else "sotw")
    for kind, version in config.versions.items():
        seen = stream["types"][TYPE_URLS[kind]]
        assert (seen["ack"], seen["version"]) == ("ACK", version), (kind, seen)


# -- the tests --------------------------------------------------------------------------


@pytest.mark.parametrize("delta", MODES)
async def test_envoy_config_same_through_both_agents(
    delta: bool,
    istio: Peers,
    istiod: list[IstiodFake],
    mesh: Mesh,
    short_tmp: Path,
    xdsfast_run: XdsfastFactory,
) -> None:
    """The same bootstrap gets the same listeners, routes, clusters and endpoints (and
    versions: the same istiod, no push in between) through pilot-agent and xdsfast."""
    fake = istiod[-1]
    configs: dict[str, Config] = {}
    nodes: dict[str, dict[str, Any]] = {}
    dns_ports: dict[str, int] = {}
    for name in ("pilot-agent", "xdsfast"):
        if name == "pilot-agent":
            agent = await pilot_agent(istio, fake, short_tmp / "agent")
        else:
            agent = await xdsfast_agent(xdsfast_run, fake)
        envoy = await start_envoy(agent, delta, short_tmp / f"envoy-{name}")
        try:
            config = await config_until(envoy, complete(mesh, CLUSTERS), "the mesh's config")
            assert all(VERSION.match(v) for v in config.versions.values()), config.versions
            assert set(config.versions) == {"cluster", "listener", "route", "endpoint"}
            await acked_until(fake, config)
            assert await rejected(envoy) == {}
            configs[name] = await envoy_config(envoy)
            nodes[name], dns_ports[name] = await node_metadata(fake), agent.dns_port
        finally:
            await envoy.stop()
            assert await agent.stop() == 0
    assert_same(configs["xdsfast"], configs["pilot-agent"])
    # The one difference upstream: pilot-agent forwards Envoy's node as it is; xdsfast
    # (DNS on, XDSFAST_NODE_DNS_CAPTURE's default) sets DNS_CAPTURE and DNS_PROXY_ADDR,
    # its own DNS address, as Istio's bootstrap does when pilot-agent serves the DNS.
    # istiod reads DNS_PROXY_ADDR only with outboundTrafficPolicy ALLOW_ANY_DYNAMIC_DNS
    # (the DNS cache of its dynamic forward proxy), which this mesh does not use: hence
    # the same config.
    envoy_node = json_format.MessageToDict(sidecar_node())["metadata"]
    assert nodes["pilot-agent"] == envoy_node
    dns_proxy = {"DNS_PROXY_ADDR": f"127.0.0.1:{dns_ports['xdsfast']}"}
    assert nodes["xdsfast"] == {**envoy_node, **dns_proxy}


def has_change(mesh: Mesh) -> Callable[[Config], bool]:
    """The change is in: checkout's cluster, no ext/multi, the new route timeout."""
    full = complete(mesh, (CLUSTERS - MULTI_CLUSTERS) | {NEW_CLUSTER})

    def check(config: Config) -> bool:
        return full(config) and route_timeout(config, mesh) == CHANGED_ROUTE_TIMEOUT

    return check


def route_timeout(config: Config, mesh: Mesh) -> str | None:
    """The timeout of the egress route's default route to cart."""
    route = config.resources["routes"].get(str(mesh.egress_port))
    if route is None:
        return None
    for host in route["resource"].get("virtual_hosts", []):
        if f"{CART}:8080" in host.get("domains", []):
            timeout: str | None = host["routes"][-1]["route"].get("timeout")
            return timeout
    return None


async def apply_change(fake: IstiodFake) -> None:
    assert await fake.apply(NEW_SERVICE) == [
        "Service shop/checkout created",
        "EndpointSlice shop/checkout-abc created",
    ]
    assert await fake.apply(changed_virtual_service()) == ["VirtualService shop/cart updated"]
    assert await fake.delete_object("networking.istio.io/v1", "ServiceEntry", "multi", "ext") == [
        "ServiceEntry ext/multi deleted"
    ]


async def revert_change(fake: IstiodFake) -> None:
    assert await fake.delete(NEW_SERVICE) == [
        "Service shop/checkout deleted",
        "EndpointSlice shop/checkout-abc deleted",
    ]
    assert await fake.apply(_document("mesh-routing.yaml", "VirtualService", "cart")) == [
        "VirtualService shop/cart updated"
    ]
    assert await fake.apply(_document("mesh.yaml", "ServiceEntry", "multi")) == [
        "ServiceEntry ext/multi created"
    ]


@pytest.mark.parametrize("delta", MODES)
async def test_config_change_and_istiod_restart_through_both_agents(
    delta: bool,
    istio: Peers,
    istiod: list[IstiodFake],
    mesh: Mesh,
    short_tmp: Path,
    xdsfast_run: XdsfastFactory,
) -> None:
    """A change applied through istiod-fake's control port reaches Envoy through either
    agent, Envoy ACKs the very version istiod pushed (istiod's /debug/syncz says so), a
    fresh Envoy behind the other agent gets the same config at the same versions, and an
    istiod-fake restart on the same port is survived with Envoy back on the same config.

    pilot-agent delivers the change (a new Service, a changed VirtualService, a deleted
    ServiceEntry), xdsfast its reversal (the Service deleted, the VirtualService and
    ServiceEntry restored), then each survives a restart."""
    initial = complete(mesh, CLUSTERS)
    changed = has_change(mesh)

    # pilot-agent: the initial config, then the change.
    agent = await pilot_agent(istio, istiod[-1], short_tmp / "agent")
    envoy = await start_envoy(agent, delta, short_tmp / "envoy-a")
    try:
        before = await config_until(envoy, initial, "the mesh's config")
        await apply_change(istiod[-1])
        after_a = await config_until(envoy, changed, "the change")
        assert after_a.versions["cluster"] != before.versions["cluster"]
        await acked_until(istiod[-1], after_a)
        assert await rejected(envoy) == {}
        after_a = await envoy_config(envoy)
    finally:
        await envoy.stop()
        assert await agent.stop() == 0

    # xdsfast: the same config at the same versions, then the reversal.
    agent = await xdsfast_agent(xdsfast_run, istiod[-1])
    envoy = await start_envoy(agent, delta, short_tmp / "envoy-b")
    try:
        after_b = await config_until(envoy, changed, "the change")
        await acked_until(istiod[-1], after_b)
        assert_same(after_b, after_a, resource_versions=False)
        await revert_change(istiod[-1])
        reverted = await config_until(envoy, initial, "the reverted config")
        await acked_until(istiod[-1], reverted)
        assert not differences(reverted.without_versions(), before.without_versions())
        assert reverted.versions["cluster"] not in (
            before.versions["cluster"],
            after_b.versions["cluster"],
        )
        await check_xdsfast_debug(agent.status_port, reverted, delta)

        # istiod-fake restarts (same port, same YAML): Envoy comes back to the same config.
        await restart(istio, mesh, istiod, short_tmp / "istiod2")
        restarted_b = await back_on(istiod[-1], envoy, before)
        assert await rejected(envoy) == {}
        restarted_b = await envoy_config(envoy)
    finally:
        await envoy.stop()
        assert await agent.stop() == 0

    # pilot-agent again: the restarted istiod's config at its versions; then a restart.
    agent = await pilot_agent(istio, istiod[-1], short_tmp / "agent2")
    envoy = await start_envoy(agent, delta, short_tmp / "envoy-c")
    try:
        again = await config_until(envoy, initial, "the mesh's config")
        assert_same(again, restarted_b, resource_versions=False)
        await restart(istio, mesh, istiod, short_tmp / "istiod3")
        await back_on(istiod[-1], envoy, before)
        assert await rejected(envoy) == {}
    finally:
        await envoy.stop()
        assert await agent.stop() == 0
