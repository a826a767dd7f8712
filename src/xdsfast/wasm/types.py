"""Type URLs of the messages the Wasm conversion reads and writes."""

from __future__ import annotations

_P = "type.googleapis.com/"
EXTENSION_CONFIG = _P + "envoy.config.core.v3.TypedExtensionConfig"  # ECDS
HTTP_WASM = _P + "envoy.extensions.filters.http.wasm.v3.Wasm"
NETWORK_WASM = _P + "envoy.extensions.filters.network.wasm.v3.Wasm"
WASM_TYPES = frozenset({HTTP_WASM, NETWORK_WASM})
TYPED_STRUCTS = frozenset({_P + "udpa.type.v1.TypedStruct", _P + "xds.type.v3.TypedStruct"})
HTTP_RBAC = _P + "envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC = _P + "envoy.extensions.filters.network.rbac.v3.RBAC"
