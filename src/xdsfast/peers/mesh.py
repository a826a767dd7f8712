"""Sample xDS resources: a one-service mesh, pushes and failures, and bulk data.

``sample_mesh`` gives Envoy everything it needs to route ``127.0.0.1:LISTENER``
to the sample backend, entirely over ADS (as Istio does). ``direct_route`` and
``bad_route`` let tests see a push take effect, or be rejected, through HTTP.
``big_cds``/``small_eds`` are sized like a large Istio mesh for benchmarks.
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from xdsfast import nds_pb2
from xdsfast.typeurls import CLUSTER, ENDPOINT, LISTENER, NAME_TABLE, ROUTE

LISTENER_NAME = "demo_listener"
ROUTE_NAME = "local_route"
CLUSTER_NAME = "backend"
STAT_PREFIX = "demo_http"

Mesh = dict[str, dict[str, Message]]


def _any(msg: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _ads() -> config_source_pb2.ConfigSource:
    """``{ads: {}, initial_fetch_timeout: 0s, resource_api_version: V3}``, as Istio writes it."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        initial_fetch_timeout=duration_pb2.Duration(seconds=0),
        resource_api_version=config_source_pb2.V3,
    )


def _socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


# ----- the sample mesh -----------------------------------------------------------


def listener(
    port: int, *, name: str = LISTENER_NAME, route_name: str = ROUTE_NAME
) -> listener_pb2.Listener:
    """HTTP listener on 127.0.0.1:``port`` whose routes come over ADS (RDS)."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=STAT_PREFIX,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    chain = listener_components_pb2.FilterChain(
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager", typed_config=_any(manager)
            )
        ]
    )
    return listener_pb2.Listener(
        name=name, address=_socket("127.0.0.1", port), filter_chains=[chain]
    )


def route(cluster: str = CLUSTER_NAME, *, name: str = ROUTE_NAME) -> route_pb2.RouteConfiguration:
    """Route everything (``/``) to ``cluster``."""
    return _route_config(
        name,
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            route=route_components_pb2.RouteAction(cluster=cluster),
        ),
    )


def direct_route(
    body: str = "v2", *, name: str = ROUTE_NAME, status: int = 200
) -> route_pb2.RouteConfiguration:
    """Answer every request from Envoy itself with ``body``: a push visible through HTTP."""
    return _route_config(
        name,
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=route_components_pb2.DirectResponseAction(
                status=status, body=base_pb2.DataSource(inline_string=body)
            ),
        ),
    )


def bad_route(*, name: str = ROUTE_NAME) -> route_pb2.RouteConfiguration:
    """A route Envoy rejects (NACKs): two virtual hosts both claim the ``*`` domain.

    It is well-formed protobuf and passes field validation, so the rejection
    comes from Envoy's semantic check, as most real-world NACKs do.
    """
    config = route(name=name)
    twin = route_components_pb2.VirtualHost()
    twin.CopyFrom(config.virtual_hosts[0])
    twin.name = "duplicate"
    config.virtual_hosts.append(twin)
    return config


def _route_config(name: str, rule: route_components_pb2.Route) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name="all", domains=["*"], routes=[rule])],
    )


def eds_cluster(name: str = CLUSTER_NAME) -> cluster_pb2.Cluster:
    """A cluster whose endpoints come over ADS (EDS)."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
    )


def endpoints(
    port: int, *, cluster: str = CLUSTER_NAME, host: str = "127.0.0.1"
) -> endpoint_pb2.ClusterLoadAssignment:
    """One endpoint, ``host:port``, for ``cluster``."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_socket(host, port))
                    )
                ]
            )
        ],
    )


def proxyless_mesh(service: str, port: int) -> Mesh:
    """What a proxyless gRPC client needs for ``xds:///<service>``: an API listener named
    after the service (routes over RDS), its route, an EDS cluster and one endpoint."""
    route_name, cluster = f"{service}-route", f"{service}-cluster"
    manager = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_name),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    api = listener_pb2.Listener(
        name=service, api_listener=api_listener_pb2.ApiListener(api_listener=_any(manager))
    )
    rule = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=""),
        route=route_components_pb2.RouteAction(cluster=cluster),
    )
    assignment = endpoints(port, cluster=cluster)
    for group in assignment.endpoints:  # gRPC's xDS client wants weighted localities
        group.locality.region = "local"
        group.load_balancing_weight.value = 1
    return {
        CLUSTER: {cluster: eds_cluster(cluster)},
        ENDPOINT: {cluster: assignment},
        LISTENER: {service: api},
        ROUTE: {route_name: _route_config(route_name, rule)},
    }


def sample_name_table() -> nds_pb2.NameTable:
    """A small Istio NameTable: one Kubernetes service, one ServiceEntry host."""
    table = nds_pb2.NameTable()
    table.table["backend.default.svc.cluster.local"].CopyFrom(
        nds_pb2.NameTable.NameInfo(
            ips=["10.0.0.1"], registry="Kubernetes", shortname="backend", namespace="default"
        )
    )
    table.table["api.example.com"].CopyFrom(
        nds_pb2.NameTable.NameInfo(ips=["240.240.0.1", "2001:2::1"], registry="External")
    )
    return table


def sample_mesh(*, listener_port: int, backend_port: int, name_table: bool = True) -> Mesh:
    """Everything for ``127.0.0.1:listener_port`` → backend at ``127.0.0.1:backend_port``.

    Keyed by type URL, in push order (CDS, EDS, LDS, RDS, NDS): ready for
    :meth:`ControlPlane.set_mesh`.
    """
    mesh: Mesh = {
        CLUSTER: {CLUSTER_NAME: eds_cluster()},
        ENDPOINT: {CLUSTER_NAME: endpoints(backend_port)},
        LISTENER: {LISTENER_NAME: listener(listener_port)},
        ROUTE: {ROUTE_NAME: route()},
    }
    if name_table:
        mesh[NAME_TABLE] = {"": sample_name_table()}
    return mesh


# ----- bulk data for benchmarks ----------------------------------------------------

_MAX = wrappers_pb2.UInt32Value(value=4294967295)


def big_cluster_name(i: int) -> str:
    """Istio's outbound cluster name for service number ``i``."""
    return f"outbound|8080||svc-{i:05d}.ns-{i % 50:02d}.svc.cluster.local"


def _big_cluster(i: int) -> cluster_pb2.Cluster:
    """One Istio-like outbound cluster (~1.25 kB serialized) that stock Envoy accepts."""
    name = big_cluster_name(i)
    svc, ns = f"svc-{i:05d}", f"ns-{i % 50:02d}"
    host = f"{svc}.{ns}.svc.cluster.local"
    tls = tls_pb2.UpstreamTlsContext(
        sni=f"outbound_.8080_._.{host}",
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_params=tls_common_pb2.TlsParameters(
                tls_minimum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_2,
                tls_maximum_protocol_version=tls_common_pb2.TlsParameters.TLSv1_3,
                cipher_suites=["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384"],
            ),
            alpn_protocols=["istio-peer-exchange", "istio"],
        ),
    )
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            idle_timeout=duration_pb2.Duration(seconds=3600),
            max_connection_duration=duration_pb2.Duration(seconds=1800),
            max_requests_per_connection=wrappers_pb2.UInt32Value(value=1024),
        ),
        upstream_http_protocol_options=protocol_pb2.UpstreamHttpProtocolOptions(
            auto_sni=True, auto_san_validation=True
        ),
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        ),
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=_ads(), service_name=name
        ),
        connect_timeout=duration_pb2.Duration(seconds=10),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_connections=_MAX,
                    max_pending_requests=_MAX,
                    max_requests=_MAX,
                    max_retries=_MAX,
                    track_remaining=True,
                )
            ]
        ),
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            locality_weighted_lb_config=cluster_pb2.Cluster.CommonLbConfig.LocalityWeightedLbConfig()
        ),
        metadata=base_pb2.Metadata(
            filter_metadata={
                "istio": _struct(
                    {
                        "services": [{"host": host, "name": svc, "namespace": ns}],
                        "default_original_port": 8080,
                        "config": f"/apis/networking.istio.io/v1/namespaces/{ns}/{svc}",
                        "subset": "",
                        "alt_stat_name": f"outbound|8080||{host};",
                    }
                )
            }
        ),
        transport_socket_matches=[
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-istio",
                match=_struct({"tlsMode": "istio"}),
                transport_socket=base_pb2.TransportSocket(
                    name="envoy.transport_sockets.tls", typed_config=_any(tls)
                ),
            ),
            cluster_pb2.Cluster.TransportSocketMatch(
                name="tlsMode-disabled",
                match=_struct({}),
                transport_socket=base_pb2.TransportSocket(
                    name="envoy.transport_sockets.raw_buffer",
                    typed_config=_any(raw_buffer_pb2.RawBuffer()),
                ),
            ),
        ],
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(protocol)
        },
        alt_stat_name=f"outbound_8080__{host}",
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=32768),
        outlier_detection=outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=wrappers_pb2.UInt32Value(value=5),
            interval=duration_pb2.Duration(seconds=10),
            base_ejection_time=duration_pb2.Duration(seconds=30),
            max_ejection_percent=wrappers_pb2.UInt32Value(value=100),
            enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=0),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
        ),
        upstream_connection_options=cluster_pb2.UpstreamConnectionOptions(
            tcp_keepalive=address_pb2.TcpKeepalive(
                keepalive_time=wrappers_pb2.UInt32Value(value=300)
            )
        ),
    )


def big_cds(n_clusters: int = 4000) -> dict[str, cluster_pb2.Cluster]:
    """``n_clusters`` Istio-like outbound clusters (~5 MB serialized for 4000)."""
    return {big_cluster_name(i): _big_cluster(i) for i in range(n_clusters)}


def small_eds(i: int) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints of ``big_cluster_name(i)`` (~230 bytes), on loopback addresses only."""
    svc, ns = f"svc-{i:05d}", f"ns-{i % 50:02d}"
    metadata = base_pb2.Metadata(
        filter_metadata={
            "envoy.transport_socket_match": _struct({"tlsMode": "istio"}),
            "istio": _struct({"workload": f"{svc}-v1;{ns};{svc};v1;Kubernetes"}),
        }
    )
    lb_endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=_socket(f"127.1.{i // 250 % 250}.{i % 250 + 1}", 8080)
        ),
        health_status=health_check_pb2.HEALTHY,
        metadata=metadata,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
    )
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=big_cluster_name(i),
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="us-east1", zone="us-east1-b"),
                lb_endpoints=[lb_endpoint],
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
        ],
    )


# ----- big pushes, built as wire bytes -----------------------------------------------------


def _field(number: int, size: int) -> bytes:
    """The tag and length of a length-delimited field whose payload follows separately."""
    from xdsfast import wire

    return wire.varint(number << 3 | 2) + wire.varint(size)


def _padded_cluster(i: int) -> cluster_pb2.Cluster:
    """Istio's outbound cluster ``i`` as a STATIC cluster without endpoints: Envoy takes
    it at once (no EDS to wait for, nothing to connect to)."""
    name = big_cluster_name(i)
    svc, ns = f"svc-{i:05d}", f"ns-{i % 50:02d}"
    host = f"{svc}.{ns}.svc.cluster.local"
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=10),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name),
        metadata=base_pb2.Metadata(
            filter_metadata={
                "istio": _struct(
                    {
                        "services": [{"host": host, "name": svc, "namespace": ns}],
                        "default_original_port": 8080,
                    }
                )
            }
        ),
        alt_stat_name=f"outbound_8080__{host}",
    )


def big_cds_response(
    size: int,
    *,
    clusters: int = 400,
    first: int = 0,
    delta: bool = False,
    version: str = "big",
    nonce: str = "big",
) -> bytes:
    """A serialized CDS response (SotW, or ``delta``) of about ``size`` bytes, for
    :meth:`.controlplane.ControlPlane.push_bytes`: ``clusters`` unique clusters named
    ``big_cluster_name(first ...)``, each carrying an equal share of ``size`` as filter
    metadata (``xdsfast.pad``), so Envoy parses the bytes but builds few clusters.

    Fields come in istiod's order (resources before type_url and nonce). The padding is
    serialized once and shared: a second ``metadata`` field that protobuf merges into
    the cluster's, so the only big allocation is the result (a 200 MB push costs 200 MB).
    """
    from xdsfast import wire  # (here: the peers load no compiled core unless they build this)

    share = max(0, size // max(1, clusters) - 300)
    pad = struct_pb2.Struct()
    pad["pad"] = "x" * share
    padding = cluster_pb2.Cluster(
        metadata=base_pb2.Metadata(filter_metadata={"xdsfast.pad": pad})
    ).SerializeToString()
    del pad
    type_url = wire.length_delimited(1, CLUSTER.encode())
    parts: list[bytes] = []
    for i in range(first, first + clusters):
        own = _padded_cluster(i).SerializeToString()
        body = len(own) + len(padding)
        any_head = type_url + _field(2, body)  # Any: type_url, value
        packed = len(any_head) + body
        if delta:  # Resource: version, resource (the Any), name
            named = wire.length_delimited(1, version.encode())
            tail = wire.length_delimited(3, big_cluster_name(i).encode())
            resource = len(named) + len(_field(2, packed)) + packed + len(tail)
            parts += (_field(2, resource), named, _field(2, packed), any_head, own, padding, tail)
        else:
            parts += (_field(2, packed), any_head, own, padding)
    head = wire.length_delimited(1, version.encode())  # version_info / system_version_info
    end = wire.length_delimited(4, CLUSTER.encode()) + wire.length_delimited(5, nonce.encode())
    return b"".join([head, *parts, end])


def big_name_table(hosts: int, *, first_ip: str = "10.1") -> nds_pb2.NameTable:
    """A NameTable of ``hosts`` Kubernetes services (about 80 bytes each on the wire), the
    one numbered ``i`` at ``{first_ip}.{i // 250}.{i % 250 + 1}``."""
    table = nds_pb2.NameTable()
    for i in range(hosts):
        svc, ns = f"svc-{i:05d}", f"ns-{i % 50:02d}"
        info = table.table[f"{svc}.{ns}.svc.cluster.local"]
        info.ips.append(f"{first_ip}.{i // 250 % 256}.{i % 250 + 1}")
        info.registry = "Kubernetes"
        info.shortname = svc
        info.namespace = ns
    return table
