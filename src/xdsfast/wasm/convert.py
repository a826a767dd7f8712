"""The ECDS rewriter: remote Wasm code becomes a local file before Envoy sees it.

Only ECDS responses (``TypedExtensionConfig``) come here. Each resource is
converted concurrently:

* not a Wasm filter, or Wasm with local code: unchanged (``no_remote_load``);
* Wasm with remote http/https code: fetched into the cache and rewritten to the
  local file, with every ``ISTIO_META*`` VM environment key removed (``success``);
* fetch failure (download, checksum, size, timeout, ``oci://``, an empty pull
  secret, a missing ``http_uri``): replaced by an allow-all or deny-all RBAC
  filter of the same name (``fetch_failure`` / ``miss_remote_fetch_hint``),
  never a NACK;
* undecodable, or Wasm with no code at all: the whole response is rejected and
  NACKed upstream (``unmarshal_failure``).

A response where nothing changed is returned as the very bytes received.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from xdsfast import log, xds_pb2
from xdsfast.engines import Mode
from xdsfast.intercept import Rejected
from xdsfast.wasm import wasm_pb2
from xdsfast.wasm.cache import ModuleCache
from xdsfast.wasm.fallback import fallback
from xdsfast.wasm.fetch import FetchError
from xdsfast.wasm.metrics import WasmMetrics
from xdsfast.wasm.plugin import (
    PULL_POLICY,
    PULL_SECRET,
    RESOURCE_VERSION,
    BadConfig,
    NotWasm,
    Plugin,
    read_plugin,
)
from xdsfast.wasm.types import EXTENSION_CONFIG

_log = log.scope("wasm")

DEFAULT_TIMEOUT = 5.0  # when the plugin's http_uri has none


class WasmRewriter:
    """The relay's :class:`~xdsfast.intercept.Rewriter` for ECDS."""

    type_url = EXTENSION_CONFIG

    def __init__(self, cache: ModuleCache, metrics: WasmMetrics) -> None:
        self.cache = cache
        self.metrics = metrics

    async def rewrite(self, mode: Mode, data: bytes) -> bytes:
        started = time.perf_counter()
        try:
            return await self._rewrite(mode, data)
        finally:
            self.metrics.conversion_duration.observe((time.perf_counter() - started) * 1000.0)

    async def _rewrite(self, mode: Mode, data: bytes) -> bytes:
        response: xds_pb2.DiscoveryResponse | xds_pb2.DeltaDiscoveryResponse
        try:
            if mode is Mode.SOTW:
                response = xds_pb2.DiscoveryResponse.FromString(data)
                resources = list(response.resources)
            else:
                response = xds_pb2.DeltaDiscoveryResponse.FromString(data)
                resources = [r.resource for r in response.resources]
        except DecodeError as exc:
            raise Rejected(f"cannot decode the ECDS response: {exc}") from None
        results = await asyncio.gather(
            *(self._convert(resource) for resource in resources), return_exceptions=True
        )
        changed = False
        for resource, result in zip(resources, results, strict=True):
            if isinstance(result, BaseException):
                raise result  # Rejected (a NACK), or a bug
            if result is not None:
                resource.CopyFrom(result)  # the response's own Any, edited in place
                changed = True
        return response.SerializeToString() if changed else data

    async def _convert(self, resource: any_pb2.Any) -> any_pb2.Any | None:
        """The replacement for one resource, or None to keep it as it is."""
        count = self.metrics.conversions.inc_label
        if resource.type_url != EXTENSION_CONFIG:
            count("unmarshal_failure")
            raise Rejected(f"ECDS resource of type {resource.type_url!r}")
        try:
            extension = wasm_pb2.TypedExtensionConfig.FromString(resource.value)
            plugin = read_plugin(extension.typed_config)
        except DecodeError as exc:
            count("unmarshal_failure")
            raise Rejected(f"cannot decode an ECDS TypedExtensionConfig: {exc}") from None
        except NotWasm:
            count("no_remote_load")
            return None
        except BadConfig as exc:
            count("unmarshal_failure")
            raise Rejected(f"extension config {extension.name!r}: {exc}") from None
        name = extension.name
        if plugin.kind == "local":
            count("no_remote_load")
            return None
        if plugin.kind != "remote":
            count("unmarshal_failure")
            raise Rejected(f"Wasm plugin {name!r} has neither remote nor local code")
        fields = log.fields(name=name, url=plugin.url)
        if not plugin.url:
            count("miss_remote_fetch_hint")
            _log.error("Wasm plugin has remote code without an http_uri", extra=fields)
            return self._fallback(name, plugin)
        try:
            path = await self._fetch(name, plugin)
        except FetchError as exc:
            count("fetch_failure")
            _log.error(
                "cannot fetch the Wasm module, using the %s fallback: %s",
                "allow-all" if plugin.fail_open else "deny-all",
                exc,
                extra=fields,
            )
            return self._fallback(name, plugin)
        extension.typed_config.CopyFrom(plugin.localized(str(path)))
        count("success")
        return any_pb2.Any(type_url=EXTENSION_CONFIG, value=extension.SerializeToString())

    async def _fetch(self, name: str, plugin: Plugin) -> Path:
        if PULL_SECRET in plugin.env and not plugin.env[PULL_SECRET]:
            raise FetchError(f"{PULL_SECRET} is set but empty for plugin {name!r}")
        scheme = urlsplit(plugin.url).scheme.lower()
        if scheme not in ("http", "https"):
            self.metrics.unsupported.inc_label(scheme or "none")
            self.metrics.remote_fetches.inc_label("fetch_failure")
            if scheme == "oci":
                raise FetchError(
                    "oci:// Wasm images are not supported by xdsfast (no OCI registry client); "
                    "serve the module over http(s) with a sha256, or use Istio's agent"
                )
            raise FetchError(f"unsupported Wasm module URL scheme {scheme!r}")
        policy = plugin.env.get(PULL_POLICY, "")
        return await self.cache.get(
            plugin.url,
            plugin.sha256,
            timeout=plugin.timeout or DEFAULT_TIMEOUT,
            pull_always=policy == "Always",
            resource_version=plugin.env.get(RESOURCE_VERSION, ""),
        )

    @staticmethod
    def _fallback(name: str, plugin: Plugin) -> any_pb2.Any:
        return fallback(name, network=plugin.network, allow=plugin.fail_open)
