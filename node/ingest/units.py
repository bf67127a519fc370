"""What ingest hands to routing: one received unit (an MRD stream or a group of DICOM instances), already on disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
