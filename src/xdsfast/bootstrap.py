"""The gRPC xDS bootstrap for proxyless gRPC clients, as Istio's agent writes it.

A gRPC application in the pod finds it through ``GRPC_XDS_BOOTSTRAP`` and
reaches xdsfast on the same Unix socket as Envoy (gRFC A27 format).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from xdsfast.files import write_atomically


def grpc_bootstrap(
    socket_path: str, node_id: str, metadata: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The bootstrap document: xdsfast's socket, insecure creds, xDS v3, GENERATOR=grpc."""
    return {
        "xds_servers": [
            {
                "server_uri": f"unix://{os.path.abspath(socket_path)}",
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {
            "id": node_id,
            "metadata": {**(metadata or {}), "GENERATOR": "grpc"},
            "locality": {},
        },
        # How gRPC xDS servers name their inbound listeners in Istio.
        "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
    }


def write_grpc_bootstrap(path: str, document: Mapping[str, Any]) -> None:
    """Write the bootstrap whole (gRPC applications may read it at any moment)."""
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())
