"""What it takes to reach istiod, read fresh for every new upstream connection.

Engine-neutral: the root CA, client certificate and bearer token as bytes and
strings, checked here and turned into the ``ssl.SSLContext`` the fast engine
dials with (grpcio gets the same checked bytes).  Reading them at each dial is
what makes rotated files apply without a restart, as in Istio's agent.

Anything wrong with the root CA or the token (empty, garbage, missing, a
directory, a FIFO, a device, too big) is a :class:`DialError` whose message says
exactly which file and what is wrong: the relay logs it in one line, counts it in
``istio_agent_istiod_connection_failures`` and ends Envoy's stream with
UNAVAILABLE, as for any other failed dial.  An unusable client certificate or key
is, as in Istio's agent, one warning line that says what is wrong, and the dial
goes on without a client certificate (the token may do).  Files are read with
:func:`xdsfast.files.read_regular`: never blocking, never more than a limit.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass, field

from xdsfast import log
from xdsfast.config import SYSTEM_ROOTS, TlsFiles
from xdsfast.engines import DialError
from xdsfast.files import FileProblem, read_regular

__all__ = ["PEM_LIMIT", "TOKEN_LIMIT", "TlsMaterial", "bearer_token", "load_tls"]

TOKEN_LIMIT = 64 * 1024  # a service account JWT is a few KiB
PEM_LIMIT = 1024 * 1024  # a root bundle of a few thousand certificates (Mozilla's: ~220 KiB)

_log = log.scope("xdsproxy")

_TOKEN_BYTES = bytes(range(0x21, 0x7F))  # visible ASCII: what a header value can carry as is
_ROOT_CA = "istiod's root CA"
_CHAIN = "the client certificate chain"
_KEY = "the client key"


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes for one handshake, checked, and the client context made from them."""

    root_ca: bytes | None  # None: the system's default roots (no system bundle found)
    server_name: str
    client_key: bytes | None = None
    client_cert: bytes | None = None
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


class _Encrypted(Exception):
    """The client key wants a passphrase (``ssl`` would otherwise prompt on the terminal)."""


def _refuse_passphrase() -> bytes:
    raise _Encrypted


def _system_roots() -> bytes | None:
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate:
            try:
                return read_regular(candidate, "the system CA bundle", 16 * PEM_LIMIT)
            except (OSError, FileProblem):
                continue
    return None


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = read_regular(path, what, PEM_LIMIT)
    except FileNotFoundError:
        raise FileProblem(f"{what} {path} does not exist") from None
    if not data.strip():
        raise FileProblem(f"{what} {path} is empty")
    if not data.isascii():
        raise FileProblem(f"{what} {path} is not PEM text")
    return data


def load_tls(files: TlsFiles) -> TlsMaterial:
    """Read and check the TLS files now; an unusable root CA fails the dial (DialError)."""
    try:
        return _load_tls(files)
    except FileProblem as exc:
        raise DialError(str(exc)) from None


def _load_tls(files: TlsFiles) -> TlsMaterial:
    system = files.root_ca == SYSTEM_ROOTS
    root = _system_roots() if system else _read_pem(files.root_ca, _ROOT_CA)
    context = _context(files, root, system)
    key = cert = None
    if files.client_key and files.client_cert:
        try:
            cert = _read_pem(files.client_cert, _CHAIN)
            key = _read_pem(files.client_key, _KEY)
            _load_client_cert(context, files, cert, key)
        except FileProblem as exc:
            # As Istio's agent: no usable client certificate means none is sent.
            _log.warning("no client certificate for istiod: %s", exc)
            key = cert = None
            context = _context(files, root, system)  # a failed load may leave half a pair
    return TlsMaterial(root, files.server_name, key, cert, context)


def _context(files: TlsFiles, root: bytes | None, system: bool) -> ssl.SSLContext:
    """A client context that verifies istiod against ``root`` (None: the default roots)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if root is None:
        context.load_default_certs()
        return context
    if system:
        try:
            context.load_verify_locations(cadata=root.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise FileProblem("the system CA bundle cannot be parsed") from None
        return context
    if b"-----BEGIN CERTIFICATE-----" not in root:
        raise FileProblem(f"{_ROOT_CA} {files.root_ca} holds no PEM certificate")
    try:
        context.load_verify_locations(cadata=root.decode("ascii"))
    except (ssl.SSLError, ValueError):
        raise FileProblem(
            f"{_ROOT_CA} {files.root_ca} holds a PEM certificate that cannot be parsed"
        ) from None
    return context


def _load_client_cert(context: ssl.SSLContext, files: TlsFiles, cert: bytes, key: bytes) -> None:
    """``ssl`` loads a certificate and key from files only: the bytes just read and checked
    go to a private temp directory (files ``0600``, created ``O_EXCL``), removed at once, so
    what is loaded is what was checked."""
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise FileProblem(f"{_CHAIN} {files.client_cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise FileProblem(f"{_KEY} {files.client_key} holds no PEM private key")
    try:  # the chain alone first, so a bad certificate and a bad key are told apart
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert.decode("ascii"))
    except (ssl.SSLError, ValueError):
        raise FileProblem(
            f"{_CHAIN} {files.client_cert} holds a PEM certificate that cannot be parsed"
        ) from None
    with tempfile.TemporaryDirectory(prefix="xdsfast-") as directory:
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(directory, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            paths.append(path)
        try:
            context.load_cert_chain(paths[0], paths[1], password=_refuse_passphrase)
        except _Encrypted:
            raise FileProblem(
                f"{_KEY} {files.client_key} is encrypted (a passphrase is not supported)"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise FileProblem(
                    f"{_KEY} {files.client_key} does not match {_CHAIN} {files.client_cert}"
                ) from None
            raise FileProblem(f"{_KEY} {files.client_key} cannot be parsed") from None


def bearer_token(path: str | None) -> str | None:
    """The token from ``path`` (re-read at every stream); None when there is none.

    A missing file means no token (no header), as before; a file that is there but
    cannot be a token (not a regular file, over 64 KiB, unreadable, not printable
    ASCII) fails the dial with a DialError that says so, never quoting the file."""
    if not path:
        return None
    try:
        data = read_regular(path, "the token file", TOKEN_LIMIT)
    except FileNotFoundError:
        return None
    except FileProblem as exc:
        raise DialError(str(exc)) from None
    token = data.strip()
    if not token:
        return None
    if token.translate(None, _TOKEN_BYTES):  # anything left is not printable ASCII
        raise DialError(f"the token file {path} holds bytes a bearer token cannot have")
    return token.decode("ascii")
