"""What the smooth B1 field costs and what a better B1 would give: the raw path's T2 error against the B1 it is
matched at.

    OMP_NUM_THREADS=2 python benchmarks/b1_field_budget.py [--matrix 128] [--coils 8] [--seeds 9002 9003]
        [--cache DIR]

Held-out band-limited brains as in benchmarks/mrf_accuracy.py (FISP 1000 frames, one spiral interleaf per frame,
SNR 30, lesions of 3, 6, 10 and 30 voxels). Two sets of coefficient images per brain:

- ``recon``: the default ``mrf`` pipeline's reconstruction (coupled TV), tapped where the pipeline hands it to the
  matching;
- ``ideal``: each voxel's mean fingerprint over its fine pixels on the same basis (a perfect reconstruction;
  :func:`mrf_accuracy.ideal_coefficients`).

Each is matched with B1 free (voxel by voxel), held at the default smooth field, at two other fields built from the
free match (fluid left out of the weights with a local linear fit; the default's weights reweighted by Tukey's
biweight at 10 %, four times), at a simulated measured B1 series (64 x 64 over 256 mm, one 8 mm slice, 3 % noise,
air 0; read through :func:`b1_from_series` and :func:`resample_b1` as the pipeline reads one: smoothed as ``b1_map``
smooths by default, not smoothed, smoothed more, and calibrated 3 % high), and at the true B1 (what a measured B1
map would give at best). Per tissue: median
|relative error| of T1 / T2, and the median signed error of the B1 each voxel was matched at. Voxels of all seeds
are pooled.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mrf_accuracy import TISSUES, ideal_coefficients, lesion_class, rois

import pipelines.definitions.mrf as mrf_definition
from pipelines.definitions import get_pipeline
from pipelines.io.dicom_reader import image_study_from_dicom
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.mapping.b1_field import FIT_RESIDUAL, FLUID_T2_MS, smooth_field
from pipelines.mapping.b1_measured import DEFAULT_SMOOTH_MM, b1_from_series, resample_b1
from pipelines.mapping.maps import MappingOptions, estimate_maps
from pipelines.physics.sequences import fisp_sequence
from pipelines.registry import RunContext
from pipelines.sim.acquisition import AcquisitionSettings
from pipelines.sim.b1_series import simulate_b1_series, write_b1_series
from pipelines.sim.bandlimited import simulate_bandlimited, white_matter_lesions
from pipelines.sim.mrd_writer import write_ismrmrd
from pipelines.types import Geometry, StudyInfo

ROWS = (
    "free",
    "smooth field (default)",
    "field: no fluid, local linear",
    "field: Tukey-robust",
    "measured B1 series (4 mm, 8 mm slice, 3 % noise), smoothed 6 mm (b1_map default)",
    "the same, not smoothed",
    "the same, smoothed 10 mm",
    "the same, smoothed 6 mm, calibrated 3 % high",
    "true B1",
)
# A measured B1 series as a site acquires one (a saturated turbo-FLASH / tfl_b1map): 64 x 64 over 256 mm, one 8 mm
# slice, each voxel the mean of the true B1 over its area with 3 % noise, stored x800 like tfl_b1map.
B1_SERIES_NOISE = 0.03
COLUMNS = (*TISSUES[:3], "lesion 8-12", "lesion 5-7", "lesion 3")
SHORT = {"white_matter": "WM", "grey_matter": "GM", "csf": "CSF"}


def fields(free: dict[str, np.ndarray], sigma_px: tuple[float, float]) -> dict[str, np.ndarray]:
    """The two alternative fields from a free match's maps (b1, t2, pd, residual in %)."""
    weight = np.where(free["residual"] / 100 < FIT_RESIDUAL, free["pd"], 0.0)
    b1 = np.where(free["pd"] > 0, free["b1"], np.nan)
    linear = smooth_field(b1, np.where(free["t2"] <= FLUID_T2_MS, weight, 0.0), sigma_px, order=1)
    robust = smooth_field(b1, weight, sigma_px)
    for _ in range(4):
        r = np.nan_to_num(b1 - robust) / 0.10
        robust = smooth_field(b1, weight * np.where(abs(r) < 1, (1 - r**2) ** 2, 0.0), sigma_px, fallback=robust)
    return {ROWS[2]: linear, ROWS[3]: robust}


def measured_b1(
    truth_b1: np.ndarray, body: np.ndarray, target: Geometry, seed: int, gain: float, smooth_mm: float = 0.0
) -> np.ndarray:
    """A simulated B1 series of the slab (pipelines/sim/b1_series.py), through DICOM and back as the node reads it,
    on the maps' voxels."""
    rel, g = simulate_b1_series(truth_b1, body, target, noise=B1_SERIES_NOISE, gain=gain, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_b1_series(rel, g, StudyInfo(study_instance_uid="1.2.826.0.1.3680043.8.498.1"), tmp)
        return resample_b1(b1_from_series(image_study_from_dicom(tmp), 800.0, smooth_mm), target)


def match_rows(
    c: np.ndarray,
    geometry: Geometry,
    options: MappingOptions,
    truth_b1: np.ndarray,
    body: np.ndarray,
    seed: int,
    **kw: Any,
) -> dict[str, dict[str, np.ndarray]]:
    seq = fisp_sequence()

    def run(opts: MappingOptions, b1_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {m.kind: m.data[0] for m in estimate_maps(c, seq, geometry, opts, b1_map=b1_map, **kw)}

    free_opts = replace(options, b1_smooth_mm=0.0)
    out = {ROWS[0]: run(free_opts), ROWS[1]: run(replace(options, b1_smooth_mm=mrf_definition.AUTO_B1_SMOOTH_MM))}
    dy, dx = geometry.pixel_spacing_mm
    sigma = (mrf_definition.AUTO_B1_SMOOTH_MM / dy, mrf_definition.AUTO_B1_SMOOTH_MM / dx)
    for name, field in fields(out[ROWS[0]], sigma).items():
        out[name] = run(free_opts, field)
    variants = ((1.0, DEFAULT_SMOOTH_MM), (1.0, 0.0), (1.0, 10.0), (1.03, DEFAULT_SMOOTH_MM))
    for row, (gain, smooth) in zip(ROWS[4:8], variants, strict=True):
        out[row] = run(options, measured_b1(truth_b1, body, geometry, seed, gain, smooth))
    out[ROWS[8]] = run(free_opts, truth_b1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=128)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[9002, 9003])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="dictionary cache (default: the user's cache)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else None
    seq = fisp_sequence()
    log = logging.getLogger("b1_field_budget")
    pooled: dict[tuple[str, str, str], dict[str, list[np.ndarray]]] = {}
    t_start = time.perf_counter()
    tapped: dict[str, Any] = {}

    def tap(coefficients: np.ndarray, *a: Any, **kw: Any) -> Any:
        """The pipeline's call of estimate_maps, recorded (coefficients, geometry, options, basis, dictionary)."""
        tapped.update(coefficients=coefficients, geometry=a[1], options=a[2], kw=kw)
        return estimate_maps(coefficients, *a, **kw)

    for seed in args.seeds:
        settings = AcquisitionSettings(trajectory="spiral", coils=args.coils, snr=30.0, seed=seed)
        lesions = white_matter_lesions("brain", args.matrix, seed, [3, 6, 10, 30])
        study = simulate_bandlimited(
            "brain", seq, settings, matrix=args.matrix, oversample=2, randomize=True, lesions=lesions
        )
        truth = study.truth
        regions = rois(truth, study.label_names)
        body = truth["labels"] > 0
        mrf_definition.estimate_maps = tap  # type: ignore[assignment]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "study.h5"
                write_ismrmrd(study, path)
                get_pipeline("mrf")(raw_study_from_hdf5(path), {}, RunContext(cache_dir=cache, log=log))
        finally:
            mrf_definition.estimate_maps = estimate_maps
        kw = {k: tapped["kw"][k] for k in ("basis", "dictionary")}
        sources = {
            "recon": match_rows(
                tapped["coefficients"], tapped["geometry"], tapped["options"], truth["b1"], body, seed, **kw
            )
        }
        c, basis, d = ideal_coefficients(seq, args.matrix, 2, seed, True, lesions, cache)
        sources["ideal"] = match_rows(
            c,
            Geometry.centred((args.matrix, args.matrix), (240.0, 240.0)),
            MappingOptions(rank=basis.shape[1]),
            truth["b1"],
            body,
            seed,
            basis=basis,
            dictionary=d,
        )
        for source, rows in sources.items():
            for row, maps in rows.items():
                for col in COLUMNS:
                    roi = np.zeros(truth["labels"].shape, bool)
                    for name, r in regions.items():
                        if name == col or (name.startswith("lesion ") and lesion_class(int(r.sum())) == col):
                            roi |= r
                    if not roi.any():
                        continue
                    slot = pooled.setdefault((source, row, col), {"t1": [], "t2": [], "b1": []})
                    slot["t1"].append(maps["t1"][roi] / truth["t1_water_ms"][roi] - 1)
                    slot["t2"].append(maps["t2"][roi] / truth["t2_water_ms"][roi] - 1)
                    slot["b1"].append(maps["b1"][roi] / truth["b1"][roi] - 1)
        print(f"  seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    print(
        f"\n### {args.matrix}x{args.matrix}, {args.coils} coils, seeds {', '.join(map(str, args.seeds))}\n\n"
        "Cells: median |error| T1 / T2 % (median signed error of the B1 matched at, %).\n"
    )
    cols = [c for c in COLUMNS if any(k[2] == c for k in pooled)]
    print("| coefficients | B1 | " + " | ".join(SHORT.get(c, c) for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for source in ("recon", "ideal"):
        for row in ROWS:
            cells = []
            for col in cols:
                slot = pooled.get((source, row, col))
                if slot is None:
                    cells.append("")
                    continue
                e = {q: np.concatenate(v) for q, v in slot.items()}
                cells.append(
                    f"{100 * np.median(abs(e['t1'])):.1f} / {100 * np.median(abs(e['t2'])):.1f} "
                    f"({100 * np.median(e['b1']):+.1f})"
                )
            print(f"| {source} | {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
