"""DICOM modules filled from a :class:`StudyInfo`, shared by every writer that starts a new instance."""

from __future__ import annotations

from pydicom.dataset import Dataset

from pipelines.types import StudyInfo


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
