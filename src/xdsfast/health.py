"""Workload health checks (VMs / WorkloadEntry), reported to istiod as Istio's agent does.

The ProxyConfig's ``readinessProbe`` (httpGet, tcpSocket, grpc or exec) is run on a
period; only changes of state are reported, after the configured number of
consecutive results.  The report itself (a HealthInformation request) is the
relay's business: this module only decides healthy or not, and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdsfast import log, wire

_log = log.scope("healthcheck")

USER_AGENT = "istio-probe/1.0"
PROBE_SOURCE_V4 = "127.0.0.6"  # Istio's probe source: not captured by the sidecar's iptables
SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Probe:
    """One readiness probe, with Istio's defaults."""

    kind: str  # "http", "tcp", "grpc" or "exec"
    host: str = "localhost"
    port: int = 0
    path: str = "/"
    scheme: str = "http"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    service: str = ""
    initial_delay: float = 0.0
    timeout: float = 1.0
    period: float = 10.0
    success_threshold: int = 1
    failure_threshold: int = 1


class ProbeError(ValueError):
    """A readinessProbe that cannot be used."""


def probe_from_config(spec: Mapping[str, Any], default_host: str) -> Probe:
    """The ProxyConfig's ``readinessProbe`` (camelCase, as in YAML/JSON) as a Probe."""

    def number(key: str, default: float) -> float:
        value = spec.get(key, default) or default
        if not isinstance(value, (int, float)) or value < 0:
            raise ProbeError(f"readinessProbe.{key} must be a non-negative number")
        return float(value)

    common: dict[str, Any] = {
        "initial_delay": number("initialDelaySeconds", 0),
        "timeout": number("timeoutSeconds", 1),
        "period": number("periodSeconds", 10),
        "success_threshold": int(number("successThreshold", 1)),
        "failure_threshold": int(number("failureThreshold", 1)),
    }
    if "httpGet" in spec:
        http = spec["httpGet"] or {}
        headers = tuple((h["name"], str(h.get("value", ""))) for h in http.get("httpHeaders", []))
        return Probe(
            "http",
            host=http.get("host") or default_host,
            port=_port(http.get("port"), "httpGet"),
            path=http.get("path") or "/",
            scheme=str(http.get("scheme") or "http").lower(),
            headers=headers,
            **common,
        )
    if "tcpSocket" in spec:
        tcp = spec["tcpSocket"] or {}
        return Probe(
            "tcp",
            host=tcp.get("host") or default_host,
            port=_port(tcp.get("port"), "tcpSocket"),
            **common,
        )
    if "grpc" in spec:
        grpc_spec = spec["grpc"] or {}
        return Probe(
            "grpc",
            host=default_host,
            port=_port(grpc_spec.get("port"), "grpc"),
            service=str(grpc_spec.get("service") or ""),
            **common,
        )
    if "exec" in spec:
        command = tuple(str(c) for c in (spec["exec"] or {}).get("command") or ())
        if not command:
            raise ProbeError("readinessProbe.exec needs a command")
        return Probe("exec", command=command, **common)
    # Istio would crash on a probe without a method (its own known bug); we refuse it.
    raise ProbeError("readinessProbe needs one of httpGet, tcpSocket, grpc or exec")


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ProbeError(f"readinessProbe.{where}.port must be a port number, not {value!r}")
    return value


async def check(probe: Probe) -> str | None:
    """Run the probe once: None when healthy, else why not."""
    try:
        return await asyncio.wait_for(_CHECKS[probe.kind](probe), probe.timeout)
    except asyncio.TimeoutError:
        return f"{probe.kind} probe timed out after {probe.timeout:g}s"
    except OSError as exc:
        return f"{probe.kind} probe failed: {exc.strerror or exc}"


async def _connect(
    probe: Probe, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    local: tuple[str, int] | None = None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(probe.host).version == 4:
            local = (PROBE_SOURCE_V4, 0)
    try:
        return await asyncio.open_connection(probe.host, probe.port, ssl=tls, local_addr=local)
    except OSError:
        if local is None:
            raise
        return await asyncio.open_connection(probe.host, probe.port, ssl=tls)


async def _http(probe: Probe) -> str | None:
    tls = None
    if probe.scheme == "https":  # as Istio: the application's certificate is not verified
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    reader, writer = await _connect(probe, tls)
    try:
        headers = dict(probe.headers)
        host = headers.pop("Host", None) or headers.pop("host", None) or probe.host
        headers.setdefault("User-Agent", USER_AGENT)
        lines = [f"GET {probe.path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status_line = await reader.readline()
    finally:
        writer.close()
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return "http probe: not an HTTP response"
    status = int(parts[1])
    return None if 200 <= status < 400 else f"http probe: status {status}"


async def _tcp(probe: Probe) -> str | None:
    _, writer = await _connect(probe)
    writer.close()
    return None


async def _grpc(probe: Probe) -> str | None:
    from grpc import aio

    service = probe.service.encode()
    request = b"\x0a" + wire.varint(len(service)) + service if service else b""
    async with aio.insecure_channel(f"{probe.host}:{probe.port}") as channel:
        call = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            answer: bytes = await call(request, timeout=probe.timeout)
        except aio.AioRpcError as exc:
            return f"grpc probe: {exc.code().name} {exc.details() or ''}".rstrip()
    status = answer[1] if len(answer) >= 2 and answer[0] == 0x08 else 0
    return None if status == SERVING else f"grpc probe: status {status} (not SERVING)"


async def _exec(probe: Probe) -> str | None:
    process = await asyncio.create_subprocess_exec(
        *probe.command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        code = await process.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return None if code == 0 else f"exec probe: exit code {code}"


_CHECKS = {"http": _http, "tcp": _tcp, "grpc": _grpc, "exec": _exec}


@dataclass
class HealthChecker:
    """Runs a probe on its period and reports changes of state (edge-triggered)."""

    probe: Probe
    report: Callable[[str | None], None]  # None: healthy; else the reason it is not
    healthy: bool | None = None
    _successes: int = 0
    _failures: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def observe(self, error: str | None) -> None:
        """Count one result; report when the state flips after enough of them in a row."""
        if error is None:
            self._successes, self._failures = self._successes + 1, 0
            if self.healthy is not True and self._successes >= self.probe.success_threshold:
                self.healthy = True
                _log.info("application is healthy")
                self.report(None)
        else:
            self._failures, self._successes = self._failures + 1, 0
            if self.healthy is not False and self._failures >= self.probe.failure_threshold:
                self.healthy = False
                _log.warning("application is not healthy: %s", error)
                self.report(error)

    async def _run(self) -> None:
        await asyncio.sleep(self.probe.initial_delay)
        while True:
            self.observe(await check(self.probe))
            await asyncio.sleep(self.probe.period)
