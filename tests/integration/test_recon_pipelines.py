"""cartesian_recon / noncartesian_recon end to end, against ismrmrd-tools' reference and simulated truth.

Files come from Debian's ismrmrd-tools: ``ismrmrd_generate_cartesian_shepp_logan`` stores the true phantom in
``/dataset/phantom`` and readouts with 2x readout oversampling (encodedSpace 128 x 64, reconSpace 64 x 64);
``ismrmrd_recon_cartesian_2d`` writes its IFFT + root-sum-of-squares image to ``/dataset/cpp/data``.
Measured (64 x 64, 4 coils, noise 0.05): ismrmrd_recon_cartesian_2d 23.1 dB, ours (CG-SENSE, ESPIRiT) 26.7 dB;
``-a 2`` repetition 0 alone: adjoint 18.2 dB, CG-SENSE 21.8 dB.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.recon.nufft import nufft_forward
from pipelines.recon.raw_prep import cartesian_kspace, noncartesian_samples
from pipelines.definitions import get_pipeline
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import make_phantom
from pipelines.sim.trajectories import radial_trajectory
from pipelines.types import Geometry, RawStudy, StudyInfo

TOOLS = shutil.which("ismrmrd_generate_cartesian_shepp_logan") and shutil.which("ismrmrd_recon_cartesian_2d")
needs_tools = pytest.mark.skipif(not TOOLS, reason="ismrmrd-tools not installed (apt-get install ismrmrd-tools)")


def psnr(x: np.ndarray, truth: np.ndarray) -> float:
    a, t = np.abs(x), np.abs(truth)
    s = (a * t).sum() / (a * a).sum()
    return float(10 * np.log10(t.max() ** 2 / ((s * a - t) ** 2).mean()))


def _complex(ds: h5py.Dataset) -> np.ndarray:
    a = ds[...]
    return a["real"] + 1j * a["imag"] if a.dtype.names else a


@pytest.fixture(scope="module")
def shepp(tmp_path_factory):
    if not TOOLS:
        pytest.skip("ismrmrd-tools not installed")
    d = tmp_path_factory.mktemp("shepp")
    full, acc = d / "full.h5", d / "acc2.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "64", "-c", "4", "-o", str(full)],
                   check=True, capture_output=True)
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "64", "-c", "4", "-a", "2", "-o", str(acc)],
                   check=True, capture_output=True)
    ref = d / "ref.h5"
    shutil.copy(full, ref)
    subprocess.run(["ismrmrd_recon_cartesian_2d", str(ref)], check=True, capture_output=True)
    with h5py.File(ref) as f:
        truth = np.abs(_complex(f["dataset/phantom"]))[0]
        theirs = f["dataset/cpp/data"][...].reshape(truth.shape)
    return {"full": full, "acc": acc, "truth": truth, "theirs": theirs}


@needs_tools
@pytest.mark.integration
def test_cartesian_recon_beats_ismrmrd_reference(shepp):
    raw = raw_study_from_hdf5(shepp["full"])
    k, mask = cartesian_kspace(raw)
    assert k.shape == (1, 4, 64, 64) and mask.all()  # readout oversampling cropped: 128 samples -> 64 pixels
    ours = get_pipeline("cartesian_recon")(raw)[0]
    assert ours.kind == "image" and ours.data.dtype == np.float32 and ours.data.shape == (1, 64, 64)
    p_ours, p_theirs = psnr(ours.data[0], shepp["truth"]), psnr(shepp["theirs"], shepp["truth"])
    assert p_theirs > 20  # sanity of the reference (measured 23.1 dB)
    assert p_ours >= p_theirs + 2  # measured +3.6 dB


@needs_tools
@pytest.mark.integration
def test_cartesian_recon_undersampled_repetition(shepp):
    raw = raw_study_from_hdf5(shepp["acc"])
    _, mask = cartesian_kspace(raw, frame=0)
    assert mask[0, :, 0].sum() == 32  # every other line
    spec = get_pipeline("cartesian_recon")
    adj = psnr(spec(raw, {"frame": 0, "recon": "adjoint"})[0].data[0], shepp["truth"])
    cg = psnr(spec(raw, {"frame": 0})[0].data[0], shepp["truth"])
    assert cg >= 20.5  # measured 21.8 dB
    assert cg > adj + 2.5  # measured +3.6 dB
    # all repetitions averaged line by line fill k-space: fully sampled quality
    assert psnr(spec(raw, {"recon": "adjoint"})[0].data[0], shepp["truth"]) > 25


@needs_tools
@pytest.mark.integration
def test_cli_process_cartesian_recon(shepp, tmp_path):
    from node.cli import main

    out = tmp_path / "out"
    rc = main(["process", str(shepp["full"]), "--pipeline", "cartesian_recon", "--set", "recon=l1",
               "--out", str(out), "--no-dicom", "--quiet"])
    assert rc == 0
    images = np.load(out / "images.npz")["image"]
    assert images.shape == (1, 64, 64)
    assert psnr(images[0], shepp["truth"]) > 25


# ---- non-Cartesian: a radial RawStudy built from the simulator's pieces (no EPG needed) -------------------------
def _radial_raw(n: int = 64, coils: int = 4, spokes: int = 80, kind: str = "radial") -> tuple[RawStudy, np.ndarray]:
    pd = make_phantom("brain", n).pd.astype(np.complex64)
    maps = birdcage_maps(coils, (n, n)).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0))
    traj = radial_trajectory(spokes, 2 * n, n)  # [spokes, samples, 2]
    data = nufft_forward(maps * pd, traj.reshape(-1, 2)).reshape(coils, spokes, -1).transpose(1, 0, 2)
    rng = np.random.default_rng(0)
    data = data + 0.01 * (rng.standard_normal(data.shape) + 1j * rng.standard_normal(data.shape))
    raw = RawStudy(header_xml="", data=data.astype(np.complex64), trajectory=traj, line=np.arange(spokes),
                   frame=np.arange(spokes) // 10, slice=np.zeros(spokes, int), flags=np.zeros(spokes, np.uint64),
                   matrix=(n, n), fov_mm=(240.0, 240.0), trajectory_kind=kind, study=StudyInfo(),
                   geometry=Geometry.centred((n, n), (240.0, 240.0)), source_path="sim.h5")
    return raw, pd


def test_noncartesian_recon_radial():
    raw, pd = _radial_raw(spokes=40)
    data, k = noncartesian_samples(raw)
    assert data.shape == (1, 4, 40 * 128) and k.shape == (40 * 128, 2)
    spec = get_pipeline("noncartesian_recon")
    adj = psnr(spec(raw, {"recon": "adjoint"})[0].data[0], pd)
    cg = psnr(spec(raw, {"recon": "cgsense"})[0].data[0], pd)
    l1 = psnr(spec(raw, {"recon": "l1"})[0].data[0], pd)
    # 40 of the 101 Nyquist spokes: measured adjoint 19.9, CG-SENSE 24.5, L1 28.4 dB
    assert adj > 18.5 and cg > adj + 3.5 and l1 > cg + 2.5
    explicit = psnr(spec(raw, {"recon": "cgsense", "toeplitz": False})[0].data[0], pd)
    assert abs(explicit - cg) < 0.05  # Toeplitz and NUFFT-pair normal operators agree


# ---- errors that name the field ----------------------------------------------------------------------------------
def test_errors_name_the_field():
    raw, _ = _radial_raw(n=32, spokes=8)
    cart = get_pipeline("cartesian_recon")
    nonc = get_pipeline("noncartesian_recon")
    with pytest.raises(ValueError, match="encoding.trajectory is 'radial'.*noncartesian_recon"):
        cart(raw)
    with pytest.raises(ValueError, match="trajectory"):
        nonc(dataclasses.replace(raw, trajectory=None))
    with pytest.raises(ValueError, match="encoding.trajectory is 'cartesian'"):
        nonc(dataclasses.replace(raw, trajectory_kind="cartesian"))
    with pytest.raises(ValueError, match="acquisition list is empty"):
        nonc(dataclasses.replace(raw, data=np.zeros((0, 4, 64), np.complex64)))
    with pytest.raises(ValueError, match="normalised"):
        nonc(dataclasses.replace(raw, trajectory=raw.trajectory / 32))
    hostile = raw.trajectory.copy()
    hostile[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 trajectory coordinates are NaN or infinite"):
        nonc(dataclasses.replace(raw, trajectory=hostile))
    # The MRF pipeline runs the same checks before anything reads the coordinates.
    with pytest.raises(ValueError, match="NaN or infinite"):
        get_pipeline("mrf")(dataclasses.replace(raw, trajectory=hostile))
    with pytest.raises(ValueError, match="beyond the encoded"):
        get_pipeline("mrf")(dataclasses.replace(raw, trajectory=raw.trajectory * 3))
    xml = ('<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><acquisitionSystemInformation>'
           '<receiverChannels>8</receiverChannels></acquisitionSystemInformation><experimentalConditions>'
           '<H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions><encoding><encodedSpace>'
           '<matrixSize><x>32</x><y>32</y><z>1</z></matrixSize><fieldOfView_mm><x>240</x><y>240</y><z>5</z>'
           '</fieldOfView_mm></encodedSpace><reconSpace><matrixSize><x>32</x><y>32</y><z>1</z></matrixSize>'
           '<fieldOfView_mm><x>240</x><y>240</y><z>5</z></fieldOfView_mm></reconSpace><encodingLimits/><trajectory>radial'
           '</trajectory></encoding></ismrmrdHeader>')
    with pytest.raises(ValueError, match="receiverChannels says 8"):
        nonc(dataclasses.replace(raw, header_xml=xml))
    cart_raw = dataclasses.replace(raw, trajectory=None, trajectory_kind="cartesian", data=raw.data[:, :, :48])
    with pytest.raises(ValueError, match="encodedSpace.matrixSize.x"):
        cart(cart_raw)
