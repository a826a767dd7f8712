"""The local DNS proxy assembled from the configuration, as Istio's agent sets it up.

* Listen address (``DNS_PROXY_ADDR``, default ``localhost:15053``): a literal
  ``localhost`` binds ``127.0.0.1`` if resolv.conf has an IPv4 nameserver and
  ``::1`` if it has an IPv6 one (``127.0.0.1`` if it has none); any other host
  is bound as given.  Each address gets a UDP and a TCP listener.
* ``:53`` mode: an address on port 53 as root answers (by forwarding) before
  the first NameTable and prefers ``/var/lib/istio/resolv.conf``; on port 53
  without root it logs an error and falls back to ``localhost:15053``.
* Upstreams: ``--dns-upstream`` if given, else resolv.conf's nameservers
  (port 53).  The resolv.conf search list feeds the CNAME shortcut either way.
"""

from __future__ import annotations

import os

from xdsfast import log
from xdsfast.config import DEFAULT_DNS_ADDRESS, DEFAULT_RESOLV_CONF, Config, split_host_port
from xdsfast.dns import resolvconf
from xdsfast.dns.forward import Forwarder
from xdsfast.dns.handler import Handler
from xdsfast.dns.metrics import DnsMetrics, register_table_builds, register_table_gauges
from xdsfast.dns.names import NameRules
from xdsfast.dns.resolvconf import ResolvConf, is_ipv6
from xdsfast.dns.server import DnsServer
from xdsfast.dns.table import DnsTable
from xdsfast.metrics import Registry

_log = log.scope("dns")

ISTIO_RESOLV_CONF = "/var/lib/istio/resolv.conf"


def port53_mode(address: str, uid: int) -> tuple[str, bool]:
    """(the address to use, whether to answer before the first table)."""
    if not address.endswith(":53"):
        return address, False
    if uid == 0:
        return address, True
    _log.error(
        "DNS proxy on port 53 needs root; falling back",
        extra=log.fields(address=address, fallback=DEFAULT_DNS_ADDRESS),
    )
    return DEFAULT_DNS_ADDRESS, False


def resolv_conf_path(configured: str, port53: bool) -> str:
    if port53 and configured == DEFAULT_RESOLV_CONF and os.path.exists(ISTIO_RESOLV_CONF):
        return ISTIO_RESOLV_CONF
    return configured


def listen_hosts(host: str, resolv: ResolvConf) -> list[str]:
    """The hosts to bind for ``host`` (``localhost`` follows the nameservers' families)."""
    if host != "localhost":
        return [host]
    v6 = [is_ipv6(ns) for ns in resolv.nameservers]
    hosts = []
    if not v6 or not all(v6):
        hosts.append("127.0.0.1")
    if any(v6):
        hosts.append("::1")
    return hosts


class DnsProxy:
    """The DNS side of the agent: answers from ``table``, forwards the rest."""

    def __init__(self, config: Config, table: DnsTable, registry: Registry) -> None:
        self.config = config
        self.table = table
        self.metrics = DnsMetrics(registry)
        register_table_gauges(registry, table.stats)
        register_table_builds(registry, lambda: table.superseded)
        self.server: DnsServer | None = None

    async def start(self) -> None:
        """Read resolv.conf and listen; raises OSError (with a clear message) on failure."""
        c = self.config
        address, before_sync = port53_mode(c.dns_address, os.geteuid())
        path = resolv_conf_path(c.resolv_conf, before_sync)
        resolv = resolvconf.read(path)
        self.table.configure(NameRules(c.pod_namespace, c.domain, resolv.search))
        upstreams = [split_host_port(u) for u in c.dns_upstreams] or list(resolv.upstreams)
        if not upstreams:
            _log.warning(
                "no upstream DNS servers: names outside the table get SERVFAIL",
                extra=log.fields(resolv_conf=path),
            )
        forwarder = Forwarder(
            upstreams, self.metrics, timeout=c.dns_forward_timeout, parallel=c.dns_forward_parallel
        )
        handler = Handler(self.table, self.metrics, respond_before_sync=before_sync)
        server = DnsServer(handler, forwarder, forward_remote=c.dns_forward_remote)
        host, port = split_host_port(address)
        await server.start(listen_hosts(host, resolv), port)
        self.server = server
        _log.info(
            "DNS proxy serving",
            extra=log.fields(
                listen=",".join(
                    f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in server.addresses
                ),
                upstreams=",".join(f"{h}:{p}" for h, p in upstreams),
                parallel=c.dns_forward_parallel,
                search=resolv.search[0] if resolv.search else "",
            ),
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None
        self.table.close()
