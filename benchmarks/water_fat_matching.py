"""Water/fat pair search: the fast search (coarse sub-grid + climb) against the exhaustive one, side by side.

    OMP_NUM_THREADS=1 python benchmarks/water_fat_matching.py [--voxels 4000] [--snr 30] [--matrix 64] [--coils 4]
                                                              [--cache DIR] [--skip-pairs]

The default complex t1ff dictionary (built into --cache if absent). Three inputs:

1. Held-out fingerprints: the water/fat EPG of random tissues (FF 0-1, T1 water 600-2500 ms, T2 water 20-80 ms,
   T1 fat 260-440 ms, B1 0.77-1.23, field offset +-38 Hz, random phase) plus complex Gaussian noise at --snr, as
   rank-8 coefficients (what the raw `mrf` pipeline matches) and as frames at the energy rank (image series).
2. The thigh phantom as raw radial t1ff data (--matrix, --coils, SNR 30), reconstructed as the `mrf` pipeline's
   water/fat default does (LLR 2x2, ESPIRiT maps), matched both ways.
3. The same slice whole, background included, with the fast search without and with the pipeline's background
   shortcut (`coarse_below`): seconds, how many voxels it places coarsely, and how many object voxels change.

For each: seconds of both searches, the speed-up, the fraction of voxels where both pick the same pair, the fraction
where the fast pair explains as much energy as the exhaustive one (within 1e-5 of ||x||^2), the 99th percentile of
|FF fast - FF exhaustive|, and the median error of FF (points) and T1 water (%) against the truth (for the thigh: per
muscle, worst and mean).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MUSCLE_EXCLUDE = ("subcutaneous_fat", "intermuscular_fat", "bone_marrow", "cortical_bone")


def random_tissues(seq, n: int, snr: float) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    from pipelines.physics.epg import epg_water_fat

    rng = np.random.default_rng(5)
    truth = {
        "ff": rng.uniform(0, 1, n),
        "t1w": rng.uniform(600, 2500, n),
        "t2w": rng.uniform(20, 80, n),
        "t1f": rng.uniform(260, 440, n),
        "b1": rng.uniform(0.77, 1.23, n),
        "df": rng.uniform(-38, 38, n),
    }
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in truth.items()}
    x = epg_water_fat(
        seq, t["ff"], t["t1w"], t["t2w"], t["t1f"], torch.full((n,), 68.0, dtype=torch.float64), t["b1"], t["df"],
        field_strength_T=3.0,
    )
    x = x * torch.exp(1j * torch.as_tensor(rng.uniform(-np.pi, np.pi, n)))[:, None]
    sigma = float(x.abs().pow(2).mean().sqrt()) / snr
    g = torch.Generator().manual_seed(6)
    noise = sigma / np.sqrt(2) * (torch.randn(x.shape, generator=g, dtype=torch.float64)
                                  + 1j * torch.randn(x.shape, generator=g, dtype=torch.float64))
    return (x + noise).to(torch.complex64), truth


def thigh_coefficients(seq, dictionary, matrix: int, coils: int) -> tuple[torch.Tensor, dict[str, np.ndarray], dict]:
    from pipelines.io.mrd_reader import raw_study_from_hdf5
    from pipelines.recon import llr
    from pipelines.recon.subspace import slice_operator
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import write_ismrmrd

    study = simulate_study("thigh", seq, AcquisitionSettings(trajectory="radial", coils=coils, snr=30.0),
                           matrix=matrix)
    with tempfile.TemporaryDirectory() as tmp:
        raw = raw_study_from_hdf5(write_ismrmrd(study, Path(tmp) / "thigh.h5"))
    rows = np.flatnonzero(raw.slice == raw.slice[0])
    basis = dictionary.complex.basis[:, :8]
    op, data = slice_operator(raw, rows, basis, torch.device("cpu"), weighted=True, maps="espirit")
    c = llr.llr_reconstruct(op, data, block=2).coefficients
    mask = study.truth["mask"].astype(bool)
    labels = study.truth["labels"][mask]
    truth = {"ff": study.truth["ff_percent"][mask] / 100, "t1w": study.truth["t1_water_ms"][mask]}
    rois = {name: labels == k for k, name in study.label_names.items() if name not in MUSCLE_EXCLUDE}
    return torch.as_tensor(c[:, mask].T.copy()), truth, rois, torch.as_tensor(c.reshape(c.shape[0], -1).T.copy()), mask


def background_shortcut(label: str, x_all: torch.Tensor, mask: np.ndarray, dictionary) -> None:
    """The whole slice, background included (what the pipeline matches), fast search without and with the
    pipeline's background shortcut (voxels below a quarter of the PD mask threshold keep their coarse pair)."""
    from pipelines.mapping.maps import _COARSE_MARGIN, MappingOptions
    from pipelines.mapping.matching import weak_voxels
    from pipelines.mapping.water_fat import match_water_fat

    below = MappingOptions().mask_threshold * _COARSE_MARGIN
    match_water_fat(x_all[:64], dictionary, coefficients=True, rank=8)  # warm-up: the pair grid, built once
    res, secs = {}, {}
    for name, cb in (("off", 0.0), ("on", below)):
        t0 = time.perf_counter()
        res[name] = match_water_fat(x_all, dictionary, coefficients=True, rank=8, coarse_below=cb)
        secs[name] = time.perf_counter() - t0
    weak = weak_voxels(x_all[:, :8], below)
    assert weak is not None
    weak_np = weak.numpy()
    inside = mask.reshape(-1)
    a, b = res["off"], res["on"]
    changed = ~np.all([getattr(a, k) == getattr(b, k) for k in ("t1_ms", "t2_ms", "b1", "df_hz", "t1_fat_ms")], 0)
    print(f"| {label} | {x_all.shape[0]} | {100 * weak_np.mean():.1f} % | {int((weak_np & inside).sum())} | "
          f"{secs['off']:.2f} | {secs['on']:.2f} | {secs['off'] / secs['on']:.2f}x | "
          f"{int((changed & inside).sum())} |", flush=True)


def compare(label: str, x: torch.Tensor, dictionary, truth: dict, rois: dict | None, **kw) -> None:
    from pipelines.mapping.water_fat import match_water_fat

    res, secs = {}, {}
    for search in ("exhaustive", "fast"):
        match_water_fat(x[:64], dictionary, search=search, **kw)  # warm-up (and the grid index, built once)
        t0 = time.perf_counter()
        res[search] = match_water_fat(x, dictionary, search=search, **kw)
        secs[search] = time.perf_counter() - t0
    e, f = res["exhaustive"], res["fast"]
    same = np.mean(np.all([getattr(e, k) == getattr(f, k) for k in ("t1_ms", "t2_ms", "b1", "df_hz", "t1_fat_ms")], 0))
    # Explained energy 1 - residual^2 (relative to ||x||^2) of each pick.
    ee, ef = 1 - e.residual.astype(np.float64) ** 2, 1 - f.residual.astype(np.float64) ** 2
    as_good = np.mean(ef >= ee - 1e-5)
    dff = 100 * np.percentile(np.abs(f.ff - e.ff), 99)
    if rois is None:
        ff_err = [f"{100 * np.median(np.abs(r.ff - truth['ff'])):.2f}" for r in (e, f)]
        t1_err = [f"{100 * np.median(np.abs(r.t1_ms / truth['t1w'] - 1)):.2f}" for r in (e, f)]
    else:
        def per_muscle(r, v: np.ndarray, t: np.ndarray, rel: bool) -> str:
            errs = [np.median(np.abs(v[m] / t[m] - 1) if rel else np.abs(v[m] - t[m])) * 100 for m in rois.values()]
            return f"{max(errs):.2f} / {np.mean(errs):.2f}"

        ff_err = [per_muscle(r, r.ff, truth["ff"], False) for r in (e, f)]
        t1_err = [per_muscle(r, r.t1_ms, truth["t1w"], True) for r in (e, f)]
    print(f"| {label} | {x.shape[0]} | {secs['exhaustive']:.1f} | {secs['fast']:.2f} | "
          f"{secs['exhaustive'] / secs['fast']:.0f}x | {100 * same:.1f} % | {100 * as_good:.1f} % | {dff:.2f} | "
          f"{ff_err[0]} vs {ff_err[1]} | {t1_err[0]} vs {t1_err[1]} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=4000)
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument("--matrix", type=int, default=64)
    ap.add_argument("--coils", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--skip-pairs", action="store_true", help="only the whole-slice background-shortcut table")
    a = ap.parse_args()
    from pipelines.mapping.dictionary import build_dictionary, t1ff_spec
    from pipelines.physics.sequences import t1ff_sequence

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seq = t1ff_sequence()
    d = build_dictionary(seq, t1ff_spec(3.0, True), cache_dir=a.cache)
    n_pairs = sum(int(w.numel() * f.numel()) for w, f in _groups(d))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
          f"{d.params['water'].shape[0]} water + {d.params['fat'].shape[0]} fat atoms, {n_pairs} pairs\n")
    print("| input | voxels | exhaustive s | fast s | speed-up | same pair | fast explains as much | p99 dFF (pp) "
          "| FF err exh vs fast (pp) | T1 water err exh vs fast (%) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if not a.skip_pairs:  # the exhaustive searches take minutes
        x, truth = random_tissues(seq, a.voxels, a.snr)
        compare(f"random tissues, SNR {a.snr:g}, rank 8 coefficients", x @ d.complex.basis[:, :8], d, truth, None,
                coefficients=True, rank=8)
        compare(f"random tissues, SNR {a.snr:g}, frames (energy rank)", x, d, truth, None)
    x, truth, rois, x_all, mask = thigh_coefficients(seq, d, a.matrix, a.coils)
    if not a.skip_pairs:
        compare(f"thigh, raw radial {a.matrix}², {a.coils} coils, default recon (muscles: worst / mean)", x, d,
                truth, rois, coefficients=True, rank=8)
    print("\n| whole slice | voxels | weak (coarse only) | weak inside the object | fast s | fast + shortcut s | "
          "speed-up | object voxels changed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    background_shortcut(f"thigh, raw radial {a.matrix}², {a.coils} coils", x_all, mask, d)
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB")


def _groups(d):
    from pipelines.mapping.water_fat import _pair_grid

    return _pair_grid(d, d.complex.basis.device).groups


if __name__ == "__main__":
    main()
