"""Durable file operations: the one home of fsync, atomic replacement and
checksums of whole files.

One error policy: every function raises :class:`OSError` when the system
call fails, including the fsync of a directory.  A caller that chooses to
ignore one must catch it and say why in a comment.
"""

from __future__ import annotations

import hashlib
import os
import secrets

__all__ = [
    "append_line",
    "atomic_write",
    "fsync_dir",
    "fsync_file",
    "sha256_file",
]

PathLike = str | os.PathLike[str]

_CHUNK = 1 << 20


def fsync_file(path: PathLike) -> None:
    """fsync the file ``path`` (its data and size)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """fsync the directory ``path`` (its entries: creations, renames, removals)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def atomic_write(path: PathLike, data: bytes | str, *, mode: int = 0o666,
                 keep: PathLike | None = None) -> None:
    """Replace ``path`` by ``data``, atomically and durably.

    ``data`` is written to a new temporary file beside ``path``
    (``.<name>.<random>.tmp``), fsync'ed, renamed over ``path``, then the
    directory is fsync'ed.  A file replaced keeps its permissions; a new one
    gets ``mode`` (minus the umask).  With ``keep``, the file replaced is
    first hard-linked there (it must not exist): the original stays, whole,
    under that name.  ``str`` data is written as UTF-8.  On failure the
    temporary file is removed and ``path`` is unchanged.
    """
    name = os.fspath(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        kept_mode: int | None = os.stat(name).st_mode & 0o7777
    except FileNotFoundError:
        kept_mode = None
    directory = _parent(name)
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(name)}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if kept_mode is not None:
                os.fchmod(f.fileno(), kept_mode)
            os.fsync(f.fileno())
        if keep is not None:
            os.link(name, keep)
        os.replace(tmp, name)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def append_line(path: PathLike, line: str) -> None:
    """Append one line to ``path`` (created if needed, with its directory),
    durably: the file is fsync'ed, and so is its directory.  A new line is
    started first if the file does not end with one."""
    name = os.fspath(path)
    os.makedirs(_parent(name), exist_ok=True)
    fd = os.open(name, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        data = line.encode() + b"\n"
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        while written < len(data):  # short writes are rare on regular files
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(_parent(name))


def sha256_file(path: PathLike, length: int | None = None) -> str:
    """The SHA-256 (hex) of the file ``path``, or of its first ``length``
    bytes (fewer if the file is shorter)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left is None or left > 0:
            chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()
