"""TLS, mTLS and bearer tokens to istiod, with a PKI made by the test."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import AgentFactory, XdsfastFactory

from xdsfast.agent import Agent
from xdsfast.config import Config, TlsFiles
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.pki import Authority
from xdsfast.typeurls import CLUSTER

ISTIOD = "istiod.istio-system.svc"
TOKEN = "eyJhbGciOi.secret-token-value.sig"


@dataclass
class Mesh:
    """A CA, istiod's certificate and key, and a client certificate, written to ``dir``."""

    dir: Path
    ca: Authority
    root: Path
    client_key: Path
    client_cert: Path
    token: Path

    def server_credentials(self, *, expired: bool = False, san: str = ISTIOD) -> Any:
        server = self.ca.issue("istiod", dns=(san,), ips=("127.0.0.1",), expired=expired)
        return grpc.ssl_server_credentials(
            [(server.key, server.cert)], root_certificates=self.ca.pem, require_client_auth=True
        )

    def tls(self, **changes: Any) -> TlsFiles:
        values: dict[str, Any] = {
            "root_ca": str(self.root),
            "server_name": ISTIOD,
            "client_key": str(self.client_key),
            "client_cert": str(self.client_cert),
        }
        values.update(changes)
        return TlsFiles(**values)


@pytest.fixture
def mesh(short_tmp: Path) -> Mesh:
    ca = Authority("cluster.local root")
    root = short_tmp / "root-cert.pem"
    root.write_bytes(ca.pem)
    client_key, client_cert = ca.issue("sidecar", client=True).write(short_tmp, "client")
    token = short_tmp / "istio-token"
    token.write_text(TOKEN + "\n")
    return Mesh(short_tmp, ca, root, client_key, client_cert, token)


CpFactory = Callable[..., Awaitable[ControlPlane]]


@pytest_asyncio.fixture
async def tls_control_plane(mesh: Mesh) -> AsyncIterator[CpFactory]:
    planes: list[ControlPlane] = []

    async def start(**credentials: Any) -> ControlPlane:
        cp = ControlPlane(
            "127.0.0.1:0", credentials=mesh.server_credentials(**credentials), token=TOKEN
        )
        await cp.start()
        planes.append(cp)
        return cp

    yield start
    for cp in planes:
        await cp.stop()


@pytest.fixture
def agents(make_agent: AgentFactory) -> AgentFactory:
    """In-process agents over TLS (``tls=`` given per test), DNS off."""

    async def start(**settings: Any) -> Agent:
        return await make_agent(**{"dns_enabled": False, "plaintext": False, **settings})

    return start


async def one_stream(agent: Agent) -> grpc.StatusCode | None:
    """Open an Envoy-like stream through the agent; None if it works, else how it ended."""
    client = AdsClient(f"unix:{agent.config.xds_socket}")
    await client.open()
    try:
        await client.request(CLUSTER)
        try:
            await client.recv(timeout=10)
        except Exception:
            status = await client.wait_closed()
            return status.code
        return None
    finally:
        await client.close()


async def test_mtls_and_token_reach_istiod(
    mesh: Mesh, tls_control_plane: CpFactory, agents: AgentFactory
) -> None:
    cp = await tls_control_plane()
    cp.set_resources(CLUSTER, {})
    agent = await agents(discovery_address=cp.address, tls=mesh.tls(), token_path=str(mesh.token))
    assert await one_stream(agent) is None
    assert cp.stream_metadata[-1]["authorization"] == f"Bearer {TOKEN}"
    # The token is read at every new stream: a rotated one is used by the next.
    mesh.token.write_text("rotated")
    cp.token = "rotated"
    assert await one_stream(agent) is None
    assert cp.stream_metadata[-1]["authorization"] == "Bearer rotated"


FAILURES = {
    "wrong CA": ({"root_ca": "other"}, {}, "CERTIFICATE_VERIFY_FAILED"),
    "wrong SAN": ({"server_name": "istiod.elsewhere.svc"}, {}, "hostname verification"),
    "expired server certificate": ({}, {"expired": True}, "CERTIFICATE_VERIFY_FAILED"),
    "no client certificate": ({"client_key": None, "client_cert": None}, {}, "socket closed"),
}


@pytest.mark.parametrize(("tls", "server", "why"), FAILURES.values(), ids=FAILURES.keys())
async def test_tls_failures_end_envoys_stream_are_counted_and_explained(
    mesh: Mesh,
    tls_control_plane: CpFactory,
    agents: AgentFactory,
    caplog: pytest.LogCaptureFixture,
    tls: dict[str, Any],
    server: dict[str, Any],
    why: str,
) -> None:
    tls = dict(tls)  # the parameters are shared by every engine's run
    if tls.get("root_ca") == "other":
        other = mesh.dir / "other-root.pem"
        other.write_bytes(Authority("someone else").pem)
        tls["root_ca"] = str(other)
    cp = await tls_control_plane(**server)
    cp.set_resources(CLUSTER, {})
    agent = await agents(
        discovery_address=cp.address, tls=mesh.tls(**tls), token_path=str(mesh.token)
    )
    with caplog.at_level(logging.INFO, logger="xdsfast"):
        assert await one_stream(agent) == grpc.StatusCode.UNAVAILABLE
    assert agent.metrics.istiod_connection_failures.get() == 1
    assert cp.active_streams == 0 and not cp.requests
    lines = [r.getMessage() for r in caplog.records if "cannot reach istiod" in r.getMessage()]
    assert len(lines) == 1
    assert why.lower() in lines[0].lower()
    assert TOKEN not in caplog.text


async def test_a_replaced_root_ca_applies_to_the_next_connection(
    mesh: Mesh, tls_control_plane: CpFactory, agents: AgentFactory
) -> None:
    cp = await tls_control_plane()
    cp.set_resources(CLUSTER, {})
    good = mesh.root.read_bytes()
    mesh.root.write_bytes(Authority("stale root").pem)
    agent = await agents(discovery_address=cp.address, tls=mesh.tls(), token_path=str(mesh.token))
    assert await one_stream(agent) == grpc.StatusCode.UNAVAILABLE
    mesh.root.write_bytes(good)  # rotated in place, no restart
    assert await one_stream(agent) is None


async def test_a_missing_token_sends_no_header(
    mesh: Mesh, tls_control_plane: CpFactory, agents: AgentFactory
) -> None:
    cp = await tls_control_plane()
    agent = await agents(
        discovery_address=cp.address, tls=mesh.tls(), token_path=str(mesh.dir / "no-token")
    )
    assert await one_stream(agent) == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" not in cp.stream_metadata[-1]


async def test_run_over_mtls_from_istio_environment(
    mesh: Mesh, tls_control_plane: CpFactory, xdsfast_run: XdsfastFactory, short_tmp: Path
) -> None:
    """PROV_CERT (key.pem, cert-chain.pem, root-cert.pem) and ISTIOD_SAN, as in a pod."""
    prov = short_tmp / "prov"
    prov.mkdir()
    (prov / "root-cert.pem").write_bytes(mesh.root.read_bytes())
    (prov / "key.pem").write_bytes(mesh.client_key.read_bytes())
    (prov / "cert-chain.pem").write_bytes(mesh.client_cert.read_bytes())
    cp = await tls_control_plane()
    cp.set_resources(CLUSTER, {})
    relay = await xdsfast_run(
        "--discovery-address",
        cp.address,
        "--token-path",
        str(mesh.token),
        "--log-level",
        "debug",
        env={"PROV_CERT": str(prov), "ISTIOD_SAN": ISTIOD},
        plaintext=False,
    )
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    await client.request(CLUSTER)
    assert (await client.recv()).type_url == CLUSTER
    await client.close()
    assert await relay.stop() == 0
    assert TOKEN.encode() not in relay.stderr


STARTUP = {
    "XDS_ROOT_CA missing": ({"XDS_ROOT_CA": "/nonexistent/root.pem"}, "XDS_ROOT_CA"),
    "default root CA missing": ({}, "root-cert.pem does not exist"),
    "PROV_CERT without root": ({"PROV_CERT": "/nonexistent"}, "PROV_CERT"),
    "mounted certs without root": ({"FILE_MOUNTED_CERTS": "true"}, "ISTIO_META_TLS_CLIENT"),
    "no cert provider": ({"PILOT_CERT_PROVIDER": "none"}, "PILOT_CERT_PROVIDER"),
}


@pytest.mark.parametrize(("env", "says"), STARTUP.values(), ids=STARTUP.keys())
def test_missing_tls_files_are_a_startup_error(
    env: dict[str, str], says: str, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xdsfast", "run", "--xds-socket", str(tmp_path / "XDS")],
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("xdsfast: error:") and says in line


def test_system_roots_need_no_file(tmp_path: Path) -> None:
    config = Config.build(
        {"discovery_address": "istiod.example.com:15012"}, {"XDS_ROOT_CA": "SYSTEM"}
    )
    assert config.tls == TlsFiles("SYSTEM", "istiod.example.com")
    local = Config.build({"discovery_address": "localhost:15012"}, {"XDS_ROOT_CA": "SYSTEM"})
    assert local.tls is not None and local.tls.server_name == ISTIOD
    san = Config.build({}, {"XDS_ROOT_CA": "SYSTEM", "ISTIOD_SAN": "istiod.custom"})
    assert san.tls is not None and san.tls.server_name == "istiod.custom"


def _encrypted(key: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key, None)
    return loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )


BROKEN_PEM = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
# What is put at the client certificate chain or key path, and the exact reason given.
CLIENT_MATERIAL = {
    "empty chain": ("cert", b"", "the client certificate chain {cert} is empty"),
    "garbage chain": (
        "cert",
        b"garbage\n",
        "the client certificate chain {cert} holds no PEM certificate",
    ),
    "broken chain": (
        "cert",
        BROKEN_PEM,
        "the client certificate chain {cert} holds a PEM certificate that cannot be parsed",
    ),
    "chain is a directory": ("cert", None, "the client certificate chain {cert} is a directory"),
    "empty key": ("key", b"\n", "the client key {key} is empty"),
    "garbage key": ("key", b"garbage\n", "the client key {key} holds no PEM private key"),
    "broken key": (
        "key",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "the client key {key} cannot be parsed",
    ),
    "missing key": ("key", "gone", "the client key {key} does not exist"),
    "key of another certificate": (
        "key",
        "other",
        "the client key {key} does not match the client certificate chain {cert}",
    ),
    "encrypted key": (
        "key",
        "encrypted",
        "the client key {key} is encrypted (a passphrase is not supported)",
    ),
}


@pytest.mark.parametrize(
    ("which", "content", "says"), CLIENT_MATERIAL.values(), ids=CLIENT_MATERIAL.keys()
)
async def test_unusable_client_material_is_not_sent_and_said_in_one_exact_line(
    mesh: Mesh,
    tls_control_plane: CpFactory,
    agents: AgentFactory,
    caplog: pytest.LogCaptureFixture,
    which: str,
    content: bytes | str | None,
    says: str,
) -> None:
    """As Istio's agent, an unusable client certificate or key is not sent: one warning
    says exactly what is wrong, and the dial goes on without one (this istiod requires
    one, so the handshake fails: counted, Envoy's stream ends UNAVAILABLE); no traceback
    is logged (both engines; grpcio's used to abort the process on an empty chain)."""
    path = mesh.client_cert if which == "cert" else mesh.client_key
    path.unlink()
    if content is None:
        path.mkdir()
    elif content == "other":
        path.write_bytes(mesh.ca.issue("someone", client=True).key)
    elif content == "encrypted":
        path.write_bytes(_encrypted(mesh.ca.issue("sidecar", client=True).key))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    cp = await tls_control_plane()
    agent = await agents(discovery_address=cp.address, tls=mesh.tls(), token_path=str(mesh.token))
    client = AdsClient(f"unix:{agent.config.xds_socket}")
    with caplog.at_level(logging.INFO, logger="xdsfast"):
        await client.open()
        try:  # nothing written: the end is istiod's dial failing, not a write racing it
            status = await client.wait_closed(timeout=20)
        finally:
            await client.close()
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert agent.metrics.istiod_connection_failures.get() == 1
    assert cp.active_streams == 0 and not cp.requests
    lines = [r.getMessage() for r in caplog.records if "client certificate" in r.getMessage()]
    reason = says.format(cert=mesh.client_cert, key=mesh.client_key)
    assert lines == [f"no client certificate for istiod: {reason}"]
    assert len([r for r in caplog.records if "cannot reach istiod" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_a_root_ca_that_is_not_a_file_is_a_startup_error_saying_what_it_is(
    kind: str, tmp_path: Path
) -> None:
    """XDS_ROOT_CA at a directory or a FIFO: exit 2 with one line saying which (never
    "does not exist"), and a FIFO is not opened (start-up does not block on it)."""
    root = tmp_path / "root"
    if kind == "directory":
        root.mkdir()
    else:
        os.mkfifo(root)
    out = subprocess.run(
        [sys.executable, "-m", "xdsfast", "run", "--xds-socket", str(tmp_path / "XDS")],
        env={"PATH": "/usr/bin:/bin", "XDS_ROOT_CA": str(root)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    says = "is a directory" if kind == "directory" else "is not a regular file"
    assert line == f"xdsfast: error: XDS_ROOT_CA: {root} {says}"
