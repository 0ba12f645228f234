"""Crash-safe files: a file the package writes is either the old one or the whole new one, never half of it.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "a.json"
    >>> write_atomic(target, b"{}") == target.resolve(), target.read_bytes()
    (True, b'{}')
    >>> [p.name for p in target.parent.iterdir()]  # no temporary file is left beside it
    ['a.json']
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PART_SUFFIX = ".part"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: never a half-written file.

    The file gets the usual ``0o666`` minus the umask (0644 with the common umask 022), as ``open()`` would give,
    not ``mkstemp``'s 0600: other users of the machine (a web server, the teacher's account) can read the images.
    Used for every file the package writes that a crash must not leave half-written: images, calibrations.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{PART_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:  # 2**32 names; a clash is as good as impossible, but never overwrite
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.resolve()
