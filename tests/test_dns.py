"""The local DNS proxy end to end: dnspython (and raw sockets) against an in-process agent
whose NameTable comes through the relay from the control plane, forwarding to fake
upstream resolvers on loopback; plus ``xdsfast run --dns`` as a real process."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import pytest_asyncio
from conftest import XdsfastFactory
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord
from google.protobuf import any_pb2

from xdsfast import cli, nds_pb2
from xdsfast.agent import Agent
from xdsfast.config import Config, ConfigError
from xdsfast.dns import table as table_module
from xdsfast.dns.server import DnsServer
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.typeurls import LISTENER, NAME_TABLE

Info = nds_pb2.NameTable.NameInfo
SEARCH = "default.svc.cluster.local"


def name_table() -> nds_pb2.NameTable:
    """A table exercising every naming rule."""
    t = nds_pb2.NameTable()
    k8s = "Kubernetes"
    t.table["backend.default.svc.cluster.local"].CopyFrom(
        Info(ips=["10.0.0.1", "10.0.0.2", "10.0.0.3"], registry=k8s, shortname="backend",
             namespace="default")
    )  # fmt: skip
    t.table["db.other.svc.cluster.local"].CopyFrom(
        Info(ips=["10.0.1.1"], registry=k8s, shortname="db", namespace="other")
    )
    t.table["remote.ns2.svc.cluster.remote"].CopyFrom(
        Info(ips=["10.0.2.1"], registry=k8s, shortname="remote", namespace="ns2")
    )
    t.table["legacy.default.svc.cluster.local"].CopyFrom(
        Info(ips=["10.0.3.1"], registry=k8s, shortname="legacy", namespace="default",
             alt_hosts=["legacy-alias.example"])
    )  # fmt: skip
    t.table["dotted.default.svc.cluster.local."].CopyFrom(
        Info(ips=["10.0.4.1"], registry=k8s, shortname="dotted", namespace="default")
    )
    t.table["api.example.com"].CopyFrom(Info(ips=["240.240.0.1", "2001:2::1"], registry="External"))
    t.table["v6only.example.com"].CopyFrom(Info(ips=["2001:2::5"], registry="External"))
    t.table["*.wild.example.com"].CopyFrom(Info(ips=["240.240.0.9"], registry="External"))
    t.table["*.deep.wild.example.com"].CopyFrom(Info(ips=["240.240.0.10"], registry="External"))
    t.table["many.example.com"].CopyFrom(
        Info(ips=[f"240.240.1.{i}" for i in range(1, 61)], registry="External")
    )
    t.table["bad.example.com"].CopyFrom(Info(ips=["not-an-ip"], registry="External"))
    return t


# -- a fake upstream resolver ---------------------------------------------------------------


class FakeUpstream:
    """A resolver on 127.0.0.1, UDP and TCP on one port.

    Answers A with ``ip``; ``big.example.`` with 100 A records (well over 512 bytes, EDNS
    or not); ``nx.example.`` with NXDOMAIN; TXT with a TXT record.  ``silent`` never
    answers; ``hold`` (an event) delays every answer until it is set.
    """

    def __init__(self, ip: str = "192.0.2.1", *, silent: bool = False) -> None:
        self.ip = ip
        self.silent = silent
        self.hold: asyncio.Event | None = None
        self.queries: list[tuple[str, bytes]] = []  # (udp|tcp, the message as received)
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._received = asyncio.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def names(self, transport: str | None = None) -> list[str]:
        return [
            str(DNSRecord.parse(raw).q.qname).lower()
            for kind, raw in self.queries
            if transport is None or kind == transport
        ]

    async def wait_queries(self, count: int, timeout: float = 10.0) -> None:
        async def _wait() -> None:
            while len(self.queries) < count:
                self._received.clear()
                await self._received.wait()

        await asyncio.wait_for(_wait(), timeout)

    def answer(self, data: bytes) -> bytes:
        query = DNSRecord.parse(data)
        reply = query.reply()
        name = str(query.q.qname).lower()
        if name == "big.example.":
            for i in range(100):
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(f"198.51.100.{i}"), ttl=60))
        elif name == "nx.example.":
            reply.header.rcode = RCODE.NXDOMAIN
        elif query.q.qtype == QTYPE.TXT:
            reply.add_answer(RR(query.q.qname, QTYPE.TXT, rdata=TXT("from upstream"), ttl=60))
        else:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(self.ip), ttl=60))
        packed: bytes = reply.pack()
        return packed

    def _record(self, kind: str, data: bytes) -> None:
        self.queries.append((kind, data))
        self._received.set()

    async def _reply_later(self, data: bytes, send: Callable[[bytes], None]) -> None:
        if self.silent:
            return
        if self.hold is not None:
            await self.hold.wait()
        send(self.answer(data))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = self
        tasks: set[asyncio.Task[None]] = set()

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                upstream._record("udp", data)
                task = loop.create_task(
                    upstream._reply_later(data, lambda r: self.transport.sendto(r, addr))
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                    upstream._record("tcp", data)
                    await upstream._reply_later(
                        data, lambda r: writer.write(len(r).to_bytes(2, "big") + r)
                    )
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        for _ in range(20):
            transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=("127.0.0.1", 0))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(tcp, "127.0.0.1", port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise RuntimeError("no free port for the fake upstream")

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()


def closed_port() -> int:
    """A loopback port nothing listens on (UDP gets ICMP unreachable, TCP a refusal)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the agent under test ---------------------------------------------------------------------


@dataclass
class Dns:
    """An in-process agent with DNS on, its control plane and upstreams."""

    agent: Agent
    cp: ControlPlane
    upstreams: list[FakeUpstream]
    clients: list[AdsClient] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.agent.dns is not None and self.agent.dns.server is not None
        return self.agent.dns.server.port

    @property
    def server(self) -> DnsServer:
        assert self.agent.dns is not None and self.agent.dns.server is not None
        return self.agent.dns.server

    async def feed(self, table: nds_pb2.NameTable | None = None) -> str:
        """Push ``table`` from the control plane; the first time, open Envoy's stream."""
        version = self.cp.set_name_table(table if table is not None else name_table())
        if not self.clients:
            self.cp.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080,
                                              name_table=False))  # fmt: skip
            client = AdsClient(f"unix:{self.agent.config.xds_socket}")
            await client.open()
            self.clients.append(client)
            await client.request(LISTENER)
            assert (await client.recv()).type_url == LISTENER
        await self.cp.wait_for_request(
            lambda r: r.type_url == NAME_TABLE and r.is_ack and r.response_version == version
        )
        await self.agent.dns_table.wait_updates(self.agent.dns_table.updates)
        return version

    async def query(
        self,
        name: str,
        rdtype: str = "A",
        *,
        tcp: bool = False,
        edns: bool = False,
        timeout: float = 10.0,
    ) -> dns.message.Message:
        q = make_query(name, rdtype, edns=edns)
        return await self.send(q, tcp=tcp, timeout=timeout)

    async def send(
        self, q: dns.message.Message, *, tcp: bool = False, timeout: float = 10.0
    ) -> dns.message.Message:
        if tcp:
            return await dns.asyncquery.tcp(q, "127.0.0.1", port=self.port, timeout=timeout)
        return await dns.asyncquery.udp(q, "127.0.0.1", port=self.port, timeout=timeout)

    def metric(self, name: str) -> float:
        value = self.agent.metrics.sample(name)
        return 0.0 if value is None else value


def make_query(name: str, rdtype: str = "A", *, edns: bool = False) -> dns.message.Message:
    if edns:
        return dns.message.make_query(name, rdtype, use_edns=0, payload=4096)
    return dns.message.make_query(name, rdtype)


DnsFactory = Callable[..., Awaitable[Dns]]


@pytest_asyncio.fixture
async def start_dns(short_tmp: Path, control_plane: ControlPlane) -> AsyncIterator[DnsFactory]:
    """``await start_dns(upstreams=[...], resolv_text=..., **config)``: an agent with DNS on
    127.0.0.1:0, its resolv.conf written from ``resolv_text`` (``resolv_conf=`` overrides)."""
    started: list[Dns] = []
    owned: list[FakeUpstream] = []

    async def start(
        upstreams: list[FakeUpstream] | None = None,
        resolv_text: str = f"nameserver 127.0.0.1\nsearch {SEARCH} svc.cluster.local\n",
        **settings: Any,
    ) -> Dns:
        if upstreams is None:
            upstreams = [FakeUpstream()]
        for upstream in upstreams:
            if not upstream.port:
                await upstream.start()
                owned.append(upstream)
        path = short_tmp / f"resolv{len(started)}.conf"
        path.write_text(resolv_text)
        values: dict[str, Any] = {
            "discovery_address": control_plane.address,
            "plaintext": True,
            "dns_enabled": True,
            "dns_address": "127.0.0.1:0",
            "resolv_conf": str(path),
            "dns_upstreams": tuple(u.address for u in upstreams),
            "dns_forward_timeout": 2.0,
            "pod_namespace": "default",
            "domain": SEARCH,
            "xds_socket": str(short_tmp / f"XDS{len(started)}"),
            "status_address": "127.0.0.1:0",
            **settings,
        }
        agent = Agent(Config(**values))
        await agent.start()
        env = Dns(agent, control_plane, upstreams)
        started.append(env)
        return env

    yield start
    for env in started:
        for client in env.clients:
            await client.close()
        await env.agent.stop(grace=0)
    for upstream in owned:
        await upstream.stop()


@pytest_asyncio.fixture
async def fed(start_dns: DnsFactory) -> Dns:
    """DNS with the rules table applied through the relay."""
    env = await start_dns()
    await env.feed()
    return env


TRANSPORTS = [pytest.param(False, id="udp"), pytest.param(True, id="tcp")]
EDNS = [pytest.param(False, id="plain"), pytest.param(True, id="edns")]


def addresses(reply: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in reply.answer for rd in rrset if rrset.rdtype in (1, 28)]


def is_local(reply: dns.message.Message) -> bool:
    """Answered from the table: AA set, RA clear, NOERROR."""
    return (
        reply.rcode() == dns.rcode.NOERROR
        and bool(reply.flags & dns.flags.AA)
        and not reply.flags & dns.flags.RA
    )


# -- answers from the table -------------------------------------------------------------------


@pytest.mark.parametrize("tcp", TRANSPORTS)
@pytest.mark.parametrize("edns", EDNS)
async def test_kubernetes_fqdn_is_answered_locally(fed: Dns, tcp: bool, edns: bool) -> None:
    q = make_query("backend.default.svc.cluster.local", edns=edns)
    reply = await fed.send(q, tcp=tcp)
    assert reply.id == q.id
    assert is_local(reply)
    assert reply.flags & dns.flags.RD  # copied from the query
    assert reply.question == q.question
    (rrset,) = reply.answer
    assert rrset.ttl == 30
    assert sorted(addresses(reply)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert fed.upstreams[0].queries == []


async def test_short_names_follow_the_proxy_namespace(fed: Dns) -> None:
    assert addresses(await fed.query("backend.")) != []  # own namespace: short name
    assert addresses(await fed.query("backend.default.")) != []
    assert addresses(await fed.query("backend.default.svc.")) != []
    assert addresses(await fed.query("db.other.")) == ["10.0.1.1"]
    assert addresses(await fed.query("db.other.svc.")) == ["10.0.1.1"]
    assert fed.upstreams[0].queries == []
    reply = await fed.query("db.")  # another namespace: no short name, so upstream
    assert addresses(reply) == ["192.0.2.1"]
    assert fed.upstreams[0].names() == ["db."]


async def test_other_cluster_domain_gets_its_fqdn_only(fed: Dns) -> None:
    assert addresses(await fed.query("remote.ns2.svc.cluster.remote.")) == ["10.0.2.1"]
    await fed.query("remote.ns2.")
    assert fed.upstreams[0].names() == ["remote.ns2."]


async def test_alt_hosts_are_answered(fed: Dns) -> None:
    reply = await fed.query("legacy-alias.example.")
    assert is_local(reply) and addresses(reply) == ["10.0.3.1"]


async def test_kubernetes_hostname_ending_in_dot_gives_no_names(fed: Dns) -> None:
    await fed.query("dotted.default.svc.cluster.local.")
    await fed.query("dotted.")
    assert fed.upstreams[0].names() == ["dotted.default.svc.cluster.local.", "dotted."]


async def test_other_registries_get_their_hostname_only(fed: Dns) -> None:
    assert addresses(await fed.query("api.example.com.")) == ["240.240.0.1"]
    assert fed.upstreams[0].queries == []


async def test_unparseable_ips_make_an_entry_unknown(fed: Dns) -> None:
    assert addresses(await fed.query("bad.example.com.")) == ["192.0.2.1"]


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_first_search_domain_cname_shortcut(fed: Dns, tcp: bool) -> None:
    reply = await fed.query(f"backend.default.{SEARCH}.", tcp=tcp)
    assert is_local(reply)
    cname, a = reply.answer
    assert cname.rdtype == dns.rdatatype.CNAME and cname.ttl == 30
    assert cname.name.to_text() == f"backend.default.{SEARCH}."
    assert cname[0].target.to_text() == "backend.default."
    assert a.name.to_text() == "backend.default." and len(a) == 3
    # An FQDN + the search domain, as a resolver tries it first with ndots:5.
    reply = await fed.query(f"db.other.svc.cluster.local.{SEARCH}.", tcp=tcp)
    assert reply.answer[0][0].target.to_text() == "db.other.svc.cluster.local."
    assert addresses(reply) == ["10.0.1.1"]
    # Not for names already ending in the search domain; only the first search domain.
    await fed.query(f"backend.default.svc.cluster.local.{SEARCH}.", tcp=tcp)
    await fed.query("db.other.svc.cluster.local.svc.cluster.local.", tcp=tcp)
    assert fed.upstreams[0].names() == [
        f"backend.default.svc.cluster.local.{SEARCH}.",
        "db.other.svc.cluster.local.svc.cluster.local.",
    ]


async def test_cname_to_a_name_without_the_family_is_an_empty_answer(fed: Dns) -> None:
    reply = await fed.query(f"backend.default.{SEARCH}.", "AAAA")
    assert is_local(reply) and reply.answer == []


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_wildcards_most_specific_wins_renamed_to_the_question(fed: Dns, tcp: bool) -> None:
    reply = await fed.query("x.wild.example.com.", tcp=tcp)
    assert is_local(reply)
    assert [r.name.to_text() for r in reply.answer] == ["x.wild.example.com."]
    assert addresses(reply) == ["240.240.0.9"]
    assert addresses(await fed.query("a.b.deep.wild.example.com.", tcp=tcp)) == ["240.240.0.10"]
    assert addresses(await fed.query("a.deep.wild.example.com.", tcp=tcp)) == ["240.240.0.10"]
    await fed.query("wild.example.com.", tcp=tcp)  # the wildcard does not cover its parent
    assert fed.upstreams[0].names() == ["wild.example.com."]


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_aaaa_comes_from_v6_and_a_known_name_is_never_nxdomain(fed: Dns, tcp: bool) -> None:
    reply = await fed.query("api.example.com.", "AAAA", tcp=tcp)
    assert is_local(reply) and addresses(reply) == ["2001:2::1"]
    assert reply.answer[0].ttl == 30
    for name, rdtype in [("v6only.example.com.", "A"), ("backend.", "AAAA")]:
        reply = await fed.query(name, rdtype, tcp=tcp)
        assert is_local(reply) and reply.answer == []  # NOERROR, empty: not NXDOMAIN
    assert fed.upstreams[0].queries == []


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_other_qtypes_of_known_names_go_upstream(fed: Dns, tcp: bool) -> None:
    reply = await fed.query("backend.default.svc.cluster.local.", "TXT", tcp=tcp)
    assert reply.answer[0].rdtype == dns.rdatatype.TXT
    assert fed.upstreams[0].queries[0][0] == ("tcp" if tcp else "udp")


async def test_names_are_case_insensitive_and_the_question_is_echoed(fed: Dns) -> None:
    q = make_query("BaCkEnD.DeFault.SVC.cluster.LOCAL.")
    reply = await fed.send(q)
    assert is_local(reply) and len(addresses(reply)) == 3
    assert reply.question[0].name.to_text() == "BaCkEnD.DeFault.SVC.cluster.LOCAL."


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_a_records_are_rotated(fed: Dns, tcp: bool) -> None:
    orders = [addresses(await fed.query("backend.", tcp=tcp)) for _ in range(3)]
    assert len({tuple(order) for order in orders}) == 3
    assert all(sorted(order) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] for order in orders)


# -- sizes ----------------------------------------------------------------------------------


async def test_udp_answer_is_truncated_to_512_without_edns(fed: Dns) -> None:
    q = make_query("many.example.com.")
    reply = await fed.send(q)
    assert reply.flags & dns.flags.TC and reply.rcode() == dns.rcode.NOERROR
    assert len(reply.to_wire()) <= 512
    assert 0 < len(addresses(reply)) < 60


async def test_udp_answer_fits_the_clients_edns_size(fed: Dns) -> None:
    small = dns.message.make_query("many.example.com.", "A", use_edns=0, payload=700)
    reply = await fed.send(small)
    assert reply.flags & dns.flags.TC and len(reply.to_wire()) <= 700
    assert len(addresses(reply)) > len(addresses(await fed.query("many.example.com.")))
    reply = await fed.query("many.example.com.", edns=True)
    assert not reply.flags & dns.flags.TC and len(addresses(reply)) == 60


async def test_tcp_answers_are_never_truncated(fed: Dns) -> None:
    reply = await fed.query("many.example.com.", tcp=True)
    assert not reply.flags & dns.flags.TC and len(addresses(reply)) == 60


# -- forwarding -----------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_unknown_names_are_forwarded_verbatim_over_the_clients_transport(
    fed: Dns, tcp: bool
) -> None:
    q = make_query("elsewhere.example.", edns=True)
    wire = q.to_wire()
    reply = await fed.send(q, tcp=tcp)
    assert reply.id == q.id and addresses(reply) == ["192.0.2.1"]
    assert reply.flags & dns.flags.RA  # the upstream's answer, not ours
    assert fed.upstreams[0].queries == [("tcp" if tcp else "udp", wire)]
    assert fed.metric("istio_agent_dns_upstream_requests_total") == 1


async def test_upstream_rcode_is_passed_through(fed: Dns) -> None:
    reply = await fed.query("nx.example.")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert fed.metric("istio_agent_dns_upstream_failures_total") == 0


async def test_large_forwarded_udp_answer_is_truncated_not_servfail(fed: Dns) -> None:
    """istio#61371: a >512-byte upstream answer to a plain UDP query must not be SERVFAIL."""
    reply = await fed.query("big.example.")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.TC and len(reply.to_wire()) <= 512
    assert 0 < len(addresses(reply)) < 100
    reply = await fed.query("big.example.", edns=True)
    assert not reply.flags & dns.flags.TC and len(addresses(reply)) == 100
    reply = await fed.query("big.example.", tcp=True)
    assert not reply.flags & dns.flags.TC and len(addresses(reply)) == 100
    assert [kind for kind, _ in fed.upstreams[0].queries] == ["udp", "udp", "tcp"]
    assert fed.metric("istio_agent_dns_upstream_failures_total") == 0


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_all_upstreams_failing_gives_servfail(start_dns: DnsFactory, tcp: bool) -> None:
    refused = FakeUpstream()
    refused.port = closed_port()  # nothing listens there
    env = await start_dns(upstreams=[refused, refused])
    await env.feed()
    reply = await env.query("elsewhere.example.", tcp=tcp)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert not reply.flags & dns.flags.AA
    assert env.metric("istio_agent_dns_upstream_failures_total") == 1
    assert env.metric("istio_agent_dns_upstream_requests_total") == 1


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_forward_timeout_applies_per_server(start_dns: DnsFactory, tcp: bool) -> None:
    silent = FakeUpstream(silent=True)
    env = await start_dns(upstreams=[silent], dns_forward_timeout=0.2)
    await env.feed()
    reply = await env.query("elsewhere.example.", tcp=tcp, timeout=10)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert len(silent.queries) == 1
    assert env.metric("istio_agent_dns_upstream_failures_total") == 1
    # A silent server and a good one: whichever order, the good one answers in the end.
    good = FakeUpstream("192.0.2.7")
    env = await start_dns(upstreams=[silent, good], dns_forward_timeout=0.2)
    await env.feed()
    for _ in range(4):
        assert addresses(await env.query("elsewhere.example.", tcp=tcp)) == ["192.0.2.7"]


async def test_parallel_mode_asks_every_server_and_takes_the_first_answer(
    start_dns: DnsFactory,
) -> None:
    slow, fast = FakeUpstream("192.0.2.8"), FakeUpstream("192.0.2.9")
    await slow.start()
    slow.hold = asyncio.Event()  # answers only when released
    try:
        env = await start_dns(
            upstreams=[slow, fast], dns_forward_parallel=True, dns_forward_timeout=60.0
        )
        await env.feed()
        for tcp in (False, True):
            reply = await env.query("elsewhere.example.", tcp=tcp)
            assert addresses(reply) == ["192.0.2.9"]
        await slow.wait_queries(2)  # it was asked too, at the same time
        assert [kind for kind, _ in slow.queries] == ["udp", "tcp"]
    finally:
        await slow.stop()


async def test_sequential_mode_shuffles_the_servers_per_query(start_dns: DnsFactory) -> None:
    one, two = FakeUpstream("192.0.2.1"), FakeUpstream("192.0.2.2")
    env = await start_dns(upstreams=[one, two])
    await env.feed()
    env.server.forwarder.rng.seed(4)  # reproducible, and both orders occur within 16 tries
    seen = {addresses(await env.query(f"q{i}.example."))[0] for i in range(16)}
    assert seen == {"192.0.2.1", "192.0.2.2"}
    assert len(one.queries) + len(two.queries) == 16  # each query went to one server only


# -- lifecycle --------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", TRANSPORTS)
async def test_servfail_before_the_first_name_table(start_dns: DnsFactory, tcp: bool) -> None:
    env = await start_dns()
    for name in ("backend.default.svc.cluster.local.", "elsewhere.example."):
        reply = await env.query(name, tcp=tcp)
        assert reply.rcode() == dns.rcode.SERVFAIL
    assert env.upstreams[0].queries == []
    assert not env.agent.dns_table.ready
    await env.feed()
    assert env.agent.dns_table.ready
    assert is_local(await env.query("backend.", tcp=tcp))


async def test_a_new_table_replaces_the_old_one(fed: Dns) -> None:
    table = nds_pb2.NameTable()
    table.table["backend.default.svc.cluster.local"].CopyFrom(
        Info(ips=["10.9.9.9"], registry="Kubernetes", shortname="backend", namespace="default")
    )
    await fed.feed(table)
    assert addresses(await fed.query("backend.")) == ["10.9.9.9"]
    assert addresses(await fed.query("api.example.com.")) == ["192.0.2.1"]  # gone: forwarded


async def test_relay_does_not_wait_for_the_table_build(
    fed: Dns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ACK goes out while the answers are still being built; queries keep getting the
    old answers until the new ones are swapped in whole."""
    release = threading.Event()
    real_build = table_module.build

    def blocked_build(*args: Any) -> Any:
        release.wait(30)
        return real_build(*args)

    monkeypatch.setattr(table_module, "build", blocked_build)
    table = name_table()
    table.table["backend.default.svc.cluster.local"].ips[:] = ["10.7.7.7"]
    version = fed.cp.set_name_table(table)
    try:
        await fed.cp.wait_for_request(
            lambda r: r.type_url == NAME_TABLE and r.is_ack and r.response_version == version
        )
        assert fed.agent.dns_table.version == version
        assert len(addresses(await fed.query("backend."))) == 3  # still the old answers
        # A push to Envoy is relayed meanwhile.
        fed.cp.set_resources(LISTENER, {"x": mesh.listener(port=15002, name="x")})
        assert (await fed.clients[0].recv()).type_url == LISTENER
    finally:
        release.set()
    await fed.agent.dns_table.wait_updates(fed.agent.dns_table.updates)
    assert fed.agent.dns_table.answers_version == version
    assert addresses(await fed.query("backend.")) == ["10.7.7.7"]


async def test_undecodable_table_is_nacked_and_answers_stay(fed: Dns) -> None:
    bad = any_pb2.Any(type_url=NAME_TABLE, value=b"\x0a\x05ab")
    (nonce,) = fed.cp.push_raw(NAME_TABLE, [bad], version="bad")
    nack = await fed.cp.wait_for_request(lambda r: r.nonce == nonce)
    assert nack.is_nack
    assert is_local(await fed.query("backend."))


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_use_istios_names(fed: Dns) -> None:
    await fed.query("backend.")
    await fed.query("backend.", tcp=True)
    await fed.query("elsewhere.example.")
    assert fed.metric("istio_agent_dns_requests_total") == 3
    assert fed.metric("istio_agent_dns_upstream_requests_total") == 1
    assert fed.metric("istio_agent_dns_upstream_failures_total") == 0
    assert fed.metric("istio_agent_dns_upstream_request_duration_seconds_count") == 1
    text = fed.agent.metrics.exposition().decode()
    for line in (
        "istio_agent_dns_requests_total 3.0",
        "istio_agent_dns_upstream_requests_total 1.0",
        "istio_agent_dns_upstream_failures_total 0.0",
        'istio_agent_dns_upstream_request_duration_seconds_bucket{le="0.001"}',
        'istio_agent_dns_upstream_request_duration_seconds_bucket{le="5.0"} 1.0',
    ):
        assert line in text


# -- bad input --------------------------------------------------------------------------------


class RawUdp(asyncio.DatagramProtocol):
    """A plain UDP client socket: send bytes, receive datagrams in order."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.received.put_nowait(data)

    async def recv(self, timeout: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.received.get(), timeout)


async def open_udp(port: int) -> tuple[asyncio.DatagramTransport, RawUdp]:
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(RawUdp, remote_addr=("127.0.0.1", port))


@pytest_asyncio.fixture
async def raw_udp(fed: Dns) -> AsyncIterator[tuple[asyncio.DatagramTransport, RawUdp]]:
    transport, protocol = await open_udp(fed.port)
    yield transport, protocol
    transport.close()


def good_query(qid: int, name: str = "backend.") -> bytes:
    q = make_query(name)
    q.id = qid
    wire: bytes = q.to_wire()
    return wire


HEADER_ONE_QUESTION = bytes.fromhex("beef 0100 0001 0000 0000 0000")
BAD_QUERIES = {
    "no_question_bytes": (HEADER_ONE_QUESTION, dns.rcode.FORMERR),
    "zero_questions": (bytes.fromhex("beef 0100 0000 0000 0000 0000"), dns.rcode.FORMERR),
    "two_questions": (
        bytes.fromhex("beef 0100 0002 0000 0000 0000") + b"\x01a\x00\x00\x01\x00\x01" * 2,
        dns.rcode.FORMERR,
    ),
    "truncated_name": (HEADER_ONE_QUESTION + b"\x07backend\x07defa", dns.rcode.FORMERR),
    "missing_type": (HEADER_ONE_QUESTION + b"\x01a\x00\x00", dns.rcode.FORMERR),
    "pointer_in_question": (HEADER_ONE_QUESTION + b"\xc0\x0c\x00\x01\x00\x01", dns.rcode.FORMERR),
    "additional_count_without_records": (
        bytes.fromhex("beef 0100 0001 0000 0000 0001") + b"\x01a\x00\x00\x01\x00\x01",
        dns.rcode.FORMERR,
    ),
    "opcode_status": (
        bytes.fromhex("beef 1000 0001 0000 0000 0000") + b"\x01a\x00\x00\x01\x00\x01",
        dns.rcode.NOTIMP,
    ),
}


@pytest.mark.parametrize("case", list(BAD_QUERIES))
async def test_malformed_udp_query_gets_an_error_reply(
    fed: Dns, raw_udp: tuple[asyncio.DatagramTransport, RawUdp], case: str
) -> None:
    transport, client = raw_udp
    data, rcode = BAD_QUERIES[case]
    transport.sendto(data)
    reply = await client.recv()
    assert reply[:2] == b"\xbe\xef"
    assert reply[2] & 0x80  # QR
    assert reply[3] & 0x0F == rcode
    assert reply[4:6] == b"\x00\x00"  # no question echoed from a message we could not read
    transport.sendto(good_query(7))  # and the server goes on
    assert dns.message.from_wire(await client.recv()).id == 7
    assert fed.upstreams[0].queries == []


async def test_garbage_and_responses_get_no_reply(
    fed: Dns, raw_udp: tuple[asyncio.DatagramTransport, RawUdp]
) -> None:
    transport, client = raw_udp
    for data in (b"", b"\x00", b"garbage!", os.urandom(11), good_query(9)[:2] + b"\x81\x80"):
        transport.sendto(data)
    response = bytearray(good_query(10))
    response[2] |= 0x80  # QR: a response, sent to us
    transport.sendto(bytes(response))
    transport.sendto(good_query(11))
    first = dns.message.from_wire(await client.recv())
    assert first.id == 11  # datagrams are handled in order: nothing answered before it


async def test_udp_flood_is_bounded(start_dns: DnsFactory) -> None:
    """Forwards in flight are capped (the rest get SERVFAIL at once), garbage is dropped,
    and the table keeps answering.  Sent in bursts the kernel buffers can hold, so no
    datagram is lost on the way."""
    silent = FakeUpstream(silent=True)
    env = await start_dns(upstreams=[silent], dns_forward_timeout=60.0)
    await env.feed()
    env.server.max_forwards = 4
    transport, client = await open_udp(env.port)
    try:
        for burst in range(12):
            for i in range(burst * 25, burst * 25 + 25):
                transport.sendto(os.urandom(i % 12))  # garbage too short to answer
                noise = bytearray(os.urandom(40))
                noise[2] |= 0x80  # random bytes that say "response": never answered
                transport.sendto(bytes(noise))
                transport.sendto(good_query(i, f"flood{i}.example."))
            for _ in range(21 if burst == 0 else 25):  # the first 4 are being forwarded
                reply = dns.message.from_wire(await client.recv())
                assert reply.rcode() == dns.rcode.SERVFAIL
                assert env.server.forwarding == 4
        await silent.wait_queries(4)
        assert len(silent.queries) == 4
        transport.sendto(good_query(5000))
        reply = dns.message.from_wire(await client.recv())
        assert reply.id == 5000 and is_local(reply)
    finally:
        transport.close()


async def tcp_connect(env: Dns) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", env.port)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """Everything the server sent until it closed the connection.  A reset is a close too:
    when the server closes while the client still writes (a trickle), the kernel answers
    the late bytes with RST, and the client's read fails instead of seeing EOF (with nothing
    more to read: every caller expects b"" by then)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def test_tcp_length_prefix_larger_than_the_data_times_out(fed: Dns) -> None:
    fed.server.tcp_read_timeout = 0.2
    reader, writer = await tcp_connect(fed)
    writer.write(b"\x01\x00" + b"\x00" * 20)  # 256 announced, 20 sent
    assert await closed_by_server(reader) == b""
    writer.close()


async def test_tcp_trickle_does_not_keep_a_message_alive(fed: Dns) -> None:
    """The read deadline runs from a message's first byte, not from the latest byte."""
    fed.server.tcp_read_timeout = 0.3
    reader, writer = await tcp_connect(fed)
    writer.write(b"\xff\xff")  # 65535 announced

    async def trickle() -> None:
        while not writer.is_closing():
            writer.write(b"\x00")
            await asyncio.sleep(0.05)  # pacing, not synchronisation

    task = asyncio.ensure_future(trickle())
    try:
        assert await closed_by_server(reader) == b""
    finally:
        task.cancel()
        writer.close()


async def test_idle_tcp_connection_is_closed(fed: Dns) -> None:
    fed.server.tcp_idle_timeout = 0.2
    reader, writer = await tcp_connect(fed)
    writer.write(b"\x00" + bytes([len(good_query(1))]) + good_query(1))
    size = int.from_bytes(await reader.readexactly(2), "big")
    assert dns.message.from_wire(await reader.readexactly(size)).id == 1
    assert await closed_by_server(reader) == b""  # then nothing: closed
    writer.close()


async def test_tcp_garbage_closes_and_malformed_query_gets_formerr(fed: Dns) -> None:
    reader, writer = await tcp_connect(fed)
    bad = HEADER_ONE_QUESTION + b"\x07backend"
    writer.write(len(bad).to_bytes(2, "big") + bad)
    size = int.from_bytes(await reader.readexactly(2), "big")
    reply = await reader.readexactly(size)
    assert reply[:2] == b"\xbe\xef" and reply[3] & 0x0F == dns.rcode.FORMERR
    writer.write(b"\x00\x05hello")  # not even a header: not a DNS client
    assert await closed_by_server(reader) == b""
    writer.close()
    reader, writer = await tcp_connect(fed)
    writer.write(b"\x00\x00")  # an empty message
    assert await closed_by_server(reader) == b""
    writer.close()


async def test_tcp_pipelined_queries_are_all_answered(fed: Dns) -> None:
    reader, writer = await tcp_connect(fed)
    names = ["backend.", "elsewhere.example.", "api.example.com.", "nx.example."] * 10
    for i, name in enumerate(names):
        wire = good_query(i, name)
        writer.write(len(wire).to_bytes(2, "big") + wire)
    got = {}
    for _ in names:
        size = int.from_bytes(await reader.readexactly(2), "big")
        msg = dns.message.from_wire(await reader.readexactly(size))
        got[msg.id] = msg.rcode()
    assert len(got) == len(names)
    assert [got[i] for i in range(4)] == [0, 0, 0, dns.rcode.NXDOMAIN]
    writer.close()


# -- listening and start-up -------------------------------------------------------------------


async def test_localhost_binds_the_nameserver_families(start_dns: DnsFactory) -> None:
    env = await start_dns(
        dns_address="localhost:0", resolv_text="nameserver 10.0.0.53\nnameserver fd00::53\n"
    )
    await env.feed()
    assert [host for host, _ in env.server.addresses] == ["127.0.0.1", "::1"]
    port = env.port
    for host in ("127.0.0.1", "::1"):
        for tcp in (False, True):
            query = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
            reply = await query(make_query("backend."), host, port=port, timeout=10)
            assert is_local(reply)


async def test_bind_failure_is_a_startup_error(start_dns: DnsFactory) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"DNS proxy cannot listen on 127.0.0.1:{port}/udp"):
            await start_dns(dns_address=f"127.0.0.1:{port}")


async def test_unreadable_resolv_conf_is_a_startup_error(
    start_dns: DnsFactory, short_tmp: Path
) -> None:
    with pytest.raises(OSError, match=r"cannot read resolv\.conf"):
        await start_dns(resolv_conf=str(short_tmp / "missing"))


def test_dns_settings_from_flags_and_environment() -> None:
    config = Config.build(
        {"plaintext": True, "dns_upstream": ["127.0.0.1:5353", "[::1]:53"], "domain": None},
        {"POD_NAMESPACE": "shop", "DNS_FORWARD_PARALLEL": "true", "DNS_FORWARD_TIMEOUT": "250ms"},
    )
    assert config.dns_upstreams == ("127.0.0.1:5353", "[::1]:53")
    assert config.dns_forward_parallel and config.dns_forward_timeout == 0.25
    assert config.pod_namespace == "shop" and config.domain == "shop.svc.cluster.local"
    assert Config.build({"plaintext": True, "domain": "shop.svc.corp"}, {}).domain == (
        "shop.svc.corp"
    )
    defaults = Config.build({"plaintext": True}, {})
    assert defaults.dns_upstreams == () and not defaults.dns_forward_parallel
    assert defaults.dns_forward_timeout == 5.0
    for flags, env in [
        ({"dns_upstream": ["resolver.example:53"]}, {}),
        ({"dns_upstream": ["127.0.0.1"]}, {}),
        ({"dns_upstream": ["127.0.0.1:0"]}, {}),
        ({}, {"DNS_FORWARD_TIMEOUT": "5"}),
        ({}, {"DNS_FORWARD_TIMEOUT": "0s"}),
        ({}, {"DNS_FORWARD_PARALLEL": "yes"}),
    ]:
        with pytest.raises(ConfigError):
            Config.build({"plaintext": True, **flags}, env)


def test_cli_rejects_a_bad_upstream_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--dns-upstream", "resolver:53"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dns-upstream 'resolver:53'" in err


async def test_xdsfast_run_serves_dns(
    xdsfast_run: XdsfastFactory, control_plane: ControlPlane, short_tmp: Path
) -> None:
    upstream = FakeUpstream()
    await upstream.start()
    resolv = short_tmp / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\nsearch {SEARCH}\n")
    control_plane.set_mesh(mesh.sample_mesh(listener_port=15001, backend_port=8080))
    proc = await xdsfast_run(
        "--discovery-address", control_plane.address, "--dns", "--dns-address", "127.0.0.1:0",
        "--dns-upstream", upstream.address, "--resolv-conf", str(resolv),
        env={"POD_NAMESPACE": "default"},
    )  # fmt: skip
    client = AdsClient(f"unix:{proc.socket_path}")
    try:
        match = re.search(rb"DNS proxy serving[^\n]*listen=127\.0\.0\.1:(\d+)", proc.stderr)
        assert match is not None, proc.stderr
        port = int(match.group(1))
        reply = await dns.asyncquery.udp(make_query("backend."), "127.0.0.1", port=port)
        assert reply.rcode() == dns.rcode.SERVFAIL  # no NameTable yet
        await client.open()
        await client.request(LISTENER)
        await client.recv()
        await control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)
        deadline = time.monotonic() + 10
        while True:  # the answers are built just after the ACK
            reply = await dns.asyncquery.udp(make_query("backend."), "127.0.0.1", port=port)
            if reply.rcode() == dns.rcode.NOERROR or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert is_local(reply) and addresses(reply) == ["10.0.0.1"]
        reply = await dns.asyncquery.tcp(make_query("elsewhere.example."), "127.0.0.1", port=port)
        assert addresses(reply) == ["192.0.2.1"] and upstream.names("tcp") == ["elsewhere.example."]
    finally:
        await client.close()
        await upstream.stop()
    assert await proc.stop() == 0


async def test_xdsfast_run_exits_1_when_dns_cannot_start(short_tmp: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        for extra, message in [
            (["--dns-address", f"127.0.0.1:{port}"], b"DNS proxy cannot listen"),
            (["--resolv-conf", str(short_tmp / "missing")], b"cannot read resolv.conf"),
        ]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "xdsfast", "run", "--plaintext", "--dns",
                "--xds-socket", str(short_tmp / "XDS"), "--status-address", "127.0.0.1:0",
                "--discovery-address", "127.0.0.1:1", "--dns-address", "127.0.0.1:0", *extra,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                cwd=short_tmp,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 1, err
            assert message in err
