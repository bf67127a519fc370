"""What ingest hands to routing: one received unit (an MRD stream or a group of DICOM instances), already on disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

UnitKind = Literal["mrd", "dicom"]


@dataclass
class IngestUnit:
    """A durable unit in the spool, ready to be routed.

    ``path``: an ISMRMRD HDF5 file (kind ``mrd``) or a folder of DICOM instances (kind ``dicom``).
    ``attributes``: what routes may match on. DICOM: Modality, SOPClassUID, SeriesDescription, ProtocolName,
    StudyInstanceUID, SeriesInstanceUID (of the first instance). MRD: protocolName, trajectory, sequence
    (the ``mrf_sequence_name`` user parameter), measurementID.
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


# The service passes one of these to each ingest server; it routes the unit and creates the job (or records it
# as unrouted) and returns the job id. It must not raise for a unit that is merely unrouted.
UnitHandler = Callable[[IngestUnit], str]


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
        return (self.received_frames >= self.expected_frames and self.received_slices >= self.expected_slices
                and self.short_frames == 0)

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
        expected_frames=exp_frames, received_frames=int(np.unique(frame).size),
        expected_slices=exp_slices, received_slices=int(np.unique(slice_).size),
        readouts_per_frame=per_frame, short_frames=int((counts < per_frame).sum()))
