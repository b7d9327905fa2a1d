"""Files: writing secret ones (mode 0600 from creation, never through a planted symlink,
durable), and telling whether a path still names the file opened."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["file_identity", "write_private_file"]


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
