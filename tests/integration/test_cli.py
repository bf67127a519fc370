"""`recon-node simulate` -> `recon-node process` through the installed console script, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from pipelines.physics.sequences import MRFSequence, fisp_sequence

pytestmark = pytest.mark.integration
def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    # The environment is read per call: the session fixture sets RECON_NODE_CACHE after this module is imported.
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, env=env,
                       timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    s = fisp_sequence()
    seq = MRFSequence("fisp120", s.flip_angles_deg[:120], s.tr_ms[:120], s.te_ms[:120], ti_ms=s.ti_ms)
    seq.save_json(d / "seq.json")
    p = run("simulate", "--phantom", "brain", "--matrix", "32", "--coils", "4", "--snr", "inf",
            "--sequence", str(d / "seq.json"), "--out", str(d / "brain.h5"), "--dicom-out", str(d / "frames"),
            "--quiet")
    assert "wrote" in p.stdout
    return d


def test_simulate_writes_ismrmrd_truth_and_dicom(simulated):
    d = simulated
    assert (d / "brain.h5").stat().st_size > 0
    truth = np.load(d / "brain_truth.npz")
    for key in ("t1_ms", "t2_ms", "ff_percent", "pd", "b1", "df_hz", "labels"):
        assert truth[key].shape == (32, 32), key
    assert truth["t1_ms"][truth["labels"] > 0].max() > 1000  # real units: ms
    assert len(list((d / "frames").glob("*.dcm"))) == 120
    info = subprocess.run(["/usr/bin/ismrmrd_info", str(d / "brain.h5")], capture_output=True, text=True)
    assert info.returncode == 0


def test_process_reconstructs_frames_and_writes_valid_dicom(simulated, tmp_path):
    d = simulated
    out = tmp_path / "out"
    p = run("process", str(d / "brain.h5"), "--pipeline", "cartesian_frames", "--set", "frames=0,60,119",
            "--out", str(out), "--quiet")
    assert "cartesian_frames" in p.stdout
    images = np.load(out / "images.npz")["image"]
    assert images.shape == (3, 32, 32)
    # Compare with the ground-truth fingerprints, which the simulator also wrote as DICOM frames (magnitude).
    frames = sorted((d / "frames").glob("*.dcm"))
    ref = np.stack([pydicom.dcmread(frames[i]).pixel_array.astype(float) for i in (0, 60, 119)])
    mask = np.load(d / "brain_truth.npz")["mask"].astype(bool)
    # Coil maps estimated from the data leave one real scale per voxel (the coil RSS): each voxel's time
    # course must be proportional to the truth, up to the uint16 quantisation of the reference.
    a, b = np.abs(images)[:, mask], ref[:, mask]
    scale = (a * b).sum(0) / (b * b).sum(0)
    assert np.linalg.norm(a - scale * b) / np.linalg.norm(a) < 5e-3
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert len(files) == 3
    ds = pydicom.dcmread(files[0])
    src = pydicom.dcmread(frames[0])
    assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID and "DERIVED" in ds.ImageType
    if shutil.which("dciodvfy"):
        v = subprocess.run(["dciodvfy", str(files[0])], capture_output=True, text=True)
        errors = [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
    # Rerun: the same UIDs (idempotent output).
    run("process", str(d / "brain.h5"), "--pipeline", "cartesian_frames", "--set", "frames=0,60,119",
        "--out", str(out), "--quiet")
    assert pydicom.dcmread(files[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_errors_are_one_readable_line(simulated, tmp_path):
    p = run("process", str(tmp_path / "missing.h5"), "--pipeline", "cartesian_frames", "--out", str(tmp_path),
            ok=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "does not exist" in p.stderr
    p = run("process", str(simulated / "brain.h5"), "--pipeline", "nope", "--out", str(tmp_path), ok=False)
    assert p.returncode == 2 and "unknown pipeline 'nope'" in p.stderr and "cartesian_frames" in p.stderr
    p = run("process", str(simulated / "brain.h5"), "--pipeline", "cartesian_frames", "--set", "bogus=1",
            "--out", str(tmp_path), ok=False)
    assert p.returncode == 2 and "no parameter 'bogus'" in p.stderr and "did you mean" not in p.stderr
    p = run("process", str(simulated / "brain.h5"), "--pipeline", "cartesian_frames", "--set", "frame=0",
            "--out", str(tmp_path), ok=False)
    assert p.returncode == 2 and "no parameter 'frame' (did you mean 'frames'?" in p.stderr
    out = tmp_path / "wrong-kind"
    p = run("process", str(simulated / "frames"), "--pipeline", "cartesian_frames", "--out", str(out), ok=False)
    assert p.returncode == 2 and "takes raw MR data (ISMRMRD), but the input is an image series (DICOM)" in p.stderr
    assert "mrf_maps_from_images" in p.stderr  # what does take it
    assert not out.exists()  # no empty output folder left behind
    p = run("simulate", "--sequence", "nope", "--out", str(tmp_path / "x.h5"), ok=False)
    assert p.returncode == 2 and "unknown sequence" in p.stderr
    assert "Traceback" not in p.stderr


def test_every_subcommand_has_help():
    for cmd in ("version", "simulate", "process", "pipelines"):
        assert run(cmd, "--help").stdout.startswith("usage: recon-node " + cmd)
    assert "cartesian_frames" in run("pipelines").stdout
    assert "recon-node" in run("version").stdout
    assert run("--version").stdout.startswith("recon-node ")


def test_mrf_maps_from_a_simulated_dicom_series(tmp_path):
    """The issue's 'done when': the image pipeline runs from the CLI on `simulate --dicom-out` output."""
    run("simulate", "--phantom", "brain", "--matrix", "40", "--coils", "2", "--snr", "50", "--sequence", "fisp",
        "--out", str(tmp_path / "b.h5"), "--dicom-out", str(tmp_path / "frames"), "--quiet")
    out = tmp_path / "maps"
    p = run("process", str(tmp_path / "frames"), "--pipeline", "mrf_maps_from_images", "--out", str(out),
            "--quiet")
    assert "mrf_maps_from_images" in p.stdout
    assert "phase was not available" in p.stderr  # DICOM frames are magnitude images
    maps = np.load(out / "maps.npz")
    truth = np.load(tmp_path / "b_truth.npz")
    assert str(maps["t1_unit"]) == "ms" and str(maps["t2_unit"]) == "ms"
    labels, names = truth["labels"], {int(k): v for k, v in __import__("json").loads(str(truth["label_names"])).items()}
    for label, name in names.items():
        if name not in ("white_matter", "grey_matter", "csf"):
            continue
        roi = labels == label
        e1 = np.median(np.abs(maps["t1"][0][roi] / truth["t1_water_ms"][roi] - 1))
        e2 = np.median(np.abs(maps["t2"][0][roi] / truth["t2_water_ms"][roi] - 1))
        assert e1 < 0.03 and e2 < 0.05, (name, e1, e2)
    series = sorted(p.name for p in (out / "dicom").iterdir())
    assert series == ["b1", "pd", "residual", "t1", "t2"]
    ds = pydicom.dcmread(sorted((out / "dicom" / "t1").glob("*.dcm"))[0])
    assert ds.RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "ms"
    assert "[ms]" in ds.SeriesDescription


def test_frame_count_mismatch_is_a_clear_error(simulated, tmp_path):
    p = run("process", str(simulated / "frames"), "--pipeline", "mrf_maps_from_images", "--set", "sequence=t1ff",
            "--out", str(tmp_path), ok=False)
    assert p.returncode == 2 and "120 frames but sequence 't1ff' has 175" in p.stderr
