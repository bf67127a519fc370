"""What ingest hands to the service: one received unit (an MRD stream or a group of DICOM instances), already on
disk, with its sidecar; and what the service answers (:class:`Admission`).

Both ingest servers and the service's start-up rescan use this one contract: the unit is stored, its sidecar
(:func:`save_sidecar`) written durably *before* the unit gets its final name, then the handler is called. A node
killed in between finds the unit at start-up and rebuilds it with :func:`unit_from_disk`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from node.durable import write_durably
from node.ingest import attributes

log = logging.getLogger("recon-node.units")

UnitKind = Literal["mrd", "dicom"]


@dataclass
class IngestUnit:
    """A durable unit in the spool, ready to be routed.

    ``path``: an ISMRMRD HDF5 file (kind ``mrd``) or a folder of DICOM instances (kind ``dicom``).
    ``attributes``: what routes may match on (:mod:`node.ingest.attributes`), plus for MRD streams the
    ``studyInstanceUID``, ``config`` and ``json`` the stream carried.
    """

    kind: UnitKind
    path: Path
    source: str  # name of the configured source it came from
    calling_ae: str = ""  # DICOM calling AE title; empty for MRD
    called_ae: str = ""  # DICOM called AE title; empty for MRD
    peer: str = ""  # remote IP address
    attributes: dict[str, str] = field(default_factory=dict)
    n_objects: int = 0  # instances (DICOM) or acquisitions (MRD)
    received_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Admission:
    """What the node did with a unit: routed it (``route`` None: no route matched, the unit is kept as
    ``unrouted``), recorded its job and, for a route that answers over MRD when the caller asked for that, ran it
    on the caller's thread (``result``: the worker's JobResult)."""

    job_id: str
    state: str  # the job's state: queued, unrouted, ... (done / failed / queued again after an in-line run)
    route: str | None = None
    result: Any = None


# The service passes one of these to each ingest server; it routes the unit, creates the job (or records it as
# unrouted) and says what it did. It must not raise for a unit that is merely unrouted.
UnitHandler = Callable[[IngestUnit], Admission]


# ---- the sidecar ---------------------------------------------------------------------------------------------------
def sidecar_path(unit_path: Path) -> Path:
    """``<spool>/units/<unit id>.json`` for the unit ``<unit id>.h5`` (MRD) or ``<unit id>/`` (DICOM)."""
    return unit_path.with_name(unit_path.name.removesuffix(".h5") + ".json")


def save_sidecar(unit: IngestUnit) -> Path:
    """The IngestUnit as JSON beside the unit, durably; lets a restarted node rebuild it (source, AE titles, peer,
    attributes) when the unit's job was never created."""
    data = asdict(unit)
    data["path"] = str(unit.path)
    path = sidecar_path(unit.path)
    write_durably(path, json.dumps(data, indent=1).encode("utf-8"))
    return path


def load_sidecar(unit_path: Path) -> IngestUnit:
    """The IngestUnit saved by :func:`save_sidecar`; OSError, ValueError or TypeError when it is missing or bad."""
    data = json.loads(sidecar_path(unit_path).read_text("utf-8"))
    data["path"] = unit_path
    return IngestUnit(**data)


def unit_from_disk(path: Path) -> IngestUnit | None:
    """Rebuild the IngestUnit of a spooled unit from its sidecar, else from the data itself (source unknown)."""
    if sidecar_path(path).exists():
        try:
            return load_sidecar(path)
        except (OSError, ValueError, TypeError) as e:
            log.warning(
                "unit %s: unreadable sidecar %s (%s); rebuilding from the data", path.name, sidecar_path(path).name, e
            )
    if path.is_file() and path.suffix == ".h5":
        try:
            attrs, n = attributes.from_mrd_file(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file: the job's own load reports it
            log.warning("unit %s: cannot read its ISMRMRD header (%s: %s)", path.name, type(e).__name__, e)
            attrs, n = {}, 0
        return IngestUnit(kind="mrd", path=path, source="", attributes=attrs, n_objects=n)
    if path.is_dir():
        attrs = {}
        files = sorted(p for p in path.glob("*.dcm") if p.is_file() and not p.name.startswith("."))
        try:
            attrs = attributes.from_dicom_file(files[0])
        except IndexError:
            log.warning("unit %s: no DICOM instance in it", path.name)
        except Exception as e:  # noqa: BLE001 - a damaged file: the job's own load reports it
            log.warning("unit %s: cannot read a DICOM instance (%s: %s)", path.name, type(e).__name__, e)
        return IngestUnit(kind="dicom", path=path, source="", attributes=attrs, n_objects=len(files))
    return None


# ---- completeness of raw input -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completeness:
    """What a raw (MRD) unit holds against what its header declares: frames, slices, readouts per frame."""

    expected_frames: int
    received_frames: int
    expected_slices: int
    received_slices: int
    readouts_per_frame: int  # declared (trajectoryDescription readouts_per_frame) or the most common count
    short_frames: int  # (slice, frame) pairs with fewer readouts than readouts_per_frame

    @property
    def complete(self) -> bool:
        return (
            self.received_frames >= self.expected_frames
            and self.received_slices >= self.expected_slices
            and self.short_frames == 0
        )

    def problem(self) -> str | None:
        """A sentence for the job's error, or None when complete."""
        if self.complete:
            return None
        parts = []
        if self.received_frames < self.expected_frames:
            parts.append(f"{self.received_frames} of {self.expected_frames} frames")
        if self.received_slices < self.expected_slices:
            parts.append(f"{self.received_slices} of {self.expected_slices} slices")
        if self.short_frames:
            parts.append(f"{self.short_frames} frame(s) with fewer than {self.readouts_per_frame} readouts")
        return "incomplete input: " + ", ".join(parts) + " received (the header / schedule declares more)"


def _limit_count(limits: Any, name: str) -> int | None:
    lim = getattr(limits, name, None) if limits is not None else None
    if lim is None or lim.maximum is None:
        return None
    return int(lim.maximum) - int(lim.minimum or 0) + 1


def raw_completeness(header: Any, frame: Any, slice_: Any, schedule_frames: int | None = None) -> Completeness:
    """Compare the imaging readouts of a raw unit (``frame`` = idx.repetition, ``slice_`` = idx.slice, noise
    scans left out) with the header: frames from ``encodingLimits.repetition`` and the MRF schedule length
    (``schedule_frames``), slices from ``encodingLimits.slice``, readouts per frame from the trajectory
    description (``readouts_per_frame``) or, when undeclared, the most common count per frame.
    """
    import numpy as np

    frame = np.asarray(frame, dtype=np.int64)
    slice_ = np.asarray(slice_, dtype=np.int64)
    enc = header.encoding[0] if getattr(header, "encoding", None) else None
    limits = getattr(enc, "encodingLimits", None)
    exp_frames = max(_limit_count(limits, "repetition") or 1, int(schedule_frames or 0), 1)
    exp_slices = _limit_count(limits, "slice") or 1
    declared = None
    desc = getattr(enc, "trajectoryDescription", None)
    for p in getattr(desc, "userParameterLong", None) or []:
        if p.name == "readouts_per_frame":
            declared = int(p.value)
    if frame.size == 0:
        return Completeness(exp_frames, 0, exp_slices, 0, declared or 0, 0)
    pairs, counts = np.unique(np.stack([slice_, frame], axis=1), axis=0, return_counts=True)
    if declared:
        per_frame = declared
    else:
        values, freq = np.unique(counts, return_counts=True)
        per_frame = int(values[np.argmax(freq)])
    return Completeness(
        expected_frames=exp_frames,
        received_frames=int(np.unique(frame).size),
        expected_slices=exp_slices,
        received_slices=int(np.unique(slice_).size),
        readouts_per_frame=per_frame,
        short_frames=int((counts < per_frame).sum()),
    )
