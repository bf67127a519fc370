"""DICOM UIDs: validation of every UID taken from input, and output UIDs unique to this node.

Validation (security principle "everything from the network is hostile"): a UID from a DICOM dataset or an MRD
header is used as a file name component (spool, folder destination) and copied into output DICOM, so anything that
is not a UID by the grammar of PS3.5 9.1 (digits and dots, no leading zero in a component, at most 64 characters)
must never get that far. :func:`validate_uid` says why a value is refused; :func:`is_valid_uid` is the yes/no.

Node identity: output Series / SOP Instance UIDs used to derive from job id + kind only, and job ids restart at 1 in
every spool, so two nodes (or a reset spool) gave identical UIDs to different patients' maps. Now they derive from

* the node's UID root: ``node.uid_root`` when the site has an organisational root, else a random root made once
  and persisted in ``<spool>/node_identity.json`` (a ``2.25.<uuid>`` value),
* the input's own UIDs (study, series, source instances) and
* job id + output kind,

so a resend of the same job gives the same instances (idempotent at the PACS) while two spools never collide.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

UID_MAX_LEN = 64
# PS3.5 9.1: components of digits, no leading zero unless the component is "0", separated by single dots.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
IDENTITY_FILE = "node_identity.json"


class InvalidUID(ValueError):
    """A value taken from input is not a DICOM UID; the message says what is wrong (without echoing control
    characters)."""


def _shown(value: object) -> str:
    """The value as it may appear in a log / ErrorComment: repr (control characters escaped), shortened."""
    s = repr(str(value))
    return s if len(s) <= 40 else s[:37] + "...'"


def validate_uid(value: object, what: str = "UID") -> str:
    """``value`` as a str when it is a valid DICOM UID; else :class:`InvalidUID` naming ``what`` and the fault.

    Surrounding spaces and a trailing NUL (DICOM pads UI values to even length with NUL) are stripped first;
    anything else that is not digits and dots (``../x``, ``/abs``, ``1.2.3\\n4``) is refused.
    """
    if value is None:
        raise InvalidUID(f"{what} is missing")
    s = str(value).strip(" \x00")
    if not s:
        raise InvalidUID(f"{what} is empty")
    if len(s) > UID_MAX_LEN:
        raise InvalidUID(f"{what} is {len(s)} characters long (at most {UID_MAX_LEN})")
    if not UID_RE.match(s):
        raise InvalidUID(f"{what} {_shown(s)} is not a DICOM UID (digits and dots, no leading zeros)")
    return s


def is_valid_uid(value: object) -> bool:
    try:
        validate_uid(value)
    except InvalidUID:
        return False
    return True


def uuid_uid(u: uuid.UUID) -> str:
    """``2.25.<integer of the UUID>`` (PS3.5 B.2): a UID nobody else issues."""
    return f"2.25.{u.int}"


# ---- node identity ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_root: str | None = None


def load_or_create_root(spool_dir: str | Path, configured: str | None = None) -> str:
    """The node's UID root: ``configured`` (validated, at most 40 characters so derived UIDs have room) or the
    random root persisted in ``<spool>/node_identity.json`` (made on first use, written durably)."""
    if configured:
        root = validate_uid(configured, "node.uid_root")
        if len(root) > 40:
            raise InvalidUID(f"node.uid_root is {len(root)} characters; at most 40 leave room for the suffix")
        return root
    from node.durable import write_durably  # durable imports nothing of ours; late to keep this module light

    path = Path(spool_dir) / IDENTITY_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
        return validate_uid(data.get("uid_root"), f"{path}: uid_root")
    except FileNotFoundError:
        pass
    except (ValueError, OSError, AttributeError) as e:
        # A damaged identity must not silently become a new one: UIDs of resent jobs would change.
        raise InvalidUID(
            f"{path} is damaged ({e}); restore it from backup or delete it to make a new "
            "node identity (resent jobs will then get new UIDs)"
        ) from e
    root = uuid_uid(uuid.uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(
        path,
        json.dumps(
            {"uid_root": root, "note": "random per-node root of output UIDs; keep with the spool"}, indent=1
        ).encode("utf-8"),
    )
    log.info("new node identity: output UIDs derive from %s (%s)", root, path)
    return root


def configure(spool_dir: str | Path, configured: str | None = None) -> str:
    """Set this process's node root (called once by the node at start-up); returns it."""
    global _root
    root = load_or_create_root(spool_dir, configured)
    with _lock:
        _root = root
    return root


def node_root() -> str | None:
    """The root set by :func:`configure`, or None (library use without a node: the CLI's offline tools)."""
    with _lock:
        return _root


def derived_uid(root: str | None, *parts: object) -> str:
    """A UID that depends only on ``root`` and ``parts``.

    ``root`` of the 2.25 form (random node root) or None: ``2.25.<uuid5 of root + parts>`` -- the whole 128 bits
    stay random-looking. Any other root (a site's organisational root): ``<root>.<decimal digest>`` cut to 64
    characters.
    """
    key = "|".join([str(root or "")] + [str(p) for p in parts])
    if not root or root.startswith("2.25."):
        return uuid_uid(uuid.uuid5(uuid.NAMESPACE_OID, key))
    digits = str(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:20], "big"))
    return f"{root}.{digits}"[:UID_MAX_LEN].rstrip(".")


def safe_path_under(root: str | Path, *components: str) -> Path:
    """``root/c1/c2/...`` built only from validated UID-like components, checked to stay under ``root``.

    Every component must be a plain name (no separator, no ``..``, not absolute, no control character); the
    resolved result must be inside the resolved root (a symlink planted in the share cannot lead out either).
    """
    base = Path(root).resolve()
    for c in components:
        if (
            not c
            or c in (".", "..")
            or "/" in c
            or "\\" in c
            or os.sep in c
            or any(ord(ch) < 32 for ch in c)
            or Path(c).is_absolute()
        ):
            raise InvalidUID(f"{_shown(c)} cannot be used as a path component")
    path = base.joinpath(*components)
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise InvalidUID(f"{path} resolves to {resolved}, outside {base}")
    return path
