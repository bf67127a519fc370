"""``kind: folder``: a folder (e.g. a share a PACS imports from): ``<path>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``.

Each file is copied durably (temp file in that folder, fsync, atomic rename, fsync of the folder), so a file under
its final name is always complete and a resend overwrites it with the same bytes. The three path components must
be valid DICOM UIDs (digits and dots) and the resolved path must stay under the destination folder
(:func:`node.uids.safe_path_under`); otherwise the instance fails at once with the reason (``../../x``, an
absolute path or a newline never become a path). A write error (disk full, share gone) means retry. ``verify``
checks that the folder can be written.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from node import config, uids
from node.durable import copy_durably
from node.egress.destinations import Outcome, SendSettings
from node.egress.outbox import OutboxItem

log = logging.getLogger(__name__)


class FolderCopy:
    kind = "folder"

    def __init__(self, cfg: config.FolderDestination, settings: SendSettings) -> None:
        self.name = cfg.name
        self.path = cfg.path
        self.target = str(cfg.path)
        self.audit: Mapping[str, Any] = {}

    def send(self, items: Sequence[OutboxItem]) -> Iterator[Outcome]:
        for it in items:
            yield self._copy(it)

    def _copy(self, it: OutboxItem) -> Outcome:
        try:
            ds = pydicom.dcmread(
                it.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"]
            )
        except Exception as e:
            return Outcome(it, "failed", f"job {it.job_id}: cannot read {it.path}: {type(e).__name__}: {e}")
        try:
            # Only validated UIDs become path components, and the result must stay under the folder.
            study = uids.validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = uids.validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop = uids.validate_uid(it.sop_instance_uid, "SOPInstanceUID")
            final = uids.safe_path_under(self.path, study, series, f"{sop}.dcm")
        except uids.InvalidUID as e:
            error = f"job {it.job_id}: {it.path} not written to {self.path}: {e}"
            log.error("destination %s: %s", self.name, error)
            return Outcome(it, "failed", error)
        try:
            copy_durably(Path(it.path), final)
        except OSError as e:
            return Outcome(it, "retry", f"cannot write to {self.path}: {e.strerror or e}")
        return Outcome(it, "sent")

    def verify(self) -> str | None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".recon-node-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return f"check: folder not writable: {e.strerror or e}"
        return None


DESTINATION = FolderCopy
