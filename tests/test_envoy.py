"""A real Envoy fed through ``xdsfast run`` (a real process) by the istiod stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import XdsfastFactory
from support import MODES, envoy_scenario, free_port, needs_envoy

from xdsfast.peers import mesh
from xdsfast.peers.backend import Backend
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.envoy import EnvoyProcess
from xdsfast.typeurls import NAME_TABLE

pytestmark = [pytest.mark.envoy, needs_envoy]


@pytest.mark.parametrize("delta", MODES)
async def test_envoy_through_xdsfast(
    delta: bool,
    control_plane: ControlPlane,
    backend: Backend,
    short_tmp: Path,
    xdsfast_run: XdsfastFactory,
) -> None:
    cp = control_plane
    port = free_port()
    cp.set_mesh(mesh.sample_mesh(listener_port=port, backend_port=backend.port))
    relay = await xdsfast_run(
        "--discovery-address",
        cp.address,
        "--dns",
        "--dns-address",
        "127.0.0.1:0",
        env={"ISTIO_META_CLUSTER_ID": "Kubernetes", "XDS_HEADER_X_MESH": "demo"},
    )
    envoy = EnvoyProcess(f"unix:{relay.socket_path}", delta=delta, workdir=short_tmp)
    await envoy.start()
    try:
        await envoy_scenario(cp, envoy, backend, port, delta=delta, relayed=True)
        # xdsfast consumed the NameTable on every stream (after LDS) and ACKed it itself.
        nds_acks = {r.stream_id for r in cp.requests if r.type_url == NAME_TABLE and r.is_ack}
        assert len(nds_acks) == 2
        assert all(md["clusterid"] == "Kubernetes" for md in cp.stream_metadata)
        assert all(md["x_mesh"] == "demo" for md in cp.stream_metadata)
        # Envoy never saw a NameTable: it has no such resource in its config.
        dump = await envoy.config_dump()
        assert "NameTable" not in str(dump)
    finally:
        await envoy.stop()
    assert await relay.stop() == 0
    log = relay.stderr.decode()
    assert "istiod ended the stream" in log or "cannot reach istiod" in log
    assert not relay.socket_path.exists()
