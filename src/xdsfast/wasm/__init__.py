"""ECDS Wasm conversion: remote Wasm modules fetched, cached on disk and served to
Envoy as local files, as Istio's agent does (``ISTIO_AGENT_ENABLE_WASM_REMOTE_LOAD_CONVERSION``).

Modules: ``types`` (type URLs), ``wasm.proto`` (the messages decoded), ``plugin``
(reading and rewriting one Wasm filter config), ``fetch`` (http/https download),
``cache`` (the on-disk cache), ``fallback`` (the RBAC stand-in), ``metrics``
(``istio_agent_wasm_*``), ``convert`` (the relay's rewriter), ``deferred`` (which
loads the others with the first ECDS response).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xdsfast.config import Config
    from xdsfast.metrics import Metrics
    from xdsfast.wasm.convert import WasmRewriter
    from xdsfast.wasm.deferred import DeferredRewriter


def build_rewriter(config: Config, metrics: Metrics) -> DeferredRewriter:
    """The ECDS rewriter, set up from the configuration.  Its metrics are registered and
    its settings checked now; its cache and protobuf code load with the first ECDS
    response (see :mod:`xdsfast.wasm.deferred`)."""
    from xdsfast.wasm.deferred import DeferredRewriter
    from xdsfast.wasm.fetch import FetchSettings, parse_cidrs
    from xdsfast.wasm.metrics import WasmMetrics

    wasm_metrics = WasmMetrics(metrics)
    settings = FetchSettings(
        attempt_timeout=config.wasm_http_request_timeout,
        max_attempts=config.wasm_http_max_retries,
        max_size=config.wasm_max_binary_size,
        insecure_hosts=config.wasm_insecure_registries,
        blocked=parse_cidrs(",".join(config.wasm_blocked_cidrs)),
    )

    def build() -> WasmRewriter:
        from xdsfast.wasm.cache import ModuleCache
        from xdsfast.wasm.convert import WasmRewriter

        cache = ModuleCache(
            config.wasm_cache_dir,
            settings,
            wasm_metrics,
            expiry=config.wasm_module_expiry,
            purge_interval=config.wasm_purge_interval,
        )
        return WasmRewriter(cache, wasm_metrics)

    return DeferredRewriter(build)
