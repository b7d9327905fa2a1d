"""Files: writing secret ones (mode 0600 from creation, never through a planted symlink,
durable), telling whether one is readable by others, and whether a path still names the
file opened."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

__all__ = ["exposed_mode", "file_identity", "write_private_file"]


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a fresh 0600 temp file, fsync, rename).

    Raises:
        OSError: when the file cannot be written.
    """
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # never reuse a leftover (its mode, or a symlink planted in its place)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path`` now, ``None`` if there is none: a database
    deleted or replaced under a running server no longer matches what it opened (SQLite in
    WAL mode does not notice, and the writes after it would be lost)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def exposed_mode(path: str | os.PathLike[str]) -> int | None:
    """The permission bits of a private key or secret file that group or others may access
    (POSIX mode ``& 0o077``); ``None`` when they may not, off POSIX, or when the file cannot be
    examined (reading it will say why)."""
    if os.name != "posix":
        return None  # Windows modes do not say who may read a file
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode) or not mode & 0o077:
        return None
    return stat.S_IMODE(mode)
