"""Type URLs of the messages the Wasm conversion reads and writes (from :mod:`xdsfast.typeurls`)."""

from __future__ import annotations

from xdsfast.typeurls import (
    EXTENSION_CONFIG,
    HTTP_RBAC,
    HTTP_WASM,
    NETWORK_RBAC,
    NETWORK_WASM,
    TYPED_STRUCTS,
)

__all__ = [
    "EXTENSION_CONFIG",
    "HTTP_RBAC",
    "HTTP_WASM",
    "NETWORK_RBAC",
    "NETWORK_WASM",
    "TYPED_STRUCTS",
    "WASM_TYPES",
]

WASM_TYPES = frozenset({HTTP_WASM, NETWORK_WASM})
