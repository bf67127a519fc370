"""Raw MRF accuracy per tissue: back-projection, CG-SENSE (+/- Hann), locally low-rank ADMM (+/- Hann), NC-PDNet.

    OMP_NUM_THREADS=1 python benchmarks/mrf_accuracy.py [--matrix 64 [128 256]] [--coils 8] [--sim pixel bandlimited]
        [--phantom canonical|random] [--seeds 9001 9002 9003] [--lesions 3 6 10 30] [--cases 1 3] [--json F]

Brain phantom, FISP 1000 frames, one spiral interleaf (or, ``--trajectory radial``, one spoke; ``cartesian``: every
``--acceleration``-th phase-encoding line, shifted frame to frame) per frame, SNR 30,
through the ``mrf`` pipeline (ISMRMRD file -> reconstruction -> dictionary matching, defaults except the listed
parameters). Two simulations:
``pixel`` is :func:`pipelines.sim.acquisition.simulate_study` (k-space of the phantom drawn on the recon matrix),
``bandlimited`` is :func:`pipelines.sim.bandlimited.simulate_bandlimited` (the phantom drawn ``--oversample``
times finer, sampled at the same k-space positions: what a scanner sees of a continuous object).

``--phantom random`` (held-out): each seed draws pose, tissue values, a 4 % texture, B1 and off-resonance, and
round white-matter lesions of ``--lesions`` voxels (at the recon matrix) besides the phantom's own lesion; the
tables pool the voxels of all seeds. ``canonical`` is the fixed phantom of the earlier tables.

Prints one markdown table per matrix and simulation: per tissue the median |relative error| of T1 and T2 over the
tissue's voxels and, in brackets, the median signed error (the ROI bias); lesions are scored one connected
component at a time and pooled by size. Seconds: the reconstruction per slice (from the pipeline's log) and the
whole pipeline (reconstruction + matching + maps) per slice.

Band-limited runs add two things that separate the reconstruction's error from what no reconstruction can undo:
a floor row (``ideal voxel``: each voxel's mean fingerprint over its fine pixels, all k-space, no noise, matched as
the pipeline matches; skip with ``--no-ideal``) and a second table over interior voxels only (the voxel and its
8 neighbours wholly inside the tissue on the fine grid, from ``truth["purity"]``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.definitions import get_pipeline
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.mapping.dictionary import MRFDictionary, build_dictionary
from pipelines.mapping.maps import MappingOptions, default_spec, estimate_maps
from pipelines.physics.sequences import MRFSequence, fisp_sequence
from pipelines.recon.fat_subspace import with_fat_directions
from pipelines.registry import RunContext
from pipelines.sim.acquisition import AcquisitionSettings, fingerprint_images, simulate_study
from pipelines.sim.bandlimited import simulate_bandlimited, voxel_means, white_matter_lesions
from pipelines.sim.mrd_writer import write_ismrmrd
from pipelines.sim.phantoms import make_phantom
from pipelines.types import Geometry

CASES: list[tuple[str, dict[str, object]]] = [
    ("back-projection (adjoint) + Hann", {"recon": "adjoint", "filter": "hann"}),
    ("CG-SENSE + Hann (default: + 2 fat directions)", {"recon": "cgsense", "filter": "hann"}),
    ("CG-SENSE + Hann, no fat directions (before)", {"recon": "cgsense", "filter": "hann", "fat_directions": 0}),
    ("CG-SENSE, no filter", {"recon": "cgsense", "filter": "none"}),
    ("LLR (ADMM), no filter", {"recon": "llr", "filter": "none"}),
    ("LLR (ADMM) + Hann", {"recon": "llr", "filter": "hann"}),
    ("NC-PDNet (shipped weights)", {"recon": "ncpdnet", "filter": "none"}),
    ("coupled TV (ADMM), no filter", {"recon": "tv", "filter": "none"}),
    ("coupled TV (ADMM) + Hann", {"recon": "tv", "filter": "hann"}),
]
TISSUES = ("white_matter", "grey_matter", "csf", "ventricles")
SHORT = {"white_matter": "WM", "grey_matter": "GM", "csf": "CSF", "ventricles": "ventr."}


class _SliceTimes(logging.Handler):
    """Collects the seconds of each slice's reconstruction from the pipeline's log record."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("slice %d/%d") and isinstance(record.args, tuple):
            self.seconds.append(float(record.args[5]))


def rois(truth: dict[str, np.ndarray], names: dict[int, str]) -> dict[str, np.ndarray]:
    """Scored regions: the tissues of TISSUES (both ventricles as one), each lesion component as ``lesion <voxels>``
    (pooled later by size class) and, for band-limited data, ``<tissue> interior``: the tissue's voxels whose 3 x 3
    neighbourhood lies wholly inside it on the fine grid (no partial volume within a voxel of them)."""
    from scipy.ndimage import binary_erosion, label

    labels = truth["labels"]
    ids = {v: k for k, v in names.items()}
    out: dict[str, np.ndarray] = {}
    for t in TISSUES:
        wanted = [k for n, k in ids.items() if n == t or (t == "ventricles" and n.startswith("lateral_ventricle"))]
        roi = np.isin(labels, wanted)
        if roi.any():
            out[t] = roi
    if "purity" in truth:  # band-limited: the same tissues without the voxels the fine object's edges touch
        pure = truth["purity"] >= 1.0
        for t in TISSUES:
            if t in out:
                core = binary_erosion(out[t] & pure, np.ones((3, 3), bool))
                if core.any():
                    out[f"{t} interior"] = core
    if "lesion" in ids:
        comp, n = label(labels == ids["lesion"])
        for i in range(1, n + 1):
            out[f"lesion {int((comp == i).sum())}"] = comp == i
    return out


def lesion_class(voxels: int) -> str:
    return (
        "lesion 3"
        if voxels <= 4
        else "lesion 5-7"
        if voxels <= 7
        else "lesion 8-12"
        if voxels <= 12
        else ("lesion 13-40" if voxels <= 40 else "lesion >40")
    )


def relative_errors(
    maps: dict[str, np.ndarray], truth: dict[str, np.ndarray], roi: np.ndarray
) -> dict[str, np.ndarray]:
    return {q: maps[q][roi] / truth[f"{q}_water_ms"][roi] - 1 for q in ("t1", "t2")}


IDEAL = "ideal voxel: the fine object's f x f mean, all k-space, no noise (floor)"


def ideal_coefficients(
    seq: MRFSequence, matrix: int, oversample: int, seed: int, random: bool, lesions: list, cache: Path | None
) -> tuple[np.ndarray, torch.Tensor, MRFDictionary]:
    """What a perfect reconstruction of band-limited data could give at best: each voxel's mean fingerprint over its
    f x f fine pixels (partial volume included) as coefficient images [K, 1, y, x] on the default basis (rank 8 +
    2 fat directions), with that basis and the dictionary."""
    d = build_dictionary(seq, default_spec(seq, "single", 3.0, complex_data=True), cache_dir=cache)
    basis = with_fat_directions(d.complex.basis[:, :8], seq, 3.0, 2)
    fine = make_phantom("brain", matrix * oversample, seed=seed, randomize=random, lesions=lesions)
    fp = fingerprint_images(fine, seq)
    del fine
    v = basis.cpu().numpy()
    c = np.zeros((v.shape[1], matrix, matrix), np.complex64)
    for t0 in range(0, fp.shape[0], 100):  # the f x f means, 100 frames at a time (2 GB of fine frames at 256^2)
        block = voxel_means(fp[t0 : t0 + 100], oversample)
        c += np.einsum("tyx,tk->kyx", block, v[t0 : t0 + 100]).astype(np.complex64)
    return c[:, None], basis, d


def ideal_maps(
    seq: MRFSequence, matrix: int, oversample: int, seed: int, random: bool, lesions: list, cache: Path | None
) -> dict[str, np.ndarray]:
    """Maps of :func:`ideal_coefficients`, matched as the ``mrf`` pipeline matches. Their error against the point
    truth is the floor that partial volume and the single-compartment subspace model leave to every
    reconstruction."""
    c, basis, d = ideal_coefficients(seq, matrix, oversample, seed, random, lesions, cache)
    geometry = Geometry.centred((matrix, matrix), (240.0, 240.0))
    options = MappingOptions(rank=basis.shape[1])
    return {m.kind: m.data[0] for m in estimate_maps(c, seq, geometry, options, basis=basis, dictionary=d)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, nargs="+", default=[64])
    ap.add_argument("--coils", type=int, nargs="+", default=[8], help="one per matrix, or one for all")
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument(
        "--trajectory",
        default="spiral",
        choices=("spiral", "radial", "cartesian"),
        help="spiral, radial: one readout per frame; cartesian: --acceleration",
    )
    ap.add_argument(
        "--acceleration", type=float, default=8.0, help="cartesian: nominal R per frame (equidistant, rotating lines)"
    )
    ap.add_argument("--sim", nargs="+", default=["pixel", "bandlimited"], choices=("pixel", "bandlimited"))
    ap.add_argument("--oversample", type=int, default=2)
    ap.add_argument("--phantom", default="canonical", choices=("canonical", "random"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[9001, 9002, 9003], help="random phantoms (held out)")
    ap.add_argument("--lesions", type=float, nargs="*", default=[3, 6, 10, 30], help="extra lesions (voxels)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", type=int, nargs="*", default=None, help="indices into CASES (default: all)")
    ap.add_argument("--set", action="append", default=[], help="extra pipeline parameter NAME=VALUE for every case")
    ap.add_argument("--cache", default=None, help="dictionary cache (default: the user's cache)")
    ap.add_argument("--json", default=None, help="also write the pooled errors here")
    ap.add_argument(
        "--no-ideal", dest="ideal", action="store_false", help="band-limited: skip the ideal-voxel floor row"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else None
    seq = fisp_sequence()
    build_dictionary(seq, default_spec(seq, "single", 3.0, complex_data=True), cache_dir=cache)
    log = logging.getLogger("mrf_accuracy")
    log.setLevel(logging.INFO)
    log.propagate = False
    times = _SliceTimes()
    log.addHandler(times)
    cases = [CASES[i] for i in args.cases] if args.cases is not None else CASES
    extra = dict(kv.split("=", 1) for kv in args.set)
    coils = args.coils * len(args.matrix) if len(args.coils) == 1 else args.coils
    seeds = args.seeds if args.phantom == "random" else [0]
    record: dict = {}
    for matrix, n_coils in zip(args.matrix, coils, strict=True):
        for sim in args.sim:
            sim_cases: list[tuple[str, dict[str, object] | None]] = [
                *([(IDEAL, None)] if sim == "bandlimited" and args.ideal else []),
                *cases,
            ]
            pooled: dict[str, dict[str, dict[str, list]]] = {label: {} for label, _ in sim_cases}
            secs: dict[str, list[float]] = {label: [] for label, _ in sim_cases}
            wall: dict[str, list[float]] = {label: [] for label, _ in sim_cases}
            t_sim = 0.0
            acc = 0.0
            for seed in seeds:
                settings = AcquisitionSettings(
                    trajectory=args.trajectory,
                    coils=n_coils,
                    snr=args.snr,
                    seed=seed,
                    acceleration=args.acceleration if args.trajectory == "cartesian" else None,
                )
                t0 = time.perf_counter()
                random = args.phantom == "random"
                lesions = white_matter_lesions("brain", matrix, seed, args.lesions) if random else []
                if sim == "pixel":
                    ph = make_phantom("brain", matrix, seed=seed, randomize=random, lesions=lesions)
                    study = simulate_study(ph, seq, settings)
                else:
                    study = simulate_bandlimited(
                        "brain",
                        seq,
                        settings,
                        matrix=matrix,
                        oversample=args.oversample,
                        randomize=random,
                        lesions=lesions,
                    )
                t_sim += time.perf_counter() - t0
                acc = study.acceleration
                regions = rois(study.truth, study.label_names)
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "study.h5"
                    write_ismrmrd(study, path)
                    raw = raw_study_from_hdf5(path)
                    for label, params in sim_cases:
                        times.seconds.clear()
                        ctx = RunContext(cache_dir=cache, log=log)
                        t0 = time.perf_counter()
                        if params is None:
                            maps = ideal_maps(seq, matrix, args.oversample, seed, random, lesions, cache)
                        else:
                            maps = {m.kind: m.data[0] for m in get_pipeline("mrf")(raw, {**params, **extra}, ctx)}
                        wall[label].append(time.perf_counter() - t0)
                        secs[label] += times.seconds
                        for name, roi in regions.items():
                            key = lesion_class(int(roi.sum())) if name.startswith("lesion ") else name
                            err = relative_errors(maps, study.truth, roi)
                            slot = pooled[label].setdefault(
                                key, {"t1": [], "t2": [], "bias_t1": [], "bias_t2": [], "voxels": []}
                            )
                            for q in ("t1", "t2"):
                                slot[q].append(err[q])
                                slot[f"bias_{q}"].append(float(np.median(err[q])))
                            slot["voxels"].append(int(roi.sum()))
                        print(f"  seed {seed}: {label} done in {wall[label][-1]:.0f} s", flush=True)
                del study, raw
            readouts = f"{round(matrix / acc)} lines" if args.trajectory == "cartesian" else "one readout"
            what = "phantom on the recon matrix" if sim == "pixel" else f"phantom at {args.oversample}x, band-limited"
            which = (
                f"{len(seeds)} random held-out brains (seeds {', '.join(map(str, seeds))}; lesions "
                f"{', '.join(f'{a:g}' for a in args.lesions)} voxels added)"
                if args.phantom == "random"
                else "canonical brain"
            )
            print(
                f"\n### {matrix}x{matrix}, {n_coils} coils, {sim} simulation ({what})\n\n{which}, FISP 1000 frames, "
                f"{args.trajectory}, {readouts} per frame (R {acc:.1f}), SNR {args.snr:g}, {args.threads} "
                f"thread(s); simulated in {t_sim:.0f} s\n"
            )
            first = pooled[sim_cases[0][0]]
            main_keys = [
                k
                for k in (*TISSUES, "lesion >40", "lesion 13-40", "lesion 8-12", "lesion 5-7", "lesion 3")
                if k in first
            ]
            inner = [f"{t} interior" for t in TISSUES if f"{t} interior" in first]
            rec = record.setdefault(f"{matrix}/{n_coils}/{sim}/{args.phantom}", {})
            for keys in (main_keys, inner):
                if not keys:
                    continue
                if keys is inner:
                    counts = ", ".join(f"{SHORT[k.split()[0]]} {sum(first[k]['voxels'])}" for k in inner)
                    print(
                        "\nInterior voxels only (the voxel and its 8 neighbours wholly inside the tissue on the fine "
                        f"grid; voxels over all seeds: {counts}):\n"
                    )
                table(keys, sim_cases, pooled, secs, wall, rec)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


def table(
    keys: list[str],
    sim_cases: list[tuple[str, dict[str, object] | None]],
    pooled: dict[str, dict[str, dict[str, list]]],
    secs: dict[str, list[float]],
    wall: dict[str, list[float]],
    rec: dict,
) -> None:
    """One markdown table: per key the median |error| (worst ROI bias) of T1 and T2, per case; also into ``rec``."""
    name = {f"{t} interior": SHORT[t] for t in TISSUES}
    print(
        "| reconstruction | "
        + " | ".join(f"{name.get(k, SHORT.get(k, k))} T1 | {name.get(k, SHORT.get(k, k))} T2" for k in keys)
        + " | s recon / slice | s total / slice |"
    )
    print("|---|" + "---|" * (2 * len(keys)) + "---:|---:|")
    for label, _ in sim_cases:
        cells = []
        rec.setdefault(label, {}).update(
            {"s_recon": float(np.mean(secs[label])) if secs[label] else None, "s_total": float(np.mean(wall[label]))}
        )
        for k in keys:
            slot = pooled[label][k]
            for q in ("t1", "t2"):
                med = float(np.median(np.abs(np.concatenate(slot[q])))) * 100
                bias = max(slot[f"bias_{q}"], key=abs) * 100  # the worst ROI bias over the phantoms
                cells.append(f"{med:.1f} ({bias:+.1f})")
                rec[label][f"{k} {q}"] = {
                    "median_abs_pct": med,
                    "worst_roi_bias_pct": bias,
                    "voxels": slot["voxels"],
                }
        sr = np.mean(secs[label]) if secs[label] else float("nan")
        print(f"| {label} | {' | '.join(cells)} | {sr:.1f} | {np.mean(wall[label]):.1f} |", flush=True)


if __name__ == "__main__":
    main()
