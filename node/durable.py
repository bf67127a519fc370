"""Durable file writes: what is under its final name is complete and survives a power cut.

Every place that acknowledges data (the SCP's Success, the MRD server's ``job queued``, a folder destination) or
publishes results writes through here: hidden temp file in the target folder, fsync, atomic rename, fsync of the
folder (without the last step a crash can forget the rename).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (renames into it); silently skipped where the OS cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably (see module docstring); the temp file is removed on any failure."""
    tmp = _temp_beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def copy_durably(src: Path, final: Path) -> None:
    """Copy ``src`` to ``final`` durably, creating the folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(final)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
