"""Every xDS type URL xdsfast names, in one leaf module (imports nothing).

The relay's compiled per-message path reads these, so this module must stay
free of protobuf and of the DNS table: importing it costs nothing.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "type.googleapis.com/"
ENVOY_PREFIX: Final = PREFIX + "envoy."  # with WORKLOAD, what may reach Envoy

# Envoy's resources.
LISTENER: Final = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET: Final = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
EXTENSION_CONFIG: Final = PREFIX + "envoy.config.core.v3.TypedExtensionConfig"  # ECDS
# The wrapper a resource may come in (TTL, on-demand): not the type of what it wraps.
RESOURCE_WRAPPER: Final = PREFIX + "envoy.service.discovery.v3.Resource"

# Istio's own: consumed by the agent (or, WORKLOAD, forwarded to ztunnel-style clients).
NAME_TABLE: Final = PREFIX + "istio.networking.nds.v1.NameTable"
PROXY_CONFIG: Final = PREFIX + "istio.mesh.v1alpha1.ProxyConfig"
HEALTH: Final = PREFIX + "istio.v1.HealthInformation"
WORKLOAD: Final = PREFIX + "istio.workload.Workload"

# Inside ECDS: the Wasm filters the agent converts, and what it may put in their place.
HTTP_WASM: Final = PREFIX + "envoy.extensions.filters.http.wasm.v3.Wasm"
NETWORK_WASM: Final = PREFIX + "envoy.extensions.filters.network.wasm.v3.Wasm"
HTTP_RBAC: Final = PREFIX + "envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC: Final = PREFIX + "envoy.extensions.filters.network.rbac.v3.RBAC"
TYPED_STRUCTS: Final = frozenset(
    {PREFIX + "udpa.type.v1.TypedStruct", PREFIX + "xds.type.v3.TypedStruct"}
)

#: Short names for logs and the demo's narration.
SHORT: Final = {
    LISTENER: "LDS Listener",
    ROUTE: "RDS RouteConfiguration",
    CLUSTER: "CDS Cluster",
    ENDPOINT: "EDS Endpoints",
    NAME_TABLE: "NDS NameTable",
}
