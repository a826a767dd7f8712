"""``xdsfast demo``: a control plane, xdsfast and a real Envoy, end to end on this machine.

Every step is checked; ``--check`` runs them once and exits 0 only if all worked.
Without Envoy installed (or with ``--no-envoy``) a built-in ADS client stands in.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xdsfast import __version__, _ext, dig, dnsreply, statusreport
from xdsfast.agent import Agent
from xdsfast.agentclient import AgentError, parse_address
from xdsfast.config import Config
from xdsfast.peers import mesh
from xdsfast.peers.adsclient import AdsClient, subscribe_all_and_ack
from xdsfast.peers.backend import Backend, http_get
from xdsfast.peers.controlplane import ControlPlane
from xdsfast.peers.envoy import EnvoyProcess, listener_port
from xdsfast.typeurls import NAME_TABLE, ROUTE, SHORT

_DIG_NAME = "backend.default.svc.cluster.local"  # a host of mesh.sample_name_table()


class StepFailed(Exception):
    """One step of the demo did not work; the message says which and why."""


class Demo:
    """The pieces of the demo and the lines it prints."""

    def __init__(self, *, use_envoy: bool, delta: bool, out: Callable[[str], None]) -> None:
        self.use_envoy = use_envoy and EnvoyProcess.available()
        self.delta = delta
        self.out = out
        self.workdir = Path(tempfile.mkdtemp(prefix="xfdemo", dir="/tmp"))
        self.backend = Backend()
        self.control_plane = ControlPlane("127.0.0.1:0")
        self.agent: Agent | None = None
        self.envoy: EnvoyProcess | None = None
        self.listener_port = listener_port()

    def line(self, label: str, text: str) -> None:
        self.out(f"  {label:<10} {text}")

    async def start(self) -> None:
        await self.backend.start()
        await self.control_plane.start()
        self.control_plane.set_mesh(
            mesh.sample_mesh(listener_port=self.listener_port, backend_port=self.backend.port)
        )
        table = mesh.sample_name_table()
        self.line(
            "istiod",
            f"sample control plane on {self.control_plane.address}: listener, route, cluster, "
            f"endpoints and a NameTable of {len(table.table)} hosts",
        )
        socket_path = self.workdir / "etc/istio/proxy/XDS"
        config = Config(
            discovery_address=self.control_plane.address,
            plaintext=True,
            xds_socket=str(socket_path),
            dns_enabled=True,
            dns_address="127.0.0.1:0",
            cluster_id="Kubernetes",
            status_address="127.0.0.1:0",
        )
        self.agent = Agent(config)
        await self.agent.start()
        self.line(
            "xdsfast",
            f"{__version__}, core {_ext.summary()}, engine {config.engine}: "
            f"unix:{socket_path} -> {self.control_plane.address}",
        )

    async def stop(self) -> None:
        if self.envoy is not None:
            await self.envoy.stop()
        if self.agent is not None:
            await self.agent.stop()
        await self.control_plane.stop()
        await self.backend.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def connect(self) -> None:
        assert self.agent is not None
        mode = "delta" if self.delta else "state-of-the-world"
        if self.use_envoy:
            self.envoy = EnvoyProcess(
                f"unix:{self.agent.config.xds_socket}", delta=self.delta, workdir=self.workdir
            )
            started = time.monotonic()
            await self.envoy.start()
            try:
                await self.envoy.wait_ready(timeout=30)
            except (TimeoutError, RuntimeError) as exc:
                raise StepFailed(f"Envoy did not become ready: {exc}") from None
            self.line(
                "envoy",
                f"pid {self.envoy.pid}, {mode} ADS, LIVE after {time.monotonic() - started:.1f} s",
            )
        else:
            client = AdsClient(f"unix:{self.agent.config.xds_socket}", delta=self.delta)
            await client.open()
            try:
                summary = await subscribe_all_and_ack(client, timeout=15)
            finally:
                await client.done_writing()
                await client.close()
            self.line(
                "client",
                f"built-in ADS client ({mode}; Envoy not used): "
                f"{len(summary.received)} responses, {summary.total_bytes} bytes",
            )
        await self._wait_name_table()
        self.report_relayed()

    async def _wait_name_table(self) -> None:
        assert self.agent is not None
        try:
            await self.agent.dns_table.wait_updates(1, timeout=10)
        except asyncio.TimeoutError:
            raise StepFailed("the NameTable never reached xdsfast's DNS table") from None
        await self.control_plane.wait_for_request(lambda r: r.type_url == NAME_TABLE and r.is_ack)

    def report_relayed(self) -> None:
        """What istiod sent, and what came back for it, from istiod's side."""
        answers = {r.nonce: r for r in self.control_plane.requests if r.nonce}
        for sent in self.control_plane.responses:
            answer = answers.get(sent.nonce)
            verdict = "no answer yet" if answer is None else answer.kind.upper()
            where = "consumed by xdsfast (DNS)" if sent.type_url == NAME_TABLE else "forwarded"
            self.line(
                "relayed" if sent is self.control_plane.responses[0] else "",
                f"{SHORT.get(sent.type_url, sent.type_url)} v{sent.version}: "
                f"{len(sent.names) or 1} resource(s), {sent.size} B, {where}, {verdict}",
            )
        assert self.agent is not None
        hosts = self.agent.dns_table.hosts()
        self.line(
            "dns",
            f"NameTable v{self.agent.dns_table.version} applied: "
            + ", ".join(f"{h} -> {' '.join(ips)}" for h, ips in sorted(hosts.items())),
        )

    async def traffic(self) -> None:
        """An HTTP request through Envoy's listener reaches the backend; a push changes it."""
        if self.envoy is None:
            return
        before = self.backend.requests
        status, _, body = await _get_until(self.listener_port, lambda s, b: s == 200)
        if self.backend.requests <= before:
            raise StepFailed("the request through Envoy did not reach the backend")
        self.line(
            "traffic",
            f"GET 127.0.0.1:{self.listener_port}/ through Envoy -> {status} "
            f"{body.decode().strip()!r} (backend saw it)",
        )
        version = self.control_plane.set_resources(
            ROUTE, {mesh.ROUTE_NAME: mesh.direct_route(body="pushed by the demo")}
        )
        await self.control_plane.wait_for_request(
            lambda r: r.type_url == ROUTE and r.is_ack and r.response_version == version
        )
        status, _, body = await _get_until(self.listener_port, lambda s, b: b"pushed" in b)
        self.line(
            "push",
            f"route v{version} relayed and ACKed; the listener now answers "
            f"{body.decode().strip()!r}",
        )

    @property
    def status_address(self) -> str:
        assert self.agent is not None
        return self.agent.status.address

    @property
    def dns_address(self) -> str:
        assert self.agent is not None and self.agent.dns is not None
        assert self.agent.dns.server is not None
        host, port = self.agent.dns.server.addresses[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def look(self) -> None:
        """What ``xdsfast status`` and ``xdsfast dig`` see of the demo's agent."""
        endpoint = parse_address(self.status_address)
        try:
            snapshot = await asyncio.to_thread(statusreport.gather, endpoint, timeout=5.0)
        except AgentError as exc:
            raise StepFailed(f"xdsfast status: {exc}") from None
        streams = snapshot["streams"]
        rows = [row for stream in streams for row in stream["types"]]
        acked = [row["type"] for row in rows if row["ack"] == "ACK"]
        table = snapshot["name_table"] or {}
        unacked = len(acked) != len(rows) or (self.envoy is not None and not rows)
        if not snapshot["ready"] or unacked or not table.get("hosts"):
            raise StepFailed(f"xdsfast status shows a problem:\n{statusreport.render(snapshot)}")
        streams_seen = f"{'/'.join(acked)} ACKed" if rows else "no stream (the client is done)"
        self.line(
            "status",
            f"http://{self.status_address}: ready, {streams_seen}, NameTable "
            f"{table['hosts']} hosts, core {snapshot['core']}",
        )
        host, port = parse_address(self.dns_address)
        name = _DIG_NAME
        message = dig.query(name, dnsreply.TYPE_CODES["A"], dig.new_id())
        try:
            exchange = await asyncio.to_thread(dig.ask, host, port, message, tcp=False, timeout=5)
        except dig.DigError as exc:
            raise StepFailed(f"xdsfast dig: {exc}") from None
        reply = dnsreply.decode(exchange.reply)
        found = " ".join(r.data for r in reply.answer)
        if dnsreply.source(reply) != dnsreply.FROM_TABLE or not found:
            raise StepFailed(f"xdsfast dig {name}: not answered from the NameTable")
        self.line("dig", f"{name} A -> {found} (from the NameTable, {exchange.server})")

    def where_to_look(self) -> None:
        """The addresses, and commands to paste, for a demo left running."""
        status, dns = self.status_address, self.dns_address
        self.out("look at it (in another terminal):")
        for path in ("/debug/xds", "/debug/ndsz", "/stats/prometheus", "/healthz/ready"):
            self.line("", f"http://{status}{path}")
        self.line("", f"DNS proxy on {dns} (UDP and TCP)")
        self.line("", f"xdsfast status --status-address {status}")
        self.line("", f"xdsfast status --status-address {status} --watch")
        self.line("", f"xdsfast dig {_DIG_NAME} --dns-address {dns}")
        self.line("", f"xdsfast dig api.example.com AAAA --dns-address {dns}")
        if self.envoy is not None:
            self.line("", f"curl http://127.0.0.1:{self.listener_port}/")


async def _get_until(
    port: int, done: Callable[[int, bytes], bool], timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, headers, body = await http_get("127.0.0.1", port, "/", timeout=2.0)
            if done(status, body):
                return status, headers, body
            last = (status, body)
        except OSError as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise StepFailed(f"no expected answer from 127.0.0.1:{port}; last: {last!r}")


async def run_demo(*, check: bool, use_envoy: bool, delta: bool) -> int:
    """Run the demo; with ``check`` once, else until interrupted. Returns the exit code."""
    print(
        f"xdsfast demo: Envoy -> xdsfast -> an istiod stand-in, all on this machine "
        f"(core: {_ext.summary()})"
    )
    demo = Demo(use_envoy=use_envoy, delta=delta, out=print)
    try:
        await demo.start()
        await demo.connect()
        await demo.traffic()
        await demo.look()
        if not check:
            demo.where_to_look()
            print("running. Ctrl-C stops.", flush=True)
            await asyncio.Event().wait()
    except StepFailed as exc:
        print(f"  FAILED     {exc}")
        return 1
    except (asyncio.TimeoutError, TimeoutError) as exc:
        print(f"  FAILED     a step timed out: {exc}".splitlines()[0])
        return 1
    finally:
        await demo.stop()
    print("  result     every step worked")
    return 0
