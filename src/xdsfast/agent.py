"""The agent's xDS side wired together: relay, engines, DNS table, metrics."""

from __future__ import annotations

import asyncio
import signal

from xdsfast import log
from xdsfast.bootstrap import grpc_bootstrap, write_grpc_bootstrap
from xdsfast.config import Config
from xdsfast.dns.table import DnsTable
from xdsfast.engines.grpcio import DialSettings, GrpcioDialer, GrpcioServer, ServerSettings
from xdsfast.intercept import Interceptor, NameTableInterceptor
from xdsfast.metrics import Metrics
from xdsfast.relay import Relay

_log = log.scope("xdsproxy")


class Agent:
    """What ``xdsfast run`` runs: Envoy's xDS server, relayed to istiod."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.dns_table = DnsTable()
        interceptors: list[Interceptor] = []
        if config.dns_enabled:
            interceptors.append(NameTableInterceptor(self.dns_table))
        dialer = GrpcioDialer(
            DialSettings(
                target=config.discovery_address,
                tls=config.tls,
                token_path=config.token_path,
                keepalive_interval=config.keepalive_interval,
                keepalive_timeout=config.keepalive_timeout,
            )
        )
        self.relay = Relay(
            dialer,
            self.metrics,
            interceptors=interceptors,
            cluster_id=config.cluster_id,
            xds_headers=config.xds_headers,
        )
        self.server = GrpcioServer(
            self.relay.handle,
            ServerSettings(
                max_recv_msg_size=config.max_recv_msg_size,
                max_concurrent_streams=config.max_concurrent_streams,
                keepalive_interval=config.keepalive_interval,
                keepalive_timeout=config.keepalive_timeout,
            ),
        )

    async def start(self) -> None:
        """Listen for Envoy; raises OSError when a listener cannot be set up."""
        c = self.config
        await self.server.start(c.xds_socket, c.xds_listen)
        if c.grpc_bootstrap:
            document = grpc_bootstrap(c.xds_socket, c.node_id, dict(c.node_metadata))
            write_grpc_bootstrap(c.grpc_bootstrap, document)
        where = [f"unix:{c.xds_socket}"]
        if self.server.tcp_port is not None:
            host = c.xds_listen.rpartition(":")[0] if c.xds_listen else ""
            where.append(f"{host}:{self.server.tcp_port}")
        _log.info(
            "xDS proxy serving",
            extra=log.fields(
                listen=",".join(where), upstream=c.discovery_address, dns=c.dns_enabled
            ),
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: Envoy's stream ends with OK (so it reconnects elsewhere or later), upstream
        closes, no new streams; whatever is still running after ``grace`` is cancelled."""
        self.relay.drain()
        await self.server.stop(grace=grace)
        _log.info("xDS proxy stopped")

    async def run_until_signalled(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
