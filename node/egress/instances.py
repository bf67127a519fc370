"""Instance records: what egress needs to know of each DICOM file a job wrote, without opening it again.

:func:`node.egress.dicom_writer.write_outputs` returns one :class:`InstanceRecord` per file it wrote; the worker
hands them to egress, and the outbox copies each into its row at enqueue time, so from then on (restarts
included) nothing reads the files to plan a send. Where no run hands records over -- a node killed between a
job's ``done`` and the enqueue, or ``recon-node resend`` of an old job -- :func:`result_instances` reads them from
the result folder's files, only the few header tags a record holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian


@dataclass(frozen=True)
class InstanceRecord:
    """One written DICOM instance: where it is and the UIDs a destination needs to send it."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


def read_instance_records(paths: Iterable[str | Path]) -> list[InstanceRecord]:
    """Records read from the files' headers; ValueError names a file that is not a DICOM instance."""
    out = []
    for f in paths:
        path = Path(f).resolve()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"])
        except Exception as e:
            raise ValueError(f"cannot queue {path}: not a readable DICOM file ({type(e).__name__}: {e})") from e
        meta = getattr(ds, "file_meta", None)
        sop = str(ds.get("SOPInstanceUID") or (meta and meta.get("MediaStorageSOPInstanceUID")) or "")
        cls = str(ds.get("SOPClassUID") or (meta and meta.get("MediaStorageSOPClassUID")) or "")
        if not sop or not cls:
            raise ValueError(f"{path} has no SOP Instance / Class UID; cannot send it")
        ts = str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)) if meta else str(ExplicitVRLittleEndian)
        out.append(InstanceRecord(path, sop, cls, ts))
    return out


def result_instances(result_dir: str | Path | None) -> list[InstanceRecord]:
    """The DICOM instances of a job's results folder (``<result>/dicom/**.dcm``), in a stable order."""
    if not result_dir:
        return []
    return read_instance_records(sorted(p for p in (Path(result_dir) / "dicom").rglob("*.dcm") if p.is_file()))
