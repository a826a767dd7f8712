"""Istio's own binaries as test peers: ``istiod-fake`` and the stock ``pilot-agent``.

Both are built from the Go module in ``interop/`` (pinned ``istio.io/istio``) by
``scripts/build-istio-peers``, once per test session and cached outside the repo. Without
a Go toolchain the tests that need them ERROR with a message naming the README section
"Real Istio in the loop"; ``XDSFAST_SKIP_ISTIO=1`` skips them instead.

``istiod-fake`` is Istio's own xDS generation (its in-process test discovery server) on a
TCP port, fed from YAML; ``pilot-agent`` runs as a bare xDS + DNS proxy
(``DISABLE_ENVOY=true``) in a temp working directory, because its paths are relative.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format, struct_pb2
from support import free_port

from xdsfast.peers.backend import http_get
from xdsfast.peers.envoy import EnvoyProcess, _die_with_parent, _xds_cluster, bootstrap
from xdsfast.peers.pki import Authority

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-istio-peers"
YAML_DIR = Path(__file__).resolve().parent / "istio"
README_SECTION = 'README section "Real Istio in the loop"'
SKIP_ENV = "XDSFAST_SKIP_ISTIO"
BUILD_TIMEOUT = 40 * 60.0  # a cold build on two busy cores takes minutes
ISTIO_VERSION = "1.31.0"  # the pinned module's VERSION file says 1.31
CLUSTER_ID = "Kubernetes"  # the fake's cluster: a node's CLUSTER_ID picks its VIPs
_POLL = 0.05


# -- building --------------------------------------------------------------------------


@dataclass(frozen=True)
class Peers:
    """The directory of the built binaries."""

    directory: Path

    @property
    def istiod_fake(self) -> Path:
        return self.directory / "istiod-fake"

    @property
    def pilot_agent(self) -> Path:
        return self.directory / "pilot-agent"

    @property
    def inject_render(self) -> Path:
        """Istio's sidecar injector on one pod (``interop/cmd/inject-render``)."""
        return self.directory / "inject-render"


_built: Peers | str | None = None  # the peers, or why they could not be built


def peers() -> Peers:
    """Build (or reuse) the peers once per session; ERROR the calling test if impossible.

    Call it from a session-scoped fixture. ``XDSFAST_SKIP_ISTIO=1`` skips instead."""
    global _built
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: tests against Istio's own binaries skipped")
    if _built is None:
        _built = _build()
    if isinstance(_built, str):
        pytest.fail(_built, pytrace=False)
    return _built


def _build() -> Peers | str:
    hint = f"(see the {README_SECTION}; {SKIP_ENV}=1 skips these tests)"
    try:
        done = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{BUILD_SCRIPT.name} ran over {BUILD_TIMEOUT:.0f}s {hint}"
    except OSError as exc:
        return f"{BUILD_SCRIPT.name} could not run: {exc} {hint}"
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 2:  # no usable Go toolchain: the script's one line says so
        return f"{errors[-1] if errors else 'no Go toolchain'} ({SKIP_ENV}=1 skips these tests)"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = "\n".join(errors[-45:])
        return f"{BUILD_SCRIPT.name} failed (exit {done.returncode}) {hint}:\n{tail}"
    built = Peers(Path(lines[-1]))
    for binary in (built.istiod_fake, built.pilot_agent):
        if not os.access(binary, os.X_OK):
            return f"{BUILD_SCRIPT.name} printed {built.directory}, but {binary} is missing {hint}"
    return built


# -- processes -------------------------------------------------------------------------


def _command(args: Sequence[str]) -> tuple[list[str], Any]:
    """``args`` with a parent-death signal, so a peer never outlives the test process."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "SIGKILL", "--", *args], None
    return list(args), _die_with_parent


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return f"--- {path.name} tail ---\n" + "\n".join(text.splitlines()[-lines:])


async def _stop(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"pid {proc.pid} ignored SIGTERM for {timeout}s; killed") from None


async def http_request(
    port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to 127.0.0.1:``port`` (connection closed after); (status, body)."""

    async def exchange() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = (
                f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        _, _, payload = rest.partition(b"\r\n\r\n")
        return int(status_line.split()[1]), payload

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"{method} 127.0.0.1:{port}{path} took over {timeout}s") from None


async def wait_ready(
    status_port: int,
    timeout: float = 20.0,
    check_alive: Callable[[], None] | None = None,
    log_tail: Callable[[], str] | None = None,
) -> None:
    """Wait until an agent's ``/healthz/ready`` on 127.0.0.1:``status_port`` answers 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if check_alive is not None:
            check_alive()
        try:
            status, _, body = await http_get("127.0.0.1", status_port, "/healthz/ready")
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except (OSError, TimeoutError) as exc:
            last = repr(exc)
        await asyncio.sleep(_POLL)
    tail = f"\n{log_tail()}" if log_tail is not None else ""
    raise TimeoutError(f"not ready in {timeout}s (last /healthz/ready: {last}){tail}")


# -- istiod-fake -----------------------------------------------------------------------

_READY = re.compile(rb"^istiod-fake ready xds=\S+:(\d+) control=\S+:(\d+)\s*$")


@dataclass
class IstiodFake:
    """A running ``istiod-fake``: its xDS port, and a client of its control port."""

    proc: asyncio.subprocess.Process
    xds_port: int
    control_port: int
    log_path: Path

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    async def _post(self, path: str, body: bytes = b"") -> dict[str, Any]:
        status, payload = await http_request(self.control_port, "POST", path, body)
        answer: dict[str, Any] = json.loads(payload or b"{}")
        if status != 200:
            raise RuntimeError(f"istiod-fake {path}: {status} {answer.get('error', payload)!r}")
        return answer

    async def apply(self, yaml_text: str) -> list[str]:
        """Create or update every object of a YAML stream; what happened to each."""
        done: list[str] = (await self._post("/apply", yaml_text.encode()))["done"]
        return done

    async def delete(self, yaml_text: str) -> list[str]:
        """Delete every object a YAML stream names (apiVersion, kind, name, namespace)."""
        done: list[str] = (await self._post("/delete", yaml_text.encode()))["done"]
        return done

    async def delete_object(
        self, api_version: str, kind: str, name: str, namespace: str = ""
    ) -> list[str]:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        doc = {"apiVersion": api_version, "kind": kind, "metadata": meta}
        return await self.delete(json.dumps(doc))  # JSON is YAML

    async def push(self) -> None:
        """A forced full push to every connected proxy."""
        await self._post("/push")

    async def health(self) -> dict[str, Any]:
        status, payload = await http_request(self.control_port, "GET", "/healthz")
        if status != 200:
            raise RuntimeError(f"istiod-fake /healthz: {status}")
        answer: dict[str, Any] = json.loads(payload)
        return answer

    async def debug(self, path: str) -> tuple[int, bytes]:
        """One of istiod's own debug endpoints, e.g. ``/debug/adsz``."""
        return await http_request(self.control_port, "GET", path)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    async def stop(self, timeout: float = 10.0) -> int:
        return await _stop(self.proc, timeout)


async def start_istiod_fake(
    built: Peers,
    files: Sequence[Path],
    workdir: Path,
    *,
    xds_port: int = 0,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> IstiodFake:
    """Start ``istiod-fake`` with ``files`` (Istio CRs and Kubernetes objects).

    ``xds_port`` 0 lets it pick one (pass the old port to restart in place). Returns once
    it printed its ready line; its logs go to ``workdir``/istiod-fake.log. ``env`` adds
    to a minimal environment (Istio's ``PILOT_*`` knobs are read from it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "istiod-fake.log"
    argv = [str(built.istiod_fake), "-xds", f"127.0.0.1:{xds_port}", "-control", "127.0.0.1:0"]
    for path in files:
        argv += ["-f", str(path)]
    command, preexec = _command([*argv, *args])
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    with open(log_path, "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env={**environ, **(env or {})},
            cwd=workdir,
            preexec_fn=preexec,
        )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except asyncio.TimeoutError:
        await _stop(proc, 5.0)
        raise TimeoutError(f"istiod-fake not ready in {timeout}s\n{_tail(log_path)}") from None
    ready = _READY.match(line)
    if ready is None:
        code = await _stop(proc, 5.0)
        raise RuntimeError(f"istiod-fake did not start (exit {code}): {line!r}\n{_tail(log_path)}")
    return IstiodFake(proc, int(ready.group(1)), int(ready.group(2)), log_path)


# -- pilot-agent -----------------------------------------------------------------------


@dataclass
class PilotAgent:
    """A running stock ``pilot-agent`` (xDS proxy + DNS proxy, no Envoy)."""

    proc: asyncio.subprocess.Process
    workdir: Path
    status_port: int
    dns_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def xds_socket(self) -> Path:
        return self.workdir / "etc" / "istio" / "proxy" / "XDS"

    @property
    def xds_address(self) -> str:
        return f"unix:{self.xds_socket}"

    async def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET on the status port."""
        status, _, body = await http_get("127.0.0.1", self.status_port, path, timeout=timeout)
        return status, body

    async def ndsz(self) -> dict[str, Any] | None:
        """The NameTable as ``/debug/ndsz`` shows it; None before the first one."""
        status, body = await self.get("/debug/ndsz")
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"pilot-agent /debug/ndsz: {status} {body[:200]!r}")
        table: dict[str, Any] = json.loads(body)
        return table

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait for ``/healthz/ready`` 200 (with DNS on: the first NameTable applied)."""
        await wait_ready(self.status_port, timeout, self._check_alive, self.log_tail)

    def _check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise RuntimeError(f"pilot-agent exited with {self.proc.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    async def stop(self, timeout: float = 10.0) -> int:
        return await _stop(self.proc, timeout)


_certs: tuple[bytes, bytes, bytes] | None = None  # (chain, key, root), made once


def _throwaway_certs(directory: Path) -> None:
    """A valid key pair where FILE_MOUNTED_CERTS looks (./etc/certs). Nothing uses it (the
    upstream is plaintext, there is no Envoy), but without loadable files the agent's
    secret cache logs a failure every few seconds."""
    global _certs
    if _certs is None:
        authority = Authority("xdsfast interop throw-away CA")
        leaf = authority.issue("spiffe-less workload", client=True)
        _certs = (leaf.cert, leaf.key, authority.pem)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in zip(("cert-chain.pem", "key.pem", "root-cert.pem"), _certs, strict=True):
        (directory / name).write_bytes(data)


async def start_pilot_agent(
    built: Peers,
    discovery_address: str,
    workdir: Path,
    *,
    namespace: str = "default",
    pod_name: str = "client",
    instance_ip: str = "127.0.0.1",
    dns: bool = True,
    resolv_conf: Path | None = None,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> PilotAgent:
    """Start the stock ``pilot-agent proxy sidecar`` as a bare xDS + DNS proxy.

    It runs in ``workdir`` (its XDS socket is ``workdir``/etc/istio/proxy/XDS), dials
    ``discovery_address`` in plaintext only once a client connects, and serves DNS on a
    free 127.0.0.1 port. ``resolv_conf`` replaces /etc/resolv.conf (its only source of
    upstream DNS servers, always on port 53) in a private mount namespace: that needs
    ``unshare`` and root. ``args`` go after ``proxy sidecar`` (e.g. ``--log_output_level``).
    Returns once the socket exists and the status port answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    _throwaway_certs(workdir / "etc" / "certs")
    status_port, dns_port = free_port(), free_port()
    while dns_port == status_port:
        dns_port = free_port()
    proxy_config = {
        "discoveryAddress": discovery_address,
        "controlPlaneAuthPolicy": "NONE",
        "statusPort": status_port,
    }
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "DISABLE_ENVOY": "true",
        "FILE_MOUNTED_CERTS": "true",
        "CLOUD_PLATFORM": "none",
        "PROXY_CONFIG": json.dumps(proxy_config),
        "ISTIO_META_DNS_CAPTURE": "true" if dns else "false",
        "DNS_PROXY_ADDR": f"127.0.0.1:{dns_port}",
        "POD_NAME": pod_name,
        "POD_NAMESPACE": namespace,
        "INSTANCE_IP": instance_ip,
        "SERVICE_ACCOUNT": "default",
        "ISTIO_META_CLUSTER_ID": CLUSTER_ID,
        **(env or {}),
    }
    argv = argv_agent = [str(built.pilot_agent), "proxy", "sidecar", *args]
    if resolv_conf is not None:
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("resolv_conf needs unshare(1) (util-linux)")
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        argv = [unshare, "--mount", "--propagation", "private", "sh", "-c", script]
        argv += [str(resolv_conf), *argv_agent]
    command, preexec = _command(argv)
    log_path = workdir / "pilot-agent.log"
    with open(log_path, "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=environ,
            cwd=workdir,
            preexec_fn=preexec,
        )
    agent = PilotAgent(proc, workdir, status_port, dns_port, log_path, environ)
    deadline = time.monotonic() + timeout
    while True:
        answered = False
        if agent.xds_socket.exists():
            try:
                await agent.get("/healthz/ready", timeout=max(0.1, deadline - time.monotonic()))
                answered = True  # 503 is fine: no client yet, so no NameTable yet
            except (OSError, TimeoutError):
                pass
        if answered:
            return agent
        if proc.returncode is not None or time.monotonic() > deadline:
            code = await _stop(proc, 5.0)
            raise RuntimeError(
                f"pilot-agent did not come up in {timeout}s (exit {code}; socket "
                f"{'present' if agent.xds_socket.exists() else 'missing'})\n{agent.log_tail()}"
            )
        await asyncio.sleep(_POLL)


# -- an Istio sidecar's node ------------------------------------------------------------


def istio_node(
    *,
    ip: str = "10.1.1.1",
    pod: str = "client",
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> base_pb2.Node:
    """A node as Istio's injector and bootstrap make it (metadata values are strings,
    ``LABELS`` a string map), with DNS capture and in-proxy VIP auto-allocation on."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "NAMESPACE": namespace,
            "CLUSTER_ID": CLUSTER_ID,
            "ISTIO_VERSION": ISTIO_VERSION,
            "INSTANCE_IPS": ip,
            "LABELS": dict(labels or {"app": pod}),
            "DNS_CAPTURE": "true",
            "DNS_AUTO_ALLOCATE": "true",
            **(extra or {}),
        }
    )
    return base_pb2.Node(
        id=f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local",
        cluster=f"{pod}.{namespace}",
        metadata=metadata,
    )


# -- a real Envoy with an Istio sidecar's node -------------------------------------------


class IstioEnvoy(EnvoyProcess):
    """A real Envoy whose bootstrap carries ``node`` (e.g. from :func:`istio_node`) as
    Istio's injector and bootstrap set it, and a static ``sds-grpc`` cluster as Istio's
    bootstrap has one (nothing serves it: the tests' config is plaintext)."""

    def __init__(
        self, xds_address: str, *, delta: bool, workdir: Path, node: base_pb2.Node
    ) -> None:
        super().__init__(
            xds_address, delta=delta, workdir=workdir, node_id=node.id, cluster=node.cluster
        )
        self.node = node

    def write_bootstrap(self) -> None:
        """The demo's sidecar bootstrap, with this node and an ``sds-grpc`` cluster."""
        config = bootstrap(
            self.xds_address, delta=self.delta, node_id=self.node.id, cluster=self.node.cluster
        )
        config["node"] = json_format.MessageToDict(self.node)
        static = config["static_resources"]
        assert isinstance(static, dict)
        pipe: dict[str, object] = {"pipe": {"path": str(self.workdir / "sds-socket")}}
        sds = _xds_cluster(pipe)
        sds["name"] = "sds-grpc"
        sds["load_assignment"] = {
            "cluster_name": "sds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": pipe}}]}],
        }
        static["clusters"].append(sds)
        self.bootstrap_path.write_text(json.dumps(config, indent=2))

    async def rejected(self) -> dict[str, int]:
        """Envoy's ``*.update_rejected`` counters (NACKs) that are not zero."""
        return {
            name: value
            for name, value in (await self.stats()).items()
            if name.endswith(".update_rejected") and value
        }
