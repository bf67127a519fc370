"""Durable file writes: what is under its final name is complete and survives a power cut.

Every place that acknowledges data (the SCP's Success, the MRD server's ``job queued``, a folder destination) or
publishes results writes through here: hidden temp file in the target folder, fsync, atomic rename, fsync of the
folder (without the last step a crash can forget the rename).

File permissions (spool, results, job database and outbox hold patient data): :func:`restrict_permissions` sets
the process umask to 027, so everything the node creates -- by this module, SQLite, numpy, pydicom -- is at most
0640 (files) / 0750 (folders), and makes the existing tree so. With ``node.file_group`` the folders also get the
set-group-ID bit (2750) and that group, so files created in them belong to the group (e.g. a backup or viewer
account) without the node having to chown every file.
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import stat
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o640
DIR_MODE = 0o750
UMASK = 0o027


def _gid(group: str | int | None) -> int | None:
    if group is None or group == "":
        return None
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError as e:
        raise ValueError(f"node.file_group: no group called {group!r} on this host (create it or fix the name)") from e


def restrict_permissions(roots: list[Path], group: str | int | None = None) -> int:
    """umask 027 for this process, then every file under ``roots`` at most 0640, every folder 0750 (2750 with a
    group), owned by ``group`` when given. Returns how many entries were changed. Roots are created if missing.

    Why a umask and not a chmod per write: SQLite, numpy and pydicom create files too; the umask covers them all.
    """
    os.umask(UMASK)
    gid = _gid(group)
    dir_mode = DIR_MODE | (stat.S_ISGID if gid is not None else 0)
    changed = 0

    def fix(p: Path, is_dir: bool) -> None:
        nonlocal changed
        try:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                return  # never follow a link out of the spool
            want = dir_mode if is_dir else (stat.S_IMODE(st.st_mode) & FILE_MODE)
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(p, want)
                changed += 1
            if gid is not None and st.st_gid != gid:
                os.chown(p, -1, gid)
                changed += 1
        except OSError as e:  # a file being renamed away right now, or not ours: say so, go on
            log.warning("cannot restrict permissions of %s: %s", p, e)

    for root in roots:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        fix(root, True)
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                fix(Path(dirpath) / d, True)
            for f in filenames:
                fix(Path(dirpath) / f, False)
    if changed:
        log.info(
            "file permissions: %d entries under %s restricted to 0640/0750%s",
            changed,
            ", ".join(map(str, roots)),
            f" (group {group})" if gid is not None else "",
        )
    return changed


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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
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
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
