"""DICOM map series from templates: validity (dciodvfy), rendering (dcm2pnm), value round trip, UIDs, geometry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.egress.dicom_writer import TemplateError, template_for, write_outputs
from pipelines.types import Geometry, QuantitativeMap, ReconImage, StudyInfo

DCIODVFY = shutil.which("dciodvfy")
DCM2PNM = shutil.which("dcm2pnm") or ("/usr/bin/dcm2pnm" if Path("/usr/bin/dcm2pnm").exists() else None)

KINDS = {  # kind -> (unit, value range of the test map)
    "t1": ("ms", (0.0, 4000.0)),
    "t2": ("ms", (0.0, 2000.0)),
    "ff": ("%", (0.0, 100.0)),
    "t1fat": ("ms", (200.0, 500.0)),
    "pd": ("1", (0.0, 1.5)),
    "b1": ("1", (0.5, 1.5)),
    "df": ("Hz", (-300.0, 300.0)),
    "residual": ("%", (0.0, 40.0)),
}
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def _geometry() -> Geometry:
    positions = np.array([[-50.0, -40.0, -5.0], [-50.0, -40.0, 0.0], [-50.0, -40.0, 5.0]])
    return Geometry(matrix=(16, 20), pixel_spacing_mm=(5.0, 5.0), slice_thickness_mm=4.0,
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), positions=positions,
                    frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1")


def _study() -> StudyInfo:
    return StudyInfo(patient_id="PAT-7", patient_name="Müller^Anna", patient_birth_date="19700102", patient_sex="F",
                     study_instance_uid="1.2.826.0.1.3680043.8.498.100", study_id="S1", study_date="20240301",
                     study_time="101500", accession_number="ACC1", study_description="MRF brain",
                     referring_physician="Doe^John", series_number=4)


def _outputs(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    g = _geometry()
    outs: list = []
    for kind, (unit, (lo, hi)) in KINDS.items():
        outs.append(QuantitativeMap(kind, rng.uniform(lo, hi, (3, 16, 20)).astype(np.float32), unit, f"{kind} map", g))
    frames = (rng.normal(size=(3, 16, 20)) + 1j * rng.normal(size=(3, 16, 20))).astype(np.complex64) * 7.5
    outs.append(ReconImage("image", frames, "MRF frames", g))
    return outs


REFS = [(MR_IMAGE, f"1.2.826.0.1.3680043.8.498.200.{i}") for i in range(6)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("maps")
    outputs = _outputs()
    records = write_outputs(outputs, _study(), out, "job-42", references=REFS, parametric_map=True)
    return out, outputs, [r.path for r in records]


def _by_kind(files: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent.name, []).append(f)
    return groups


def test_every_kind_has_a_series_of_three_instances(written):
    _, outputs, files = written
    groups = _by_kind(files)
    for o in outputs:
        assert len(groups[o.kind]) == 3, o.kind
    for kind in KINDS:
        assert len(groups[f"{kind}_pmap"]) == 1


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(written):
    _, _, files = written
    for f in files:
        r = subprocess.run([DCIODVFY, str(f)], capture_output=True, text=True, timeout=60)
        lines = (r.stdout + r.stderr).splitlines()
        warnings = [ln for ln in lines if "Warning" in ln]
        if warnings:
            print(f"{f.parent.name}/{f.name}: {len(warnings)} dciodvfy warning(s):\n  " + "\n  ".join(warnings))
        errors = [ln for ln in lines if "Error" in ln]
        assert not errors, f"{f}: " + "\n".join(errors)


@pytest.mark.skipif(DCM2PNM is None, reason="dcm2pnm (DCMTK) is not installed")
def test_dcm2pnm_renders_every_kind(written, tmp_path):
    _, _, files = written
    pngs = []
    for f in files:
        if f.name.endswith("_0002.dcm"):
            png = tmp_path / f"{f.parent.name}.png"
            r = subprocess.run([DCM2PNM, "--write-png", "--use-window", "1", str(f), str(png)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, f"{f}: {r.stderr}"
            assert png.stat().st_size > 100
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            pngs.append(png)
    assert len(pngs) == len(KINDS) + 1
    print(f"PNG renderings in {tmp_path}")


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    rw = ds.RealWorldValueMappingSequence[0]
    return ds.pixel_array.astype(np.float64) * float(rw.RealWorldValueSlope) + float(rw.RealWorldValueIntercept)


def test_values_round_trip_through_the_rwvm_and_the_rescale(written):
    _, outputs, files = written
    groups = _by_kind(files)
    for o in outputs:
        datasets = [pydicom.dcmread(f) for f in sorted(groups[o.kind])]
        truth = np.abs(o.data) if np.iscomplexobj(o.data) else o.data
        decoded = np.stack([_decode(ds) for ds in datasets])
        step = float(datasets[0].RealWorldValueMappingSequence[0].RealWorldValueSlope)
        assert np.max(np.abs(decoded - truth)) <= step / 2 * (1 + 1e-6) + 1e-6, o.kind
        ds = datasets[0]
        tpl = template_for("image" if isinstance(o, ReconImage) else o.kind)
        if isinstance(o, QuantitativeMap) and (tpl.slope, tpl.intercept) != (1.0, 0.0):
            # The modality LUT gives the same real values, and the window is in those real units.
            rescaled = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            assert np.allclose(rescaled, decoded[0], atol=1e-9)
            assert float(ds.WindowCenter) == pytest.approx(tpl.window_center)
        else:
            assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds, o.kind
        rw = ds.RealWorldValueMappingSequence[0]
        assert rw.MeasurementUnitsCodeSequence[0].CodeValue == tpl.unit.value
        assert rw.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
        quantity = rw.QuantityDefinitionSequence[0]
        assert quantity.ConceptNameCodeSequence[0].CodeValue == "246205007"
        assert quantity.ConceptCodeSequence[0].CodeValue == tpl.quantity.value
        assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription == tpl.description(o.description)


def test_parametric_map_holds_the_float_values(written):
    _, outputs, files = written
    groups = _by_kind(files)
    t1 = next(o for o in outputs if o.kind == "t1")
    pm = pydicom.dcmread(groups["t1_pmap"][0])
    assert pm.SOPClassUID == PARAMETRIC_MAP
    assert pm.StudyInstanceUID == _study().study_instance_uid
    # highdicom may order the frames differently: match them to the slices by their plane position
    g = _geometry()
    for frame, fg in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence):
        pos = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        k = int(np.argmin(np.linalg.norm(g.positions - np.array(pos), axis=1)))
        assert np.allclose(g.positions[k], pos)
        assert np.array_equal(frame.astype(np.float32), t1.data[k])
    unit = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert unit.CodeValue == "ms"


def test_study_patient_and_geometry_are_copied(written):
    _, outputs, files = written
    study, g = _study(), _geometry()
    for kind, paths in _by_kind(files).items():
        if kind.endswith("_pmap"):
            continue
        datasets = [pydicom.dcmread(f) for f in sorted(paths)]
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        for i, ds in enumerate(datasets):
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == \
                (study.patient_name, study.patient_id, study.patient_birth_date, study.patient_sex)
            assert ds.AccessionNumber == "ACC1" and ds.StudyID == "S1"
            assert ds.FrameOfReferenceUID == g.frame_of_reference_uid
            assert np.allclose([float(v) for v in ds.ImagePositionPatient], g.positions[i])
            assert [float(v) for v in ds.ImageOrientationPatient] == list(g.orientation)
            assert [float(v) for v in ds.PixelSpacing] == list(g.pixel_spacing_mm)
            assert float(ds.SliceThickness) == g.slice_thickness_mm
            assert float(ds.SliceLocation) == pytest.approx(g.positions[i][2])
            assert ds.Manufacturer == "recon-node" and ds.SoftwareVersions
            assert ds.SeriesNumber == 400 + template_for(kind).series_number_offset
            # slice i references the source instances of slice i (two per slice here)
            assert [it.ReferencedSOPInstanceUID for it in ds.SourceImageSequence] == [u for _, u in REFS[2 * i:2 * i + 2]]
            assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == REFS[2 * i][1]


def test_uids_are_deterministic_per_job(tmp_path):
    def uids(job: str, where: Path) -> list[tuple[str, str]]:
        files = write_outputs(_outputs()[:2], _study(), where, job)
        return [(pydicom.dcmread(f.path).SeriesInstanceUID, pydicom.dcmread(f.path).SOPInstanceUID) for f in files]

    first, again, other = uids("job-a", tmp_path / "a1"), uids("job-a", tmp_path / "a2"), uids("job-b", tmp_path / "b")
    assert first == again
    assert not {u for pair in first for u in pair} & {u for pair in other for u in pair}
    assert len({sop for _, sop in first}) == len(first)


def test_nan_and_out_of_range_values_are_zeroed_clipped_and_noted(tmp_path):
    g = _geometry()
    data = np.full((3, 16, 20), 1000.0, dtype=np.float32)
    data[0, 0, 0] = np.nan
    data[1, 0, 0] = 70000.0
    data[2, 0, 0] = -5.0
    m = QuantitativeMap("t1", data, "ms", "T1 map", g)
    files = write_outputs([m], _study(), tmp_path, "job-clip")
    pixels = [pydicom.dcmread(f.path).pixel_array for f in files]
    assert pixels[0][0, 0] == 0 and pixels[1][0, 0] == 65535 and pixels[2][0, 0] == 0
    assert any("NaN" in n for n in m.notes) and any("clipped" in n for n in m.notes)
    assert "clipped" in pydicom.dcmread(files[0].path).ImageComments


def test_frames_of_one_slice_share_its_position(tmp_path):
    g = _geometry()
    g.positions = g.positions[:1]
    img = ReconImage("image", np.ones((5, 16, 20), np.float32), "frames", g)
    files = write_outputs([img], _study(), tmp_path, "job-frames")
    datasets = [pydicom.dcmread(f.path) for f in files]
    assert [ds.TemporalPositionIdentifier for ds in datasets] == [1, 2, 3, 4, 5]
    assert all(np.allclose([float(v) for v in ds.ImagePositionPatient], g.positions[0]) for ds in datasets)


def test_template_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(TemplateError, match=r"nosuch\.yaml"):
        template_for("nosuch")
    bad = tmp_path / "t1.yaml"
    bad.write_text((template_for("t1").path).read_text().replace("slope: 1,", "slope: -1,"))
    with pytest.raises(TemplateError, match=r"t1\.yaml.*encoding\.slope"):
        template_for("t1", tmp_path)
    bad.write_text("kind: t1\nseries_description: x\n")
    with pytest.raises(TemplateError, match=r"t1\.yaml.*'series_number_offset'|t1\.yaml.*key"):
        template_for("t1", tmp_path)
    # a wrong unit never goes out under the template's label
    m = QuantitativeMap("t1", np.zeros((3, 16, 20)), "s", "T1 map", _geometry())
    with pytest.raises(TemplateError, match="map_unit"):
        write_outputs([m], _study(), tmp_path / "out", "job-unit")


def test_site_templates_override_the_shipped_ones(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    text = template_for("t2").path.read_text().replace('"T2 map [ms]"', '"T2 relaxometry [ms]"')
    (site / "t2.yaml").write_text(text)
    m = QuantitativeMap("t2", np.full((3, 16, 20), 80.0), "ms", "T2 map", _geometry())
    files = write_outputs([m], _study(), tmp_path / "out", "job-site", templates_dir=site)
    assert pydicom.dcmread(files[0].path).SeriesDescription == "T2 relaxometry [ms]"


def test_the_project_reader_reads_a_map_series_back_in_real_units(written):
    from pipelines.io.dicom_reader import image_study_from_dicom

    out, outputs, _ = written
    ff = next(o for o in outputs if o.kind == "ff")
    back = image_study_from_dicom(out / "ff")
    assert back.pixels.shape == (1, 3, 16, 20)
    assert np.max(np.abs(back.pixels[0] - ff.data)) <= 0.05 + 1e-4
    assert np.allclose(back.geometry.positions, _geometry().positions)
    assert back.study.study_instance_uid == _study().study_instance_uid
