"""The gRPC xDS bootstrap for proxyless gRPC clients, as Istio's agent writes it.

A gRPC application in the pod finds it through ``GRPC_XDS_BOOTSTRAP`` and
reaches xdsfast on the same Unix socket as Envoy (gRFC A27 format).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any


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
    """Write atomically (a reader never sees half a file); create the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".grpc-bootstrap.", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
