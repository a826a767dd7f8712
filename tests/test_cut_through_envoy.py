"""Cut-through with a real Envoy: big CDS pushes (40 and 200 MB) go through an in-process
agent to Envoy, which ACKs them; a NameTable and an ECDS response queued between big pushes
are still consumed or rewritten; istiod killed in the middle of a 200 MB push, Envoy
resyncs once it is back.

On the fast engine a push of ``protocol.THROUGH_MIN`` or more is written to Envoy as it
arrives, and ``streamed_responses`` counts each one completed: these tests assert that
count exactly, so a push held whole (or a consumed type relayed as it arrives) fails
them. grpcio holds every message whole: the count stays 0.

The big pushes are wire bytes built once (``mesh.big_cds_response``) and sent as they
are (``ControlPlane.push_bytes``, with our own nonces): the test process holds each push
once, besides the control plane's gRPC buffers and the agent's (in-process too). Each
cluster is STATIC without endpoints and carries its share of the push as metadata, so
Envoy parses every byte but builds only a few hundred clusters. Peak RSS measured: the
test process 0.48 GB (fast engine) or 0.9 GB (grpcio), Envoy 1.5 GB; 2-6 s a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import AgentFactory
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as http_wasm_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from support import MODES, free_port, needs_envoy
from test_wasm import ecds_listener, extension
from wasm_modules import MODULE_SHA, ModuleServer

from xdsfast.agent import Agent
from xdsfast.engines.fast import protocol
from xdsfast.engines.fast.protocol import THROUGH_MIN
from xdsfast.peers import mesh
from xdsfast.peers.backend import http_get
from xdsfast.peers.controlplane import ControlPlane, Recorded
from xdsfast.peers.envoy import EnvoyProcess
from xdsfast.typeurls import CLUSTER, EXTENSION_CONFIG, LISTENER, NAME_TABLE

pytestmark = [pytest.mark.envoy, needs_envoy]

MB = 1 << 20
ECDS = EXTENSION_CONFIG
FILTER = "wasm-ext"  # the listener's HTTP filter that comes over ECDS
ACTIVE = "cluster_manager.active_clusters"  # Envoy's gauge; its static xds-grpc counts too
BIG_DEADLINE = 120.0  # a 200 MB push takes 1-2 s here (either twin): room for a loaded box


# ----- the rig: control plane -> in-process agent -> real Envoy ----------------------------


@dataclass
class Sidecar:
    cp: ControlPlane
    agent: Agent
    envoy: EnvoyProcess
    delta: bool
    port: int  # the ECDS listener's

    def streamed(self) -> int:
        """Responses the agent relayed to Envoy as they arrived, completed."""
        return self.agent.metrics.streamed_responses.get()

    def received(self) -> int:
        """Responses the agent took from istiod (a cut-through one once its head is in)."""
        return self.agent.metrics.xds_proxy_responses.value

    def push_big(self, size: int, tag: str, *, clusters: int, first: int = 0) -> str:
        """A CDS push of about ``size`` bytes (``clusters`` clusters numbered from ``first``),
        version and nonce ``tag``; returns the nonce. Only the control plane keeps it."""
        data = mesh.big_cds_response(
            size, clusters=clusters, first=first, delta=self.delta, version=tag, nonce=tag
        )
        assert len(data) >= THROUGH_MIN
        assert self.cp.push_bytes(data, type_url=CLUSTER, version=tag, nonce=tag) == 1
        return tag

    async def answer(self, nonce: str, timeout: float = BIG_DEADLINE) -> Recorded:
        """Envoy's answer to the response with ``nonce``, which must be an ACK."""
        found = await self.cp.wait_for_request(lambda r: r.nonce == nonce, timeout)
        assert found.is_ack, (found.summary(), self.envoy.log_tail())
        if not self.delta:
            assert found.request.version_info == nonce  # (our pushes: version == nonce)
        return found

    async def clusters_text(self) -> str:
        status, body = await self.envoy.admin_get("/clusters", timeout=30.0)
        assert status == 200
        return body.decode(errors="replace")


SidecarFactory = Callable[..., Awaitable[Sidecar]]


def acks(type_url: str, version: str) -> Callable[[Recorded], bool]:
    """Predicate: an ACK of ``version`` of ``type_url`` (from Envoy, or the agent's own)."""
    return lambda r: r.type_url == type_url and r.is_ack and r.response_version == version


def equals(value: int) -> Callable[[int], bool]:
    return lambda v: v == value


@pytest_asyncio.fixture
async def sidecar(
    make_agent: AgentFactory, control_plane: ControlPlane, short_tmp: Path
) -> AsyncIterator[SidecarFactory]:
    """An agent (DNS on, Wasm conversion on) between the control plane and a real Envoy,
    which is LIVE and has ACKed the control plane's first snapshot: no clusters, one
    listener whose first HTTP filter comes over ECDS (an allow-all RBAC to start), and a
    small NameTable (the agent's)."""
    envoys: list[EnvoyProcess] = []

    async def make(delta: bool) -> Sidecar:
        cp = control_plane
        agent = await make_agent(
            discovery_address=cp.address,
            grpc_bootstrap=None,
            wasm_cache_dir=str(short_tmp / "wasm"),
            wasm_http_max_retries=1,
        )
        port = free_port()
        allow = extension_pb2.TypedExtensionConfig(name=FILTER)
        allow.typed_config.Pack(http_rbac_pb2.RBAC())
        versions = cp.set_mesh(
            {
                CLUSTER: {},
                LISTENER: {"ecds": ecds_listener(port, FILTER)},
                ECDS: {FILTER: allow},
            }
        )
        versions[NAME_TABLE] = cp.set_name_table(mesh.sample_name_table())
        envoy = EnvoyProcess(
            f"unix:{agent.config.xds_socket}", delta=delta, workdir=short_tmp / "envoy"
        )
        envoys.append(envoy)
        await envoy.start()
        await envoy.wait_ready(30)
        for type_url, version in versions.items():
            await cp.wait_for_request(acks(type_url, version), 30)
        await agent.dns_table.wait_updates(1)
        return Sidecar(cp, agent, envoy, delta, port)

    yield make
    for envoy in envoys:
        await envoy.stop()


# ----- a: big pushes reach Envoy and are ACKed ----------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delta", MODES)
async def test_40mb_and_200mb_cds_pushes_are_acked(
    delta: bool, engine: str, sidecar: SidecarFactory
) -> None:
    side = await sidecar(delta)
    streamed = side.streamed()
    updates = (await side.envoy.stats())["cluster_manager.cds.update_success"]
    pushes = ((40 * MB, 100, 0), (200 * MB, 400, 100))
    for n, (size, clusters, first) in enumerate(pushes, 1):
        nonce = side.push_big(size, f"big-{size // MB}mb", clusters=clusters, first=first)
        await side.answer(nonce)
        # Cut-through on the fast engine (counted before Envoy could have ACKed: the count
        # follows the last byte's write at once); grpcio stores and forwards.
        assert side.streamed() == streamed + (n if engine == "fast" else 0)
        # Envoy built them: SotW replaces the set, delta adds to it (the names are new).
        active = clusters + 1 if not delta else first + clusters + 1
        await side.envoy.wait_stat(ACTIVE, equals(active), 30)
        await side.envoy.wait_stat("cluster_manager.cds.update_success", equals(updates + n))
        text = await side.clusters_text()
        for i in (first, first + clusters - 1):
            assert f"{mesh.big_cluster_name(i)}::added_via_api::true" in text
    assert not any(r.is_nack for r in side.cp.requests), side.cp.describe()


# ----- b: a NameTable and an ECDS response between big pushes -------------------------------


def big_wasm_extension(url: str, size: int) -> extension_pb2.TypedExtensionConfig:
    """A Wasm HTTP filter whose module comes from ``url``, with ``size`` bytes of plugin
    configuration: a response of it is big enough to be offered for cut-through."""
    config = extension(FILTER, url=url, sha256=MODULE_SHA)
    wasm = http_wasm_pb2.Wasm()
    assert config.typed_config.Unpack(wasm)
    wasm.config.configuration.Pack(wrappers_pb2.StringValue(value="c" * size))
    config.typed_config.Pack(wasm)
    return config


async def http_status_becomes(port: int, want: int, timeout: float = 20.0) -> None:
    """Poll the ECDS listener until it answers ``want``."""
    deadline = time.monotonic() + timeout
    status = 0
    while status != want:
        assert time.monotonic() < deadline, f"listener never answered {want}; last {status}"
        with contextlib.suppress(OSError, TimeoutError):
            status, _, _ = await http_get("127.0.0.1", port, "/", timeout=2.0)
        if status != want:
            await asyncio.sleep(0.05)


async def side_with_traffic(sidecar: SidecarFactory, delta: bool) -> Sidecar:
    """The rig, its ECDS listener answering (the allow-all RBAC lets requests through)."""
    side = await sidecar(delta)
    await http_status_becomes(side.port, 200)
    return side


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delta", MODES)
async def test_name_table_and_ecds_between_big_pushes(
    delta: bool,
    engine: str,
    sidecar: SidecarFactory,
    modules: ModuleServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """All four are queued at once, in this order: 40 MB CDS, a NameTable and a Wasm ECDS
    response (over the cut-through size, lowered to 1 MiB here, both: so the judge is asked
    and must say no), 200 MB CDS.  The agent consumes the NameTable (and ACKs it itself),
    rewrites the ECDS response (the module cannot be fetched: deny-all RBAC), and relays
    the rest; Envoy ACKs each."""
    monkeypatch.setattr(protocol, "THROUGH_MIN", MB)
    side = await side_with_traffic(sidecar, delta)
    cp, agent = side.cp, side.agent
    streamed = side.streamed()
    updates = agent.dns_table.updates
    consumed = agent.metrics.consumed_responses.get("applied")
    table = mesh.big_name_table(16_000)
    wasm = big_wasm_extension(modules.url("/fail"), 2 * MB)
    assert table.ByteSize() >= MB and wasm.ByteSize() >= MB

    first = side.push_big(40 * MB, "before", clusters=100)
    nds = cp.set_name_table(table)
    ecds = cp.set_resources(ECDS, {FILTER: wasm})
    last = side.push_big(200 * MB, "after", clusters=400, first=100)
    del table, wasm

    await side.answer(first)
    nds_ack = await cp.wait_for_request(
        lambda r: r.type_url == NAME_TABLE and r.response_version == nds, 60
    )
    assert nds_ack.is_ack, nds_ack.summary()
    ecds_ack = await cp.wait_for_request(
        lambda r: r.type_url == ECDS and r.response_version == ecds, 60
    )
    assert ecds_ack.is_ack, (ecds_ack.summary(), side.envoy.log_tail())
    await side.answer(last)
    # Each answered once (Envoy answers the pushes, the agent the NameTable).
    sent = {(s.type_url, s.version): s.nonce for s in cp.responses}
    nonces = [first, sent[NAME_TABLE, nds], sent[ECDS, ecds], last]
    assert [sum(r.nonce == n for r in cp.requests) for n in nonces] == [1] * 4, cp.describe()
    # Only the two CDS pushes went through as they arrived.
    assert side.streamed() == streamed + (2 if engine == "fast" else 0)

    # The NameTable: consumed (not sent on to Envoy), its answers built.
    assert agent.metrics.consumed_responses.get("applied") == consumed + 1
    await agent.dns_table.wait_updates(updates + 1, 30)
    assert agent.dns_table.answers_version == nds
    hosts = agent.dns_table.hosts()
    assert len(hosts) == 16_000
    assert hosts["svc-15999.ns-49.svc.cluster.local"] == ["10.1.63.250"]
    # The ECDS response: rewritten to the deny-all fallback, which Envoy applies.
    assert (
        agent.metrics.sample(
            "istio_agent_wasm_config_conversion_count", {"result": "fetch_failure"}
        )
        == 1
    )
    status, body = await side.envoy.admin_get("/config_dump?resource=ecds_filters")
    assert status == 200 and b"wasm-default-deny" in body
    await http_status_becomes(side.port, 403)
    assert not any(r.is_nack for r in cp.requests), cp.describe()


# ----- c: istiod killed in the middle of a big push ----------------------------------------


def static_cluster(name: str) -> cluster_pb2.Cluster:
    """A cluster Envoy makes active at once (no EDS to wait for)."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=mesh.endpoints(1, cluster=name),
    )


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for ``condition``, checked after every turn of the event loop (the agent and
    the control plane run on it): the moment it holds is not missed by a polling period."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delta", MODES)
async def test_istiod_killed_mid_push_envoy_resyncs(
    delta: bool, engine: str, sidecar: SidecarFactory
) -> None:
    side = await sidecar(delta)
    cp = side.cp
    old_streams = set(cp.stream_ids)
    received, streamed = side.received(), side.streamed()
    big = side.push_big(200 * MB, "doomed", clusters=400)
    # "In the middle": the agent has taken the response (fast: its head, judged; grpcio: all
    # of it, not yet written to Envoy) and has not finished relaying it. Why it cannot
    # finish before the kill below: the agent and the control plane share this event loop,
    # `until` looks after every turn of it, and stop() cancels the call within a turn or
    # two, while the agent reads a socket's worth (256 KiB) per turn and istiod may be at
    # most the stream window (4 MiB) ahead of what went on to Envoy: the other 190+ MB
    # need hundreds of turns. The assertions after the kill check it all the same.
    await until(lambda: side.received() > received, BIG_DEADLINE, "the push arriving")
    assert side.received() == received + 1
    assert side.streamed() == streamed, "the 200 MB push completed before the kill"
    await cp.stop()  # killed: the push is cut off; the agent ends Envoy's stream
    assert side.streamed() == streamed
    after = cp.set_resources(CLUSTER, {"after-restart": static_cluster("after-restart")})
    since = len(cp.requests)
    await cp.restart()
    # Envoy reconnects through the agent, is served the snapshot again and ACKs it.
    ack = await cp.wait_for_request(acks(CLUSTER, after), 60, since=since)
    assert ack.stream_id not in old_streams
    await cp.wait_for_request(
        lambda r: r.stream_id == ack.stream_id and r.type_url == LISTENER and r.is_ack,
        30,
        since=since,
    )
    # The cut-off push was never counted as relayed nor answered to the control plane, and
    # Envoy's clusters are the new snapshot's alone (grpcio held the push whole and may
    # have finished writing it to Envoy's old stream: the resync replaces it).
    assert not any(r.nonce == big for r in cp.requests), cp.describe()
    assert side.streamed() == streamed
    await side.envoy.wait_stat(ACTIVE, equals(2), 30)  # xds-grpc and after-restart
    # Cut-through works again on the new stream.
    again = side.push_big(40 * MB, "again", clusters=100, first=400)
    await side.answer(again)
    assert side.streamed() == streamed + (1 if engine == "fast" else 0)
    await side.envoy.wait_stat(ACTIVE, equals(102 if delta else 101), 30)
