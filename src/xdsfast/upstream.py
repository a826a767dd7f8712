"""What it takes to reach istiod, read fresh for every new upstream connection.

Engine-neutral: the root CA, client certificate and bearer token as bytes and
strings.  Reading them at each dial is what makes rotated files apply without
a restart, as in Istio's agent.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from xdsfast import log
from xdsfast.config import SYSTEM_ROOTS, TlsFiles
from xdsfast.engines import DialError

_log = log.scope("xdsproxy")


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for one handshake."""

    root_ca: bytes | None  # None: gRPC's own default roots (no system bundle found)
    server_name: str
    client_key: bytes | None = None
    client_cert: bytes | None = None


def _system_roots() -> bytes | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate:
            try:
                with open(candidate, "rb") as pem:
                    return pem.read()
            except OSError:
                continue
    return None


def load_tls(files: TlsFiles) -> TlsMaterial:
    """Read the TLS files now; a missing root CA fails the dial (DialError)."""
    if files.root_ca == SYSTEM_ROOTS:
        root = _system_roots()
    else:
        try:
            with open(files.root_ca, "rb") as pem:
                root = pem.read()
        except OSError as exc:
            reason = f"cannot read istiod's root CA {files.root_ca}: {exc.strerror}"
            raise DialError(reason) from None
    key = cert = None
    if files.client_key and files.client_cert:
        try:
            with open(files.client_key, "rb") as k, open(files.client_cert, "rb") as c:
                key, cert = k.read(), c.read()
        except OSError as exc:
            # As Istio: no usable client certificate means none is sent (the token may do).
            _log.warning("no client certificate for istiod: %s: %s", exc.filename, exc.strerror)
    return TlsMaterial(root, files.server_name, key, cert)


def bearer_token(path: str | None) -> str | None:
    """The token from ``path`` (re-read at every stream); None when there is none."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as token_file:
            token = token_file.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None
