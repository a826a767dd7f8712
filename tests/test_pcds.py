"""ProxyConfig (PCDS): istiod's CA certificates become a trust bundle; never forwarded."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2

from xdsfast import xds_pb2
from xdsfast.agent import Agent
from xdsfast.config import Config
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER, LISTENER, PROXY_CONFIG

MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
ROOT_A = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
ROOT_B = "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----"


def proxy_config(*pems: str) -> any_pb2.Any:
    value = xds_pb2.ProxyConfig(ca_certificates_pem=pems).SerializeToString()
    return any_pb2.Any(type_url=PROXY_CONFIG, value=value)


@pytest.mark.parametrize("delta", MODES)
async def test_proxy_config_is_requested_applied_acked_and_not_forwarded(
    control_plane: ControlPlane, short_tmp: Path, delta: bool
) -> None:
    control_plane.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080))
    bundle = short_tmp / "trust-bundle.pem"
    agent = Agent(
        Config(
            discovery_address=control_plane.address,
            xds_socket=str(short_tmp / "XDS"),
            status_address="127.0.0.1:0",
            pcds_enabled=True,
            trust_bundle=str(bundle),
        )
    )
    await agent.start()
    client = AdsClient(f"unix:{short_tmp}/XDS", delta=delta)
    try:
        await client.open()
        await client.request(LISTENER)
        await client.recv()
        await control_plane.wait_for_request(
            lambda r: r.type_url == PROXY_CONFIG and r.kind == "request"
        )
        (nonce,) = control_plane.push_raw(PROXY_CONFIG, [proxy_config(ROOT_A, ROOT_B)])
        ack = await control_plane.wait_for_request(lambda r: r.nonce == nonce)
        assert ack.is_ack
        assert bundle.read_text() == ROOT_A + ROOT_B + "\n"

        (bad,) = control_plane.push_raw(
            PROXY_CONFIG, [any_pb2.Any(type_url=PROXY_CONFIG, value=b"\x92\x02\x05ab")]
        )
        nack = await control_plane.wait_for_request(lambda r: r.nonce == bad)
        assert nack.is_nack and "ProxyConfig" in nack.error
        assert bundle.read_text() == ROOT_A + ROOT_B + "\n"  # the old bundle stays

        control_plane.push_raw(CLUSTER, [mesh.eds_cluster("c")])
        assert (await client.recv()).type_url == CLUSTER  # the ProxyConfigs never reached it
    finally:
        await client.close()
        await agent.stop()
