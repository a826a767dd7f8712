"""Points of SECURITY.md that are checked here: no open DNS resolver, no TLS off by accident,
no token or payload in the logs, the socket's permissions."""

from __future__ import annotations

import asyncio
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import XdsfastFactory

from xdsfast import typeurls, xds_pb2
from xdsfast.config import Config
from xdsfast.dns import server as dns_server
from xdsfast.dns.handler import Handler
from xdsfast.dns.metrics import DnsMetrics
from xdsfast.dns.table import DnsTable
from xdsfast.metrics import Metrics
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import CLUSTER, LISTENER, NAME_TABLE

# ----- DNS: not an open resolver --------------------------------------------------------


class _Upstream:
    def __init__(self) -> None:
        self.asked: list[bytes] = []

    async def forward(self, query: bytes, tcp: bool) -> bytes | None:
        self.asked.append(query)
        reply = bytearray(query)
        reply[2] |= 0x80
        return bytes(reply)


class _Udp:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _Tcp:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def _query(name: str = "example.org") -> bytes:
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + question + b"\x00\x01\x00\x01"


async def _server(forward_remote: bool) -> tuple[dns_server.DnsServer, _Upstream]:
    table = DnsTable()
    table.update(mesh.sample_name_table(), "1")
    await table.wait_updates(1)
    upstream = _Upstream()
    server = dns_server.DnsServer(
        Handler(table, DnsMetrics(Metrics())),
        upstream,  # type: ignore[arg-type]
        forward_remote=forward_remote,
    )
    return server, upstream


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("peer", "forward_remote", "forwarded"),
    [
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("10.1.2.3", False, False),
        ("2001:db8::1", False, False),
        ("10.1.2.3", True, True),
    ],
)
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_dns_forwards_only_for_loopback_clients_unless_configured(
    peer: str, forward_remote: bool, forwarded: bool, tcp: bool
) -> None:
    server, upstream = await _server(forward_remote)
    query = _query()
    if tcp:
        transport = _Tcp((peer, 5353))
        conn = dns_server._Tcp(server)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(struct.pack("!H", len(query)) + query)
        await _settle()
        replies = [bytes(transport.out[2:])]
        conn.connection_lost(None)
    else:
        udp = _Udp()
        proto = dns_server._Udp(server)
        proto.connection_made(udp)  # type: ignore[arg-type]
        proto.datagram_received(query, (peer, 5353))
        await _settle()
        replies = udp.sent
    assert len(replies) == 1
    rcode = replies[0][3] & 0x0F
    assert bool(upstream.asked) is forwarded
    assert rcode == (0 if forwarded else dns_server.REFUSED)


async def test_dns_answers_its_table_to_anyone() -> None:
    """The refusal is about recursion only: the table's own names are answered remotely."""
    server, upstream = await _server(False)
    udp = _Udp()
    proto = dns_server._Udp(server)
    proto.connection_made(udp)  # type: ignore[arg-type]
    proto.datagram_received(_query("backend.default.svc.cluster.local"), ("10.1.2.3", 5353))
    await _settle()
    assert not upstream.asked
    assert len(udp.sent) == 1 and udp.sent[0][3] & 0x0F == 0 and udp.sent[0][7] >= 1


def test_dns_defaults_to_loopback_and_no_remote_forwarding() -> None:
    config = Config.build({"dns": True, "plaintext": True}, {})
    assert config.dns_address.startswith("localhost:")
    assert config.dns_forward_remote is False
    remote = Config.build({"plaintext": True}, {"XDSFAST_DNS_FORWARD_REMOTE": "true"})
    assert remote.dns_forward_remote


# ----- TLS to istiod: only an explicit plaintext turns it off ---------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"PROXY_CONFIG": "controlPlaneAuthPolicy: MUTUAL_TLS"},
        {"PROXY_CONFIG": "discoveryAddress: istiod.istio-system.svc:15010"},
        {"PROXY_CONFIG": "controlPlaneAuthPolicy: ''"},
    ],
)
def test_tls_is_on_unless_plaintext_is_asked_for(env: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "root-cert.pem"
    root.write_text("not checked here")
    assert Config.build({}, {**env, "XDS_ROOT_CA": str(root)}).tls is not None


def test_only_the_flag_or_auth_policy_none_is_plaintext() -> None:
    assert Config.build({"plaintext": True}, {}).tls is None
    none = {"PROXY_CONFIG": "controlPlaneAuthPolicy: NONE"}
    assert Config.build({}, none).tls is None


# ----- logs and the socket ----------------------------------------------------------------

SECRET = "s3cr3t-payload-7f1d"
TOKEN = "t0ken-9a8b7c"


@pytest.mark.envoy  # not Envoy, but a real ``xdsfast run`` process at debug level
async def test_no_token_or_payload_in_debug_logs(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    cp = control_plane
    serving = mesh.sample_mesh(listener_port=15001, backend_port=8080)
    cp.set_mesh(serving)
    table = mesh.sample_name_table()
    table.table[f"{SECRET}.example.com"].ips.append("10.9.9.9")
    cp.set_name_table(table)
    cluster = mesh.eds_cluster(f"cluster-{SECRET}")
    cp.set_resources(CLUSTER, {cluster.name: cluster})
    token = short_tmp / "token"
    token.write_text(TOKEN)
    relay = await xdsfast_run(
        "--discovery-address",
        cp.address,
        "--dns",
        "--dns-address",
        "127.0.0.1:0",
        "--log-level",
        "debug",
        "--token-path",
        str(token),
    )
    mode = stat.S_IMODE(os.stat(relay.socket_path).st_mode)
    assert mode == 0o666  # Envoy may run as another user, as Istio's agent allows
    client = AdsClient(f"unix:{relay.socket_path}")
    await client.open()
    try:
        await client.request(CLUSTER)
        response = await client.recv()
        await client.ack(response)
        await client.request(LISTENER)
        await cp.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)
        # A NACK from "Envoy" whose message carries payload too.
        await client.ack(response, error=f"rejected {SECRET}")
        await cp.wait_for_request(lambda r: r.is_nack)
    finally:
        await client.close()
    await relay.stop()
    # The token was sent (so it was read), yet never logged.
    assert all(md.get("authorization") == f"Bearer {TOKEN}" for md in cp.stream_metadata)
    log = relay.stderr.decode()
    assert "request for" in log or "response for" in log  # debug lines were written
    assert SECRET not in log
    assert TOKEN not in log


# ----- regressions found by fuzz/fuzz_nametable.py ---------------------------------------


def test_an_ip_with_a_nul_byte_is_skipped_not_fatal_to_the_table() -> None:
    """``socket.inet_pton`` raises ValueError (not OSError) for a NUL inside the string: the
    whole NameTable failed to build, so DNS never became ready. Now the entry is dropped."""
    from xdsfast import intercept
    from xdsfast.engines import Mode

    table = mesh.sample_name_table()
    table.table["backend.default.svc.cluster.local"].ips[:] = ["2001:d\x00\x00::1", "10.0.0.7"]
    table.table["bad.example.com"].ips.append("1.2.3\x004")
    dns = DnsTable()
    response = xds_pb2.DiscoveryResponse(version_info="1", type_url=typeurls.NAME_TABLE)
    response.resources.add(type_url=typeurls.NAME_TABLE, value=table.SerializeToString())
    reply, error = intercept.consume(
        intercept.NameTableInterceptor(dns), Mode.SOTW, response.SerializeToString(), "1", "n"
    )
    assert reply is not None and error is None
    assert dns.answers is not None  # built (no event loop here: at once)
    assert any(b"backend" in key for key in dns.answers)
