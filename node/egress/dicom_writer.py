"""Pipeline outputs -> DICOM series in the source study, driven by ``dicom_templates/`` (see templates.py).

Default encoding (what every viewer shows with real units): MR Image Storage, one instance per slice, uint16
pixels, ``real = stored * slope + intercept`` from the kind's template, written as a Real World Value Mapping
(UCUM unit + quantity code) and, when slope/intercept are not 1/0, as RescaleSlope/RescaleIntercept too, so
WindowCenter/Width are in real units. Identity: same StudyInstanceUID, patient module and FrameOfReferenceUID as
the source; geometry (ImagePositionPatient per slice, orientation, spacing, thickness) from the output's Geometry;
SeriesInstanceUID / SOPInstanceUID derived from the node's UID root + the input's own UIDs + job id + kind
(:func:`output_uid`), so writing (and sending) again is idempotent while two nodes -- or a reset spool whose job
ids start at 1 again -- never give the same UID to different patients' maps.

UIDs from the input (StudyInstanceUID, FrameOfReferenceUID, referenced SOP Instance UIDs; from an MRD header they
were never checked) are validated with :func:`node.uids.validate_uid`; an invalid one is replaced by a generated
UID and a warning names it (it lands in the job log), so nothing but digits and dots reaches a file path.

Reconstructed images (kind ``image`` or any ReconImage without its own template) are magnitudes scaled per
series so the brightest voxel is stored as the template's ``auto_max`` (4095): ``stored = round(|x| / scale)``,
``scale = max|x| / auto_max``; the RWVM slope is ``scale``, no RescaleSlope.

Optional (``parametric_map=True``): one float32 Parametric Map instance per map (highdicom), same study,
referencing the uint16 instances as its sources.

Values the encoding cannot hold are clipped and NaN / infinite values become 0; both are counted in the output's
``notes`` (printed by the CLI) and in each instance's ImageComments, after the map's ``warnings`` (what a reader
must know to trust it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from node import uids
from node.egress.instances import InstanceRecord
from node.egress.templates import Code, SeriesTemplate, TemplateError, template_for
from pipelines.types import Geometry, PipelineOutput, QuantitativeMap, ReconImage, StudyInfo

__all__ = ["write_outputs", "build_series", "template_for", "TemplateError", "SOFTWARE_VERSION", "InstanceRecord"]

log = logging.getLogger(__name__)

_STORED_MAX = 65535
_PRIVATE_SCHEME = "99RECON"
# PS3.16 CID 7202 "Source Image Purposes of Reference".
_SOURCE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
_QUANTITY = Code("246205007", "SCT", "Quantity")

try:
    SOFTWARE_VERSION = metadata.version("recon-node")
except metadata.PackageNotFoundError:  # running from a plain checkout
    SOFTWARE_VERSION = "0+unknown"

Reference = tuple[str, str]  # (SOP Class UID, SOP Instance UID) of a source instance


@dataclass
class Encoded:
    """Stored uint16 pixels of one series and how to read them back."""

    stored: np.ndarray  # uint16 [n, y, x]
    slope: float
    intercept: float
    rescale: bool  # write RescaleSlope / RescaleIntercept
    notes: list[str]


def _ds_number(v: float) -> str:
    """A DS string (16 characters at most) that reads back as exactly the value used for encoding."""
    for digits in (12, 10, 8, 6):
        s = f"{v:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot write {v!r} as a DICOM decimal string")


def encode(data: np.ndarray, template: SeriesTemplate, unit_label: str) -> Encoded:
    """Quantise float values to uint16 with the template's encoding (see the module docstring)."""
    x = np.asarray(data)
    if np.iscomplexobj(x):
        x = np.abs(x)
    x = x.astype(np.float64)
    notes: list[str] = []
    bad = ~np.isfinite(x)
    if bad.any():
        notes.append(f"{int(bad.sum())} NaN or infinite voxels stored as 0")
        x = np.where(bad, 0.0, x)
    if template.auto_max is not None:
        top = float(np.abs(x).max()) if x.size else 0.0
        slope = float(_ds_number(top / template.auto_max)) if top > 0 else 1.0
        intercept, rescale = 0.0, False
        x = np.abs(x)
    else:
        slope, intercept = template.slope, template.intercept
        rescale = not (slope == 1.0 and intercept == 0.0)
    q = np.round((x - intercept) / slope)
    lo_n, hi_n = int((q < 0).sum()), int((q > _STORED_MAX).sum())
    if lo_n or hi_n:
        lo_v, hi_v = intercept, _STORED_MAX * slope + intercept
        notes.append(
            f"values outside the encodable range {lo_v:g}..{hi_v:g} {unit_label} clipped ({lo_n} below, {hi_n} above)"
        )
    stored = np.clip(q, 0, _STORED_MAX).astype(np.uint16)
    return Encoded(stored, float(slope), float(intercept), rescale, notes)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    if code.scheme == "UCUM":
        item.CodingSchemeVersion = "1.4"
    item.CodeMeaning = code.meaning[:64]
    return item


def _rwvm(template: SeriesTemplate, enc: Encoded) -> Dataset:
    rw = Dataset()
    rw.RealWorldValueFirstValueMapped = 0
    rw.RealWorldValueLastValueMapped = _STORED_MAX
    rw.RealWorldValueIntercept = enc.intercept
    rw.RealWorldValueSlope = enc.slope
    rw.LUTExplanation = template.lut_explanation[:64]
    rw.LUTLabel = template.lut_label[:16]
    rw.MeasurementUnitsCodeSequence = Sequence([_code_item(template.unit)])
    quantity = Dataset()
    quantity.ValueType = "CODE"
    quantity.ConceptNameCodeSequence = Sequence([_code_item(_QUANTITY)])
    quantity.ConceptCodeSequence = Sequence([_code_item(template.quantity)])
    rw.QuantityDefinitionSequence = Sequence([quantity])
    return rw


def _window(template: SeriesTemplate, enc: Encoded) -> tuple[float, float]:
    """(center, width) in the space the viewer windows: real units when rescaled, else stored values."""
    if template.window_center is not None and template.window_width is not None:
        if enc.rescale:
            return template.window_center, template.window_width
        # No modality LUT: stored values are what is windowed (slope 1 / intercept 0 make them the real values).
        return ((template.window_center - enc.intercept) / enc.slope, template.window_width / enc.slope)
    hi = float(np.percentile(enc.stored, 99.5)) if enc.stored.size else 1.0
    hi = max(hi, 2.0)
    return hi / 2, hi


def _slice_positions(output: PipelineOutput, n: int) -> tuple[np.ndarray, bool]:
    """ImagePositionPatient per instance, and whether the instances are frames of one slice."""
    g = output.geometry
    positions = np.asarray(g.positions, dtype=np.float64).reshape(-1, 3)
    if positions.shape[0] == n:
        return positions, False
    if isinstance(output, ReconImage) and positions.shape[0] == 1:
        return np.repeat(positions, n, axis=0), True
    if isinstance(output, ReconImage) and n % positions.shape[0] == 0:
        # frame-major: frame 0 of every slice, then frame 1 ...
        return np.tile(positions, (n // positions.shape[0], 1)), True
    raise ValueError(
        f"output {output.kind!r} has {n} slices but its geometry has {positions.shape[0]} positions; "
        "the pipeline must give one ImagePositionPatient per slice"
    )


def _input_key(study: StudyInfo, references: list[Reference] | None) -> str:
    """What identifies the input in output UIDs: its study / series UIDs and source instances (hashed)."""
    import hashlib

    h = hashlib.sha256()
    for part in (study.study_instance_uid, study.series_instance_uid, *(u for _, u in references or [])):
        h.update(str(part).encode("utf-8", "replace") + b"|")
    return h.hexdigest()[:32]


def output_uid(
    job_id: str, study: StudyInfo, references: list[Reference] | None, *parts: object, uid_root: str | None = None
) -> str:
    """Series / SOP Instance UID of an output: node root + input UIDs + job id + ``parts`` (kind, role, index)."""
    return uids.derived_uid(uid_root or uids.node_root(), job_id, _input_key(study, references), *parts)


def _checked_uid(value: str, what: str, job_id: str, fallback: str, logger: logging.Logger | None = None) -> str:
    """``value`` when it is a valid UID; empty: ``fallback``; invalid: ``fallback`` and a warning for the job
    (to ``logger``, the job's log when the worker gives it)."""
    if not value:
        return fallback
    try:
        return uids.validate_uid(value, what)
    except uids.InvalidUID as e:
        (logger or log).warning("job %s: %s; using the generated UID %s instead", job_id, e, fallback)
        return fallback


def _base_dataset(
    study: StudyInfo,
    geometry: Geometry,
    template: SeriesTemplate,
    job_id: str,
    series_uid: str,
    series_number: int,
    description: str,
    now: datetime,
    uid_root: str | None = None,
    logger: logging.Logger | None = None,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient and study: copied from the source so the series lands in the source's study.
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    # The study UID is copied from the input (an MRD header's studyInstanceUID was never checked before): an
    # invalid one becomes a UID of our own, so it cannot reach a folder destination's path (../../x, /abs, \n).
    ds.StudyInstanceUID = _checked_uid(
        study.study_instance_uid,
        "the input's StudyInstanceUID",
        job_id,
        uids.derived_uid(uid_root or uids.node_root(), "study", job_id, _input_key(study, None)),
        logger,
    )
    ds.StudyID = study.study_id
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyDescription = study.study_description
    # Series and equipment: ours.
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    # Type 2C; dciodvfy requires it when no ImageLaterality is given. Empty = unknown (head: unpaired; thigh: ?).
    ds.Laterality = ""
    ds.PatientPosition = ""
    ds.Manufacturer = "recon-node"
    ds.ManufacturerModelName = "recon-node"
    ds.SoftwareVersions = SOFTWARE_VERSION
    if study.institution_name:
        ds.InstitutionName = study.institution_name
    ds.FrameOfReferenceUID = _checked_uid(
        geometry.frame_of_reference_uid or study.frame_of_reference_uid,
        "the input's FrameOfReferenceUID",
        job_id,
        uids.derived_uid(None, "for", ds.StudyInstanceUID),
        logger,
    )
    ds.PositionReferenceIndicator = ""
    # General image / MR image.
    ds.ImageType = list(template.image_type)
    ds.DerivationDescription = f"recon-node {SOFTWARE_VERSION}: {description}"[:1024]
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    # Type 2: a derived map has no single repetition / echo time.
    ds.RepetitionTime = None
    ds.EchoTime = None
    ds.EchoTrainLength = None
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = study.field_strength_T
    ds.LossyImageCompression = "00"
    # Image plane.
    ds.ImageOrientationPatient = [float(v) for v in geometry.orientation]
    ds.PixelSpacing = [float(v) for v in geometry.pixel_spacing_mm]
    ds.SliceThickness = float(geometry.slice_thickness_mm)
    # Image pixel.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(geometry.matrix[0]), int(geometry.matrix[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    schemes = {template.quantity.scheme, template.unit.scheme}
    if any(s.startswith("99") for s in schemes):
        ident = Dataset()
        ident.CodingSchemeDesignator = _PRIVATE_SCHEME
        ident.CodingSchemeName = "recon-node private codes"
        ident.CodingSchemeResponsibleOrganization = "recon-node"
        ds.CodingSchemeIdentificationSequence = Sequence([ident])
    return ds


def _reference_items(refs: list[Reference], purpose: bool) -> Sequence:
    items = []
    for sop_class, sop_uid in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        if purpose:
            item.PurposeOfReferenceCodeSequence = Sequence([_code_item(_SOURCE_PURPOSE)])
        items.append(item)
    return Sequence(items)


def _refs_for(refs: list[Reference], index: int, n_slices: int) -> list[Reference]:
    """The source instances of slice ``index``: readers list them slice-major, so split evenly when they divide."""
    if n_slices > 1 and refs and len(refs) % n_slices == 0:
        per = len(refs) // n_slices
        return refs[index * per : (index + 1) * per]
    return refs


def build_series(
    output: PipelineOutput,
    study: StudyInfo,
    job_id: str,
    *,
    template: SeriesTemplate,
    series_number: int,
    references: list[Reference] | None = None,
    now: datetime | None = None,
    uid_root: str | None = None,
    logger: logging.Logger | None = None,
) -> list[Dataset]:
    """The MR Image Storage datasets (file meta included) of one output, one per slice or frame.

    ``uid_root``: the node's UID root (default: the one the node configured, :func:`node.uids.node_root`)."""
    unit = output.unit if isinstance(output, QuantitativeMap) else ""
    if isinstance(output, QuantitativeMap) and template.map_unit and unit != template.map_unit:
        raise TemplateError(
            f"map {output.kind!r} carries unit {unit!r} but template {template.path} (key map_unit) expects "
            f"{template.map_unit!r}; fix the pipeline's unit or the template"
        )
    data = np.asarray(output.data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"output {output.kind!r} must be [slices, y, x], got shape {data.shape}")
    g = output.geometry
    if tuple(data.shape[1:]) != (int(g.matrix[0]), int(g.matrix[1])):
        raise ValueError(
            f"output {output.kind!r} is {data.shape[1]}x{data.shape[2]} but its geometry says "
            f"{g.matrix[0]}x{g.matrix[1]}"
        )
    positions, frames = _slice_positions(output, data.shape[0])
    enc = encode(data, template, template.unit.meaning)
    for note in enc.notes:
        log.warning("job %s: %s map: %s", job_id, output.kind, note)
        if note not in output.notes:
            output.notes.append(note)
    # References are UIDs from the input too: keep only valid ones (an invalid one would be refused by the PACS).
    refs = [(c, u) for c, u in (references or []) if uids.is_valid_uid(u) and uids.is_valid_uid(c)]
    if len(refs) != len(references or []):
        (logger or log).warning(
            "job %s: %d source reference(s) without a valid UID left out of the Source Image Sequence",
            job_id,
            len(references or []) - len(refs),
        )
    series_uid = output_uid(job_id, study, refs, output.kind, "series", uid_root=uid_root)
    description = template.description(output.description)
    base = _base_dataset(
        study,
        g,
        template,
        job_id,
        series_uid,
        series_number,
        description,
        now or datetime.now(),
        uid_root=uid_root,
        logger=logger,
    )
    center, width = _window(template, enc)
    rwvm = _rwvm(template, enc)
    normal = np.cross(np.asarray(g.orientation[:3], float), np.asarray(g.orientation[3:], float))
    n_positions = int(np.asarray(g.positions).reshape(-1, 3).shape[0])
    if n_positions > 1 and not frames:
        gaps = np.abs(np.diff(np.asarray(g.positions, float).reshape(-1, 3) @ normal))
        if np.allclose(gaps, gaps[0], rtol=1e-3) and gaps[0] > 0:
            base.SpacingBetweenSlices = float(round(gaps[0], 6))
    out = []
    for i in range(data.shape[0]):
        ds = Dataset()
        ds.update(base)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = output_uid(job_id, study, refs, output.kind, "instance", i, uid_root=uid_root)
        ds.InstanceNumber = i + 1
        pos = positions[i]
        ds.ImagePositionPatient = [float(round(v, 6)) for v in pos]
        ds.SliceLocation = float(round(float(np.dot(pos, normal)), 6))
        if frames:
            n_slices = max(n_positions, 1)
            ds.TemporalPositionIdentifier = i // n_slices + 1
            ds.NumberOfTemporalPositions = data.shape[0] // n_slices
        if enc.rescale:
            ds.RescaleIntercept = _ds_number(enc.intercept)
            ds.RescaleSlope = _ds_number(enc.slope)
        ds.WindowCenter = _ds_number(center)
        ds.WindowWidth = _ds_number(width)
        ds.WindowCenterWidthExplanation = description[:64]
        ds.RealWorldValueMappingSequence = Sequence([rwvm])
        comments = [*getattr(output, "warnings", []), *enc.notes]  # ReconImage has no warnings
        if comments:
            ds.ImageComments = "; ".join(comments)[:10240]
        if refs:
            slice_refs = _refs_for(refs, i % max(n_positions, 1), n_positions)
            ds.ReferencedImageSequence = _reference_items(slice_refs[:1], purpose=False)
            ds.SourceImageSequence = _reference_items(slice_refs, purpose=True)
        ds.PixelData = enc.stored[i].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def _template_of(output: PipelineOutput, templates_dir: str | Path | None) -> SeriesTemplate:
    try:
        return template_for(output.kind, templates_dir)
    except TemplateError:
        if isinstance(output, ReconImage):  # any image output without a template of its own
            return template_for("image", templates_dir)
        raise


def write_parametric_map(
    output: QuantitativeMap,
    study: StudyInfo,
    sources: list[Dataset],
    out_dir: Path,
    job_id: str,
    *,
    template: SeriesTemplate,
    series_number: int,
    uid_root: str | None = None,
) -> InstanceRecord:
    """One float32 Parametric Map instance (highdicom) of ``output``; ``sources`` are its MR instances."""
    import highdicom as hd
    from pydicom.sr.coding import Code as PydicomCode

    g = output.geometry
    data = np.nan_to_num(np.asarray(output.data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    finite_lo, finite_hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=template.lut_label,
        lut_explanation=template.lut_explanation,
        unit=PydicomCode(template.unit.value, template.unit.scheme, template.unit.meaning),
        value_range=(finite_lo, finite_hi if finite_hi > finite_lo else finite_lo + 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=PydicomCode(template.quantity.value, template.quantity.scheme, template.quantity.meaning),
    )
    positions = np.asarray(g.positions, dtype=np.float64).reshape(-1, 3)
    spacing_between = float(sources[0].get("SpacingBetweenSlices", 0) or 0) or None
    center = template.window_center if template.window_center is not None else (finite_lo + finite_hi) / 2
    width = template.window_width if template.window_width is not None else max(finite_hi - finite_lo, 1e-3)
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=data,
        series_instance_uid=output_uid(
            job_id, study, None, str(sources[0].SeriesInstanceUID), output.kind, "pm-series", uid_root=uid_root
        ),
        series_number=series_number,
        sop_instance_uid=output_uid(
            job_id, study, None, str(sources[0].SeriesInstanceUID), output.kind, "pm-instance", uid_root=uid_root
        ),
        instance_number=1,
        manufacturer="recon-node",
        manufacturer_model_name="recon-node",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=center, window_width=width)],
        content_description=f"{template.description(output.description)} (float)"[:64],
        content_label=_content_label(template.lut_label),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[float(v) for v in g.pixel_spacing_mm],
            slice_thickness=float(g.slice_thickness_mm),
            spacing_between_slices=spacing_between,
        ),
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", [float(v) for v in g.orientation]),
        plane_positions=[hd.PlanePositionSequence("PATIENT", [float(v) for v in p]) for p in positions],
    )
    pm.SeriesDescription = f"{template.description(output.description)} float"[:64]
    pm.Laterality = ""  # General Series type 2C: dciodvfy wants it present in this IOD (unknown: empty)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{output.kind}_pmap.dcm"
    pm.save_as(path, enforce_file_format=True)
    return _record(path, pm)


def _content_label(label: str) -> str:
    """CS-valued ContentLabel: upper case letters, digits, underscore, 16 characters at most."""
    cleaned = "".join(c if c.isalnum() else "_" for c in label.upper())
    return (cleaned or "MAP")[:16]


def write_outputs(
    outputs: list[PipelineOutput],
    study: StudyInfo,
    out_dir: str | Path,
    job_id: str,
    *,
    references: list[Reference] | None = None,
    templates_dir: str | Path | None = None,
    parametric_map: bool = False,
    series_number_base: int | None = None,
    uid_root: str | None = None,
    logger: logging.Logger | None = None,
) -> list[InstanceRecord]:
    """Write every output as its own series under ``out_dir/<kind>/``; returns a record of every file written
    (path, SOP Instance UID, SOP Class UID, transfer syntax: what egress queues, see :mod:`node.egress.instances`).

    ``references``: (SOP Class UID, SOP Instance UID) of the source instances (Source Image Sequence).
    ``templates_dir``: a site's template folder (default: the shipped ``dicom_templates/``).
    ``parametric_map``: also write a float32 Parametric Map instance per quantitative map (``<kind>_pmap/``).
    ``series_number_base``: SeriesNumber = base + template offset (default 100 x the source series number).
    ``uid_root``: the node's UID root (default: :func:`node.uids.node_root`, set by the running node).
    ``logger``: where warnings about the input's UIDs go (the worker passes the job's log).
    UIDs derive from the node root + the input's UIDs + ``job_id`` + kind, so writing the same job again gives the
    same instances and another node (or a reset spool) gives other ones.
    """
    out_dir = Path(out_dir)
    base = series_number_base if series_number_base is not None else 100 * max(int(study.series_number or 1), 1)
    written: list[InstanceRecord] = []
    for output in outputs:
        template = _template_of(output, templates_dir)
        number = base + template.series_number_offset
        datasets = build_series(
            output,
            study,
            job_id,
            template=template,
            series_number=number,
            references=references,
            uid_root=uid_root,
            logger=logger,
        )
        kind_dir = out_dir / output.kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        for i, ds in enumerate(datasets):
            path = kind_dir / f"{output.kind}_{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(_record(path, ds))
        if parametric_map and isinstance(output, QuantitativeMap):
            written.append(
                write_parametric_map(
                    output,
                    study,
                    datasets,
                    out_dir / f"{output.kind}_pmap",
                    job_id,
                    template=template,
                    series_number=number + 50,
                    uid_root=uid_root,
                )
            )
        log.info("job %s: %s -> %d instance(s), series %d", job_id, output.kind, len(datasets), number)
    return written


def _record(path: Path, ds: Dataset) -> InstanceRecord:
    return InstanceRecord(path, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
