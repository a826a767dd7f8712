"""Socket-file handling shared by the engines (no grpcio import)."""

from __future__ import annotations

import os
import stat


def prepare_socket_path(path: str) -> None:
    """Create the parent directory and remove a stale socket, as Istio's agent does."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o750, exist_ok=True)
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OSError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
