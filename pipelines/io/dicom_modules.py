"""DICOM modules filled from a :class:`StudyInfo`, shared by every writer that starts a new instance."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from pipelines.types import StudyInfo


def new_instance(sop_class_uid: str, sop_instance_uid: str, implementation_version: str) -> Dataset:
    """A dataset with its file meta (Explicit VR Little Endian), UTF-8 character set and SOP Common UIDs: the start
    of every instance this project writes with pydicom alone."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = implementation_version
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UID(sop_class_uid)
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def set_patient_and_study(ds: Dataset, info: StudyInfo, study_uid: str) -> None:
    """Patient and General Study modules (Type 2 attributes present even when empty)."""
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = info.patient_birth_date
    ds.PatientSex = info.patient_sex if info.patient_sex in ("M", "F", "O") else ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = info.referring_physician
    ds.StudyID = info.study_id
    ds.AccessionNumber = info.accession_number
    if info.study_description:
        ds.StudyDescription = info.study_description
