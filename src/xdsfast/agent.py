"""The agent's xDS side wired together: relay, engines, DNS table, metrics."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from xdsfast import heap, log
from xdsfast.bootstrap import grpc_bootstrap, write_grpc_bootstrap
from xdsfast.config import Config
from xdsfast.dns.table import DnsTable
from xdsfast.engines import Dialer, DialSettings, ServerSettings, StreamHandler
from xdsfast.health import HealthChecker
from xdsfast.intercept import (
    Interceptor,
    NameTableInterceptor,
    ProxyConfigInterceptor,
    dns_node_metadata,
)
from xdsfast.metrics import Count, Metrics, Total
from xdsfast.relay import Relay
from xdsfast.status import StatusServer
from xdsfast.wasm import build_rewriter

if TYPE_CHECKING:
    from xdsfast.dns.proxy import DnsProxy

_log = log.scope("xdsproxy")


class _Server(Protocol):
    tcp_port: int | None

    async def start(self, unix_path: str | None, tcp_address: str | None) -> None: ...

    async def stop(self, grace: float | None = None) -> None: ...


def _engine(config: Config) -> tuple[Dialer, Callable[[StreamHandler], _Server]]:
    """The one place the engine is chosen (``Config.engine``): its dialer and server."""
    c = config
    server_settings = ServerSettings(
        c.max_recv_msg_size,
        c.max_concurrent_streams,
        c.keepalive_interval,
        c.keepalive_timeout,
        c.envoy_send_buffer,
    )
    dial_settings = DialSettings(
        c.discovery_address,
        c.tls,
        c.token_path,
        keepalive_interval=c.keepalive_interval,
        keepalive_timeout=c.keepalive_timeout,
    )
    if c.engine == "fast":  # imported lazily: the other engine's modules stay unloaded
        from xdsfast.engines import fast

        return fast.FastDialer(dial_settings), lambda h: fast.FastServer(h, server_settings)
    from xdsfast.engines import grpcio

    return grpcio.GrpcioDialer(dial_settings), lambda h: grpcio.GrpcioServer(h, server_settings)


class Agent:
    """What ``xdsfast run`` runs: Envoy's xDS server, relayed to istiod."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.dns_table = DnsTable()
        interceptors: list[Interceptor] = []
        if config.dns_enabled:
            interceptors.append(NameTableInterceptor(self.dns_table))
        if config.pcds_enabled:
            interceptors.append(ProxyConfigInterceptor(config.trust_bundle))
        self.dns: DnsProxy | None = None
        if config.dns_enabled:  # imported here: with DNS off, dnslib and the server stay unloaded
            from xdsfast.dns.proxy import DnsProxy

            self.dns = DnsProxy(config, self.dns_table, self.metrics)
        # ECDS: remote Wasm code fetched and served as a local file (Istio's default: on).
        self.wasm = build_rewriter(config, self.metrics) if config.wasm_conversion else None
        dialer, make_server = _engine(config)
        self.relay = Relay(
            dialer,
            self.metrics,
            interceptors=interceptors,
            rewriters=[self.wasm] if self.wasm is not None else [],
            cluster_id=config.cluster_id,
            xds_headers=config.xds_headers,
        )
        self.server = make_server(self.relay.handle)
        self.health = (
            HealthChecker(config.readiness_probe, self.relay.report_health)
            if config.readiness_probe is not None
            else None
        )
        self.serving = False
        self.heap = heap.releaser(config.heap_release_interval)
        self.status = StatusServer(
            ready=self.readiness,
            metrics=self.metrics.exposition,
            ndsz=lambda: self.dns_table.table,
            ndsz_stats=self.dns_table.stats,
            xds=self.relay.debug_state,
        )
        self._expose_hostile()

    def _expose_hostile(self) -> None:
        """xdsfast's own counts of hostile local peers (Istio's agent has none): the fast
        engine's HTTP/2 budgets (process-wide) and the status server's connection budget."""
        register = self.metrics.register
        if self.config.engine == "fast":
            from xdsfast.engines import fast

            peers = Count(
                "xdsfast_hostile_peers_total",
                "HTTP/2 connections or streams ended for spending a budget, by kind: "
                "control_flood, unread_replies, unread_requests, header_limits.",
                label="kind",
            )
            peers.by = fast.HOSTILE.counts  # the engine counts, the scrape reads
            register(peers)
        status = self.status
        register(
            Total(
                "xdsfast_status_connections_evicted_total",
                "Status server connections closed, while waiting for a request, to make room.",
                lambda: status.evicted,
            )
        )
        register(
            Total(
                "xdsfast_status_connections_refused_total",
                "Status server connections refused (503): every connection held was busy.",
                lambda: status.refused,
            )
        )

    def readiness(self) -> str | None:
        """None when ready (``/healthz/ready`` 200), else why not (503)."""
        if not self.serving:
            return "not ready: the xDS proxy is not serving (starting or shutting down)"
        if self.config.dns_enabled and not self.dns_table.ready:
            return "not ready: DNS is on and no NameTable has been received from istiod yet"
        return None

    async def start(self) -> None:
        """Listen for Envoy; raises OSError when a listener cannot be set up."""
        c = self.config
        if self.dns is not None:  # first, as Istio: a DNS failure aborts start-up
            await self.dns.start()
            if c.node_dns_capture and self.dns.server is not None:  # the node says so to istiod
                self.relay.set_node_metadata(dns_node_metadata(c.dns_address, self.dns.server.port))
        try:
            await self.server.start(c.xds_socket, c.xds_listen)
        except BaseException:
            if self.dns is not None:
                await self.dns.stop()
            raise
        try:
            await self.status.start(c.status_address)
        except BaseException:
            await self.server.stop(grace=0)
            if self.dns is not None:
                await self.dns.stop()
            raise
        if c.grpc_bootstrap:
            document = grpc_bootstrap(c.xds_socket, c.node_id, dict(c.node_metadata))
            write_grpc_bootstrap(c.grpc_bootstrap, document)
        where = [f"unix:{c.xds_socket}"]
        if self.server.tcp_port is not None:
            host = c.xds_listen.rpartition(":")[0] if c.xds_listen else ""
            where.append(f"{host}:{self.server.tcp_port}")
        self.serving = True
        if self.health is not None:
            self.health.start()
        if self.wasm is not None:
            self.wasm.start()  # the periodic purge of expired modules
        _log.info(
            "xDS proxy serving",
            extra=log.fields(
                listen=",".join(where), upstream=c.discovery_address, dns=c.dns_enabled
            ),
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: Envoy's stream ends with OK (so it reconnects elsewhere or later), upstream
        closes, no new streams; whatever is still running after ``grace`` is cancelled."""
        self.serving = False
        if self.health is not None:
            await self.health.stop()
        self.relay.drain()
        await self.server.stop(grace=grace)
        self.relay.say.close()  # lines held back by the throttle go out now
        if self.wasm is not None:
            await self.wasm.stop()
        _log.info("xDS proxy stopped")
        if self.dns is not None:
            await self.dns.stop()
        await self.status.stop()

    async def run_until_signalled(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        # What start-up built lives as long as the process: out of the collector's reach,
        # full collections stop walking it during pushes (they were ~15% of a storm's CPU).
        gc.freeze()
        self._hold_freed_memory()
        try:
            await stop.wait()
        finally:
            await self.heap.stop()
            await self.stop()

    def _hold_freed_memory(self) -> None:
        """The process's allocator policy (``heap``): only ``xdsfast run`` owns the process."""
        interval = self.config.heap_release_interval
        if interval > 0 and heap.hold():
            heap.release()  # what start-up left free
            self.heap.start()
            _log.info(
                "freed heap memory is kept for reuse and released periodically",
                extra=log.fields(release_interval=f"{interval:g}s"),
            )
        else:
            why = "off" if interval == 0 else "not glibc, or glibc refused the thresholds"
            _log.debug("allocator policy left as it is", extra=log.fields(reason=why))
