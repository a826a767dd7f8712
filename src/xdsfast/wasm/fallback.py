"""The filter that stands in for a Wasm plugin whose module could not be fetched.

As Istio's agent: an RBAC filter under the plugin's name, allowing everything
when the plugin fails open (stat prefix ``wasm-default-allow``: no rules, the
filter does nothing) and denying everything otherwise (``wasm-default-deny``:
ALLOW rules with no policy match nothing). HTTP plugins get the HTTP RBAC
filter, network plugins the network one.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from xdsfast.wasm import wasm_pb2
from xdsfast.wasm.types import EXTENSION_CONFIG, HTTP_RBAC, NETWORK_RBAC

ALLOW_PREFIX = "wasm-default-allow"
DENY_PREFIX = "wasm-default-deny"


def rbac_config(network: bool, allow: bool) -> any_pb2.Any:
    """The RBAC filter's typed_config."""
    prefix = ALLOW_PREFIX if allow else DENY_PREFIX
    if network:
        net = wasm_pb2.NetworkRbac(stat_prefix=prefix)
        if not allow:
            net.rules.SetInParent()
        return any_pb2.Any(type_url=NETWORK_RBAC, value=net.SerializeToString())
    http = wasm_pb2.HttpRbac(rules_stat_prefix=prefix)
    if not allow:
        http.rules.SetInParent()
    return any_pb2.Any(type_url=HTTP_RBAC, value=http.SerializeToString())


def fallback(name: str, *, network: bool, allow: bool) -> any_pb2.Any:
    """The ECDS resource (a TypedExtensionConfig named ``name``) to send instead."""
    config = wasm_pb2.TypedExtensionConfig(name=name, typed_config=rbac_config(network, allow))
    return any_pb2.Any(type_url=EXTENSION_CONFIG, value=config.SerializeToString())
