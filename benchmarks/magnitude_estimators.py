"""Learned estimators on magnitude image series (the usual DICOM input): shipped ``*_magnitude`` weights against
dictionary matching on magnitudes, through the ``mrf_maps_from_images`` pipeline.

    OMP_NUM_THREADS=1 python benchmarks/magnitude_estimators.py [--matrix 64] [--seeds 9101 9102] [--snr 30]

Held-out randomised phantoms (pose, tissue values, texture, B1, off-resonance drawn per seed; no seed used in
training, which saw random parameter sets only): ``fisp`` on the brain (white and grey matter), ``t1ff`` on the
thigh (the eleven muscles pooled). Images are |fingerprint| plus Rician noise (complex Gaussian noise of standard
deviation mean-object-signal / SNR per frame, then the magnitude). Cells: median |relative error| over the
tissue's voxels of all seeds (FF: median absolute error in percentage points), and seconds per slice.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipelines.definitions import get_pipeline
from pipelines.physics.sequences import get_sequence
from pipelines.sim.acquisition import magnitude_study
from pipelines.sim.phantoms import Phantom, make_phantom

ESTIMATORS = ("dictionary", "fc", "inn", "blochnet", "hybrid")
SETUPS = {"fisp": ("brain", ("white_matter", "grey_matter")), "t1ff": ("thigh", ("muscle",))}


def tissue_masks(phantom: Phantom, tissues: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Voxel masks per scored tissue; ``muscle`` pools every muscle of the thigh (labels not fat, bone or skin)."""
    out = {}
    for t in tissues:
        if t == "muscle":
            from pipelines.sim.phantoms import _MUSCLE_FF

            ids = [k for k, v in phantom.label_names.items() if v in _MUSCLE_FF]
        else:
            ids = [k for k, v in phantom.label_names.items() if v == t]
        out[t] = np.isin(phantom.labels, ids)
    return out


def evaluate(seq_name: str, estimator: str, matrix: int, seeds: list[int], snr: float) -> dict[str, float]:
    """Pooled errors of one estimator over ``seeds``: {"<tissue> t1": %, "<tissue> t2": % or "<tissue> ff": pp,
    "seconds": per slice}."""
    name, tissues = SETUPS[seq_name]
    seq = get_sequence(seq_name)
    pipe = get_pipeline("mrf_maps_from_images")
    errs: dict[str, list[np.ndarray]] = {}
    secs = []
    for seed in seeds:
        ph = make_phantom(name, matrix, seed=seed, randomize=True)
        study = magnitude_study(ph, seq, snr, seed)
        t0 = time.perf_counter()
        maps = {m.kind: m.data[0] for m in pipe(study, {"estimator": estimator})}
        secs.append(time.perf_counter() - t0)
        for t, roi in tissue_masks(ph, tissues).items():
            if seq_name == "fisp":
                errs.setdefault(f"{t} t1", []).append(maps["t1"][roi] / ph.t1_water_ms[roi] - 1)
                errs.setdefault(f"{t} t2", []).append(maps["t2"][roi] / ph.t2_water_ms[roi] - 1)
            else:
                errs.setdefault(f"{t} t1", []).append(maps["t1"][roi] / ph.t1_water_ms[roi] - 1)
                errs.setdefault(f"{t} ff", []).append(maps["ff"][roi] / 100.0 - ph.ff[roi])
    out = {k: float(np.median(np.abs(np.concatenate(v)))) * 100 for k, v in errs.items()}
    out["seconds"] = float(np.mean(secs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[9101, 9102])
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument("--sequences", nargs="+", default=["fisp", "t1ff"], choices=tuple(SETUPS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for seq_name in args.sequences:
        rows = {e: evaluate(seq_name, e, args.matrix, args.seeds, args.snr) for e in ESTIMATORS}
        cols = [k for k in rows["dictionary"] if k != "seconds"]
        print(
            f"\n### {seq_name}, magnitude images, {args.matrix}x{args.matrix}, SNR {args.snr:g}, seeds "
            f"{', '.join(map(str, args.seeds))}\n"
        )
        unit = {"t1": "T1 %", "t2": "T2 %", "ff": "FF pp"}
        print("| estimator | " + " | ".join(f"{c.split()[0]} {unit[c.split()[1]]}" for c in cols) + " | s / slice |")
        print("|---|" + "---:|" * (len(cols) + 1))
        for e, r in rows.items():
            print(f"| {e} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + f" | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
