"""Types the agent consumes itself instead of forwarding: NameTable, ProxyConfig, health.

For each: the request the agent makes after Envoy's first LDS request, how a
response is applied, and the ACK or NACK the agent sends upstream for it.
Only these responses are ever decoded; everything else stays opaque bytes.
protobuf is imported where a message is built or decoded, so an agent that consumes
nothing (DNS and PCDS off) never loads it (~4 MB of its idle RSS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from xdsfast import wire
from xdsfast.dns.table import DnsTable, accepted
from xdsfast.engines import Mode
from xdsfast.files import write_atomically
from xdsfast.typeurls import ENVOY_PREFIX, HEALTH, NAME_TABLE, PROXY_CONFIG, WORKLOAD

INTERNAL = 13  # google.rpc.Code.INTERNAL, what Istio's agent NACKs with


def is_forwarded(type_url: str) -> bool:
    """Istio's allow-list of what may reach Envoy."""
    return type_url.startswith(ENVOY_PREFIX) or type_url == WORKLOAD


def subscribe(mode: Mode, type_url: str) -> bytes:
    """The agent's own wildcard request for a type (no node: Envoy's first message had it)."""
    from xdsfast import xds_pb2

    if mode is Mode.SOTW:
        return xds_pb2.DiscoveryRequest(type_url=type_url).SerializeToString()
    return xds_pb2.DeltaDiscoveryRequest(type_url=type_url).SerializeToString()


def acknowledge(
    mode: Mode,
    type_url: str,
    version: str,
    nonce: str,
    error: str | None,
    names: Sequence[str] = (),
) -> bytes:
    """An ACK, or a NACK with error_detail (code 13) when ``error`` is given.

    ``names``: a SotW request restates its subscription, so a NACK made on Envoy's
    behalf carries Envoy's names (an empty list would mean "everything")."""
    from xdsfast import xds_pb2

    request: xds_pb2.DiscoveryRequest | xds_pb2.DeltaDiscoveryRequest
    if mode is Mode.SOTW:
        request = xds_pb2.DiscoveryRequest(
            version_info=version, type_url=type_url, response_nonce=nonce, resource_names=names
        )
    else:
        request = xds_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
    if error is not None:
        request.error_detail.code = INTERNAL
        request.error_detail.message = error
    return request.SerializeToString()


class Rejected(Exception):
    """A response the agent cannot pass on as it is: NACKed upstream, never forwarded."""


class Rewriter(Protocol):
    """A type the agent rewrites before Envoy sees it (ECDS Wasm: remote code -> local file)."""

    type_url: str

    async def rewrite(self, mode: Mode, data: bytes) -> bytes:
        """The response to forward (``data`` itself when nothing changes); raise Rejected."""


def health_request(mode: Mode, error: str | None) -> bytes:
    """The agent's report of the workload's health: error_detail (code 13) when unhealthy."""
    from xdsfast import xds_pb2

    request: xds_pb2.DiscoveryRequest | xds_pb2.DeltaDiscoveryRequest
    if mode is Mode.SOTW:
        request = xds_pb2.DiscoveryRequest(type_url=HEALTH)
    else:
        request = xds_pb2.DeltaDiscoveryRequest(type_url=HEALTH)
    if error is not None:
        request.error_detail.code = INTERNAL
        request.error_detail.message = error
    return request.SerializeToString()


class Interceptor(Protocol):
    """One type the agent consumes."""

    type_url: str

    def apply(self, value: bytes, version: str) -> None:
        """Apply the first resource's bytes; raise ValueError to NACK."""


class NameTableInterceptor:
    """NameTable (NDS) pushes feed the DNS table."""

    type_url = NAME_TABLE

    def __init__(self, table: DnsTable) -> None:
        self.table = table

    def apply(self, value: bytes, version: str) -> None:
        """The verdict is protobuf's, without a decode on the loop when the compiled
        check is sure (a 100k-host decode is 60-90 ms); the table keeps the bytes."""
        from google.protobuf.message import DecodeError

        from xdsfast.nds_pb2 import NameTable

        if not accepted(value):
            try:
                NameTable.FromString(value)
            except DecodeError as exc:
                raise ValueError(f"cannot decode NameTable: {exc}") from exc
        self.table.update(value, version)


class ProxyConfigInterceptor:
    """ProxyConfig (PCDS) pushes: istiod's extra CA certificates, written as a trust bundle."""

    type_url = PROXY_CONFIG

    def __init__(self, trust_bundle: str) -> None:
        self.trust_bundle = trust_bundle

    def apply(self, value: bytes, version: str) -> None:
        from google.protobuf.message import DecodeError

        from xdsfast import xds_pb2

        try:
            config = xds_pb2.ProxyConfig.FromString(value)
        except DecodeError as exc:
            raise ValueError(f"cannot decode ProxyConfig: {exc}") from exc
        bundle = "".join(
            pem if pem.endswith("\n") else pem + "\n" for pem in config.ca_certificates_pem
        )
        try:
            write_atomically(self.trust_bundle, bundle.encode())
        except OSError as exc:
            raise ValueError(f"cannot write the trust bundle {self.trust_bundle}: {exc}") from exc


def first_resource(mode: Mode, data: bytes) -> tuple[str, bytes] | None:
    """(type_url, value) of the response's first resource; None if it has none.

    Raises ValueError if the response cannot be decoded.
    """
    from google.protobuf.message import DecodeError

    from xdsfast import xds_pb2

    try:
        if mode is Mode.SOTW:
            response = xds_pb2.DiscoveryResponse.FromString(data)
            if not response.resources:
                return None
            first = response.resources[0]
        else:
            delta = xds_pb2.DeltaDiscoveryResponse.FromString(data)
            if not delta.resources:
                return None
            first = delta.resources[0].resource
    except DecodeError as exc:
        raise ValueError(f"cannot decode response: {exc}") from exc
    return first.type_url, first.value


def consume(
    interceptor: Interceptor, mode: Mode, data: bytes, version: str, nonce: str
) -> tuple[bytes | None, str | None]:
    """Apply a response of an intercepted type.

    Returns (the ACK/NACK to send upstream, the error if it was a NACK).  A
    response with no resources is neither applied nor acknowledged, as Istio.
    """
    try:
        first = first_resource(mode, data)
        if first is None:
            return None, None
        type_url, value = first
        if type_url != interceptor.type_url:
            raise ValueError(f"unexpected resource type {type_url!r}")
        interceptor.apply(value, version)
    except ValueError as exc:
        error = str(exc)
        return acknowledge(mode, interceptor.type_url, version, nonce, error), error
    return acknowledge(mode, interceptor.type_url, version, nonce, None), None


# The node's field in each request (DiscoveryRequest.node = 2, DeltaDiscoveryRequest.node = 1),
# and the metadata Struct's field in envoy.config.core.v3.Node.
_NODE_FIELD = {Mode.SOTW: 2, Mode.DELTA: 1}
_NODE_METADATA_FIELD = 3


def dns_node_metadata(dns_address: str, port: int) -> dict[str, str]:
    """What pilot-agent's bootstrap puts in Envoy's node when its DNS proxy is on: istiod
    allocates ServiceEntry VIPs and points Envoy's dynamic forward proxy at this address only
    for nodes that say so, and with xdsfast serving DNS, pilot-agent's own DNS is off."""
    host = dns_address.rpartition(":")[0] or "localhost"
    return {"DNS_CAPTURE": "true", "DNS_PROXY_ADDR": f"{host}:{port}"}


def node_metadata_patch(mode: Mode, metadata: Mapping[str, str]) -> bytes:
    """Bytes that, appended to a request carrying a node, set ``metadata`` in that node.

    Protobuf parsing merges repeated occurrences of a message field and keeps the last
    entry of a map key, so ``request + patch`` parses as the request whose node metadata
    has these keys replaced and everything else as it was: the request's own bytes are
    never decoded or re-encoded (as a full decode and re-encode would, reordering fields)."""
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(dict(metadata))
    node = wire.length_delimited(_NODE_METADATA_FIELD, struct.SerializeToString())
    return wire.length_delimited(_NODE_FIELD[mode], node)
