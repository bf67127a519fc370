"""What routes may match on, read from an ISMRMRD header or a DICOM dataset: the one place that decides it.

MRD: ``protocolName``, ``seriesDescription``, ``measurementID`` (measurementInformation), ``trajectory``
(encoding 0), ``sequence`` (the ``mrf_sequence_name`` user parameter). DICOM: Modality, SOPClassUID,
SeriesDescription, ProtocolName, StudyInstanceUID, SeriesInstanceUID (empty when absent). The MRD server, the
DICOM SCP (ISMRMRD wrapped in DICOM and released series) and the start-up rescan of the spool all call these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ismrmrd.xsd as x

DICOM_KEYS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "SeriesDescription",
    "ProtocolName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)
TRAJECTORIES = tuple(t.value for t in x.trajectoryType)


class HeaderError(ValueError):
    """The ISMRMRD header parsed but says something the node cannot work with; the text is for the sender."""


def _str_param(header: x.ismrmrdHeader, name: str) -> str | None:
    up = header.userParameters
    if up is None:
        return None
    return next((p.value for p in up.userParameterString if p.name == name), None)


def from_mrd_header(header: x.ismrmrdHeader) -> dict[str, str]:
    """Routing attributes of an ISMRMRD header.

    Raises :class:`HeaderError` for a header without an encoding or with a trajectory outside the ISMRMRD
    schema (the XML binding then keeps the raw text instead of a ``trajectoryType``).
    """
    meas = header.measurementInformation
    attrs: dict[str, str] = {}
    if meas is not None:
        for key in ("protocolName", "seriesDescription", "measurementID"):
            value = getattr(meas, key, None)
            if value:
                attrs[key] = str(value)
    if not header.encoding:
        raise HeaderError("the ISMRMRD header has no <encoding>; the node cannot tell how the data was acquired")
    traj = header.encoding[0].trajectory
    value = getattr(traj, "value", traj)
    if value not in TRAJECTORIES:
        raise HeaderError(
            f"the ISMRMRD header's <trajectory> is {str(value)[:40]!r}, not one of the ISMRMRD "
            f"trajectory types ({', '.join(TRAJECTORIES)})"
        )
    attrs["trajectory"] = str(value)
    seq = _str_param(header, "mrf_sequence_name")
    if seq:
        attrs["sequence"] = seq
    return attrs


def from_mrd_file(path: Path) -> tuple[dict[str, str], int]:
    """Routing attributes of an ISMRMRD HDF5 file and its number of acquisitions. ValueError naming the file when
    it is not readable (:class:`HeaderError` when its header is unusable)."""
    import h5py

    from pipelines.io.mrd_reader import read_hdf5_header

    xml = read_hdf5_header(path)
    try:
        header = x.CreateFromDocument(xml.encode("utf-8"))
    except Exception as e:  # noqa: BLE001 - xsdata parser errors
        raise ValueError(f"{path}: the ISMRMRD header is not valid ({e})") from e
    try:
        with h5py.File(path, "r") as f:
            n = int(f["dataset/data"].shape[0]) if "dataset/data" in f else 0
    except OSError as e:
        raise ValueError(f"{path}: cannot read the acquisitions ({e})") from e
    return from_mrd_header(header), n


def from_dicom(ds: Any) -> dict[str, str]:
    """Routing attributes of a DICOM dataset (every key present, empty when the dataset lacks it)."""
    return {k: str(ds.get(k, "") or "") for k in DICOM_KEYS}


def from_dicom_file(path: Path) -> dict[str, str]:
    """:func:`from_dicom` of a DICOM file, read without its pixel data."""
    import pydicom

    return from_dicom(pydicom.dcmread(path, stop_before_pixels=True))
