"""Shared test set-up: explicit thread counts (CI has 2 cores) and small simulated studies."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def short_fisp():
    """The first 200 TRs of the built-in FISP schedule: realistic pulses, test-sized runtime."""
    from pipelines.physics.sequences import MRFSequence, fisp_sequence

    s = fisp_sequence()
    n = 200
    return MRFSequence("fisp200", s.flip_angles_deg[:n], s.tr_ms[:n], s.te_ms[:n], ti_ms=s.ti_ms)


@pytest.fixture(scope="session")
def cartesian_study(short_fisp):
    """Fully sampled, noiseless Cartesian brain study, 32x32, 4 coils."""
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study

    return simulate_study("brain", short_fisp, AcquisitionSettings(coils=4, snr=float("inf")), matrix=32)


@pytest.fixture(scope="session", autouse=True)
def dict_cache(tmp_path_factory):
    """One dictionary cache for the whole run (and for CLI subprocesses), never the user's home cache.

    ``RECON_NODE_TEST_CACHE`` names a folder to reuse between local runs (CI leaves it unset: a fresh build).
    """
    from pathlib import Path

    keep = os.environ.get("RECON_NODE_TEST_CACHE")
    path = Path(keep) if keep else tmp_path_factory.mktemp("dictionaries")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["RECON_NODE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def held_out_brain_64(tmp_path_factory):
    """(study, raw): the held-out band-limited brain the raw-path accuracy tests share (seed 9002, 64², 8 coils, one
    spiral interleaf per frame, SNR 30, drawn 2x finer), simulated once and read back through its ISMRMRD file."""
    from pipelines.io.mrd_reader import raw_study_from_hdf5
    from pipelines.physics.sequences import fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings
    from pipelines.sim.bandlimited import simulate_bandlimited
    from pipelines.sim.mrd_writer import write_ismrmrd

    settings = AcquisitionSettings(trajectory="spiral", coils=8, snr=30, seed=9002)
    study = simulate_bandlimited("brain", fisp_sequence(), settings, matrix=64, randomize=True)
    path = tmp_path_factory.mktemp("held_out_brain") / "s.h5"
    write_ismrmrd(study, path)
    return study, raw_study_from_hdf5(path)
