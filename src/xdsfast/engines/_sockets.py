"""Socket-file handling shared by the engines (no grpcio import)."""

from __future__ import annotations

import contextlib
import os
import stat

DIRECTORY_MODE = 0o750  # SECURITY.md: the directories xdsfast creates for its socket


def _make_directories(directory: str) -> None:
    """Create ``directory`` and any missing parents, each ``0750``.

    ``os.makedirs`` gives its ``mode`` to the last directory only (parents get the
    default ``0777`` less the umask, usually ``0755``); directories that already
    exist keep their mode."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    if parent and parent != directory:
        _make_directories(parent)
    with contextlib.suppress(FileExistsError):  # made meanwhile, or a file: lstat says
        os.mkdir(directory, DIRECTORY_MODE)


def prepare_socket_path(path: str) -> None:
    """Create the parent directory and remove a stale socket, as Istio's agent does."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        _make_directories(parent)
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OSError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
