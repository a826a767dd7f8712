"""Files the agent reads from others (token, TLS material) and writes for others to read
(bootstrap, trust bundle).

What others leave at a path is not trusted to be a small regular file: a FIFO would block
the event loop on ``open``, ``/dev/zero`` would fill the memory. Reads here open with
``O_NONBLOCK``, accept regular files only (checked with ``fstat`` on the opened file, so a
swap after the check changes nothing) and stop at a size limit; what is wrong is said in
one exact line (:class:`FileProblem`).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile

__all__ = ["FileProblem", "check_regular", "read_regular", "size_text", "write_atomically"]


class FileProblem(ValueError):
    """A file that cannot be used; the message says which and why, in one line."""


def size_text(size: int) -> str:
    """``65536`` -> ``64 KiB`` (limits in messages)."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def _kind(mode: int) -> str | None:
    """What is wrong with a file of this type; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    return "is not a regular file"  # FIFO, socket, character or block device


def _os_problem(exc: OSError) -> str:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "does not exist"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot be read: {exc.strerror or exc}"


def check_regular(path: str, what: str) -> None:
    """Raise :class:`FileProblem` unless ``path`` is a regular file (``stat`` only: a FIFO
    is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FileProblem(f"{what} {path} {_os_problem(exc)}") from None
    problem = _kind(mode)
    if problem is not None:
        raise FileProblem(f"{what} {path} {problem}")


def read_regular(path: str, what: str, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Never blocks on a FIFO or a device and never reads more than ``limit`` + 1 bytes.
    Raises FileNotFoundError when nothing is there (callers decide whether that is an
    error), :class:`FileProblem` for anything else wrong, ``what`` naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(errno.ENOENT, "does not exist", path) from None
    except OSError as exc:
        raise FileProblem(f"{what} {path} {_os_problem(exc)}") from None
    try:
        info = os.fstat(fd)
        problem = _kind(info.st_mode)
        if problem is None and info.st_size > limit:
            problem = f"is over {size_text(limit)}"
        if problem is not None:
            raise FileProblem(f"{what} {path} {problem}")
        chunks: list[bytes] = []
        left = limit + 1  # one more than allowed: a file that grew after fstat is noticed
        while left > 0 and (chunk := os.read(fd, min(left, 64 * 1024))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise FileProblem(f"{what} {path} {_os_problem(exc)}") from None
    finally:
        os.close(fd)
    if left <= 0:
        raise FileProblem(f"{what} {path} is over {size_text(limit)}")
    return b"".join(chunks)


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so a reader never sees half a file; create the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
