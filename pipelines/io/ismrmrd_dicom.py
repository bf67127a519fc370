"""ISMRMRD raw data carried inside DICOM: a Raw Data Storage instance wrapping an ISMRMRD HDF5 file, and back.

Convention (version 1, named by :data:`CREATOR_VERSION_UID` in the Raw Data module's Creator-Version UID): the
HDF5 bytes in element xx10 (OB) of the private block ``RECON-NODE ISMRMRD`` in group 0x0071, their exact length in
xx11 (UL), since OB values are padded to an even length. An Encapsulated Document (0042,0011) whose bytes are an
HDF5 file is read too. The DICOM SCP unwraps what it receives (:func:`embedded_ismrmrd`); sites and tests wrap
with :func:`wrap_ismrmrd_in_raw_data`.
"""

from __future__ import annotations

import struct
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import ismrmrd.xsd as x
from pydicom.dataset import Dataset
from pydicom.uid import RawDataStorage

from pipelines.io.dicom_modules import new_instance, set_patient_and_study
from pipelines.io.dicom_uids import deterministic_uid
from pipelines.io.mrd_reader import read_hdf5_header, study_info_from_header
from pipelines.types import StudyInfo

ISMRMRD_GROUP = 0x0071
ISMRMRD_CREATOR = "RECON-NODE ISMRMRD"
ISMRMRD_DATA_ELEMENT = 0x10  # (0071,xx10) OB: the HDF5 bytes
ISMRMRD_LENGTH_ELEMENT = 0x11  # (0071,xx11) UL: their exact length (OB values are padded to even length)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Raw Data module's Creator-Version UID: names this wrapping convention (version 1).
CREATOR_VERSION_UID = deterministic_uid("recon-node", "ismrmrd-in-raw-data", 1)


def _int_value(value: Any) -> int:
    """A UL read back as int. Sent with implicit VR, the private length element has no VR in any dictionary, so
    pydicom gives its raw 4 bytes (UN) -- ``int(b'...')`` was the ``invalid literal for int()`` of issue 15."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 4:
            raise ValueError(f"length element holds {len(value)} bytes, expected 4 (UL)")
        return int(struct.unpack("<I", bytes(value))[0])
    if isinstance(value, (list, tuple)):
        value = value[0]
    return int(value)


def embedded_ismrmrd(ds: Dataset) -> bytes | None:
    """The ISMRMRD HDF5 bytes carried by a dataset, or None (see the module docstring for the convention)."""
    try:
        block = ds.private_block(ISMRMRD_GROUP, ISMRMRD_CREATOR)
    except KeyError:
        block = None
    if block is not None and ISMRMRD_DATA_ELEMENT in block:
        data = bytes(block[ISMRMRD_DATA_ELEMENT].value or b"")
        if ISMRMRD_LENGTH_ELEMENT in block:
            n = _int_value(block[ISMRMRD_LENGTH_ELEMENT].value)
            if 0 <= n <= len(data):
                data = data[:n]
        return data
    doc = ds.get("EncapsulatedDocument")
    if doc and bytes(doc[:8]) == HDF5_SIGNATURE:
        n = _int_value(ds.get("EncapsulatedDocumentLength") or 0)
        data = bytes(doc)
        return data[:n] if 0 < n <= len(data) else data
    return None


def wrap_ismrmrd_in_raw_data(
    h5_path: str | Path,
    info: StudyInfo | None = None,
    *,
    series_number: int = 900,
    series_description: str = "ISMRMRD raw data",
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Dataset:
    """A Raw Data Storage instance (with file meta) that carries the ISMRMRD file ``h5_path``.

    Patient / study identifiers come from ``info``, else from the file's ISMRMRD header. UIDs not given are
    derived deterministically from the file's bytes, so wrapping the same file twice gives the same instance.
    Save with ``ds.save_as(path, enforce_file_format=True)`` or send with any C-STORE SCU.
    """
    h5_path = Path(h5_path)
    payload = h5_path.read_bytes()
    if not payload.startswith(HDF5_SIGNATURE):
        raise ValueError(f"{h5_path}: not an HDF5 file (no HDF5 signature)")
    if info is None:
        info = study_info_from_header(x.CreateFromDocument(read_hdf5_header(h5_path).encode("utf-8")))
    digest = uuid.uuid5(uuid.NAMESPACE_OID, payload.hex()[:4096] + str(len(payload))).hex
    study_uid = info.study_instance_uid or deterministic_uid("raw-study", info.patient_id, digest)
    series_uid = series_instance_uid or deterministic_uid("raw-series", study_uid, series_number, digest)
    sop_uid = sop_instance_uid or deterministic_uid("raw-instance", series_uid, digest)
    now = datetime.now()

    ds = new_instance(RawDataStorage, sop_uid, "RECON_NODE")
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    set_patient_and_study(ds, info, study_uid)
    # General series
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    if info.protocol_name:
        ds.ProtocolName = info.protocol_name
    ds.Laterality = ""  # type 2C; the body part is not known here, so present and empty (as the frame writer does)
    # Frame of reference (U in the Raw Data IOD): present when known
    if info.frame_of_reference_uid:
        ds.FrameOfReferenceUID = info.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
    # General equipment
    ds.Manufacturer = info.manufacturer or ""
    if info.institution_name:
        ds.InstitutionName = info.institution_name
    if info.station_name:
        ds.StationName = info.station_name
    # Acquisition context (type 2 sequence: present, empty)
    ds.AcquisitionContextSequence = []
    # Raw data module
    ds.InstanceNumber = 1
    ds.ContentDate = info.study_date or now.strftime("%Y%m%d")
    ds.ContentTime = info.study_time or now.strftime("%H%M%S")
    ds.CreatorVersionUID = CREATOR_VERSION_UID
    # The payload
    block = ds.private_block(ISMRMRD_GROUP, ISMRMRD_CREATOR, create=True)
    block.add_new(ISMRMRD_DATA_ELEMENT, "OB", payload)
    block.add_new(ISMRMRD_LENGTH_ELEMENT, "UL", len(payload))
    return ds
