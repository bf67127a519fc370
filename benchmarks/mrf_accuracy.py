"""Raw MRF accuracy per tissue: back-projection, CG-SENSE (+/- Hann) and locally low-rank ADMM (+/- Hann).

    OMP_NUM_THREADS=1 python benchmarks/mrf_accuracy.py [--matrix 64 [128]] [--coils 8] [--sim pixel bandlimited]

Brain phantom, FISP 1000 frames, one spiral interleaf per frame, SNR 30, through the ``mrf`` pipeline (ISMRMRD
file -> reconstruction -> dictionary matching, defaults except the listed parameters). Two simulations:
``pixel`` is :func:`pipelines.sim.acquisition.simulate_study` (k-space of the phantom drawn on the recon matrix),
``bandlimited`` is :func:`pipelines.sim.bandlimited.simulate_bandlimited` (the phantom drawn ``--oversample``
times finer, sampled at the same k-space positions: what a scanner sees of a continuous object).

Prints one markdown table per simulation: per tissue (WM, GM, CSF, lesion) the median |relative error| of T1 and
T2 over the tissue's voxels and, in brackets, the median signed error (the ROI bias), and the reconstruction's
seconds per slice (from the pipeline's log; the dictionary is built / cached first).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.definitions import get_pipeline
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.mapping.dictionary import build_dictionary
from pipelines.mapping.maps import default_spec
from pipelines.physics.sequences import fisp_sequence
from pipelines.registry import RunContext
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.bandlimited import simulate_bandlimited
from pipelines.sim.mrd_writer import write_ismrmrd

CASES: list[tuple[str, dict[str, object]]] = [
    ("back-projection (adjoint) + Hann", {"recon": "adjoint", "filter": "hann"}),
    ("CG-SENSE + Hann (default)", {"recon": "cgsense", "filter": "hann"}),
    ("CG-SENSE, no filter", {"recon": "cgsense", "filter": "none"}),
    ("LLR (ADMM), no filter", {"recon": "llr", "filter": "none"}),
    ("LLR (ADMM) + Hann", {"recon": "llr", "filter": "hann"}),
]
TISSUES = ("white_matter", "grey_matter", "csf", "lesion")
SHORT = {"white_matter": "WM", "grey_matter": "GM", "csf": "CSF", "lesion": "lesion"}


class _SliceTimes(logging.Handler):
    """Collects the seconds of each slice's reconstruction from the pipeline's log record."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("slice %d/%d") and isinstance(record.args, tuple):
            self.seconds.append(float(record.args[5]))


def errors(maps: dict[str, np.ndarray], truth: dict[str, np.ndarray], names: dict[int, str]) -> dict[str, tuple]:
    """Per tissue: (median |T1 err|, median T1 err, median |T2 err|, median T2 err), relative."""
    out = {}
    for tissue in TISSUES:
        label = next((k for k, v in names.items() if v == tissue), None)
        if label is None or not (truth["labels"] == label).any():
            continue
        roi = truth["labels"] == label
        cells = []
        for q in ("t1", "t2"):
            r = maps[q][roi] / truth[f"{q}_water_ms"][roi] - 1
            cells += [float(np.median(np.abs(r))), float(np.median(r))]
        out[tissue] = tuple(cells)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, nargs="+", default=[64])
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument("--sim", nargs="+", default=["pixel", "bandlimited"], choices=("pixel", "bandlimited"))
    ap.add_argument("--oversample", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", type=int, nargs="*", default=None, help="indices into CASES (default: all)")
    ap.add_argument("--cache", default=None, help="dictionary cache (default: the user's cache)")
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
    for matrix in args.matrix:
        for sim in args.sim:
            settings = AcquisitionSettings(trajectory="spiral", coils=args.coils, snr=args.snr)
            t0 = time.perf_counter()
            if sim == "pixel":
                study = simulate_study("brain", seq, settings, matrix=matrix)
            else:
                study = simulate_bandlimited("brain", seq, settings, matrix=matrix, oversample=args.oversample)
            what = "phantom on the recon matrix" if sim == "pixel" else f"phantom at {args.oversample}x, band-limited"
            print(
                f"\n### {matrix}x{matrix}, {sim} simulation ({what}): brain, FISP 1000 frames, spiral 1 interleaf "
                f"per frame (R {study.acceleration:.0f}), {args.coils} coils, SNR {args.snr:g}, {args.threads} "
                f"thread(s); simulated in {time.perf_counter() - t0:.0f} s\n"
            )
            present = [t for t in TISSUES if any(v == t for v in study.label_names.values())]
            head = " | ".join(f"{SHORT[t]} T1 | {SHORT[t]} T2" for t in present)
            print(f"| reconstruction | {head} | s recon / slice |")
            print("|---|" + "---|" * (2 * len(present)) + "---:|")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "study.h5"
                write_ismrmrd(study, path)
                raw = raw_study_from_hdf5(path)
                for label, params in cases:
                    times.seconds.clear()
                    ctx = RunContext(cache_dir=cache, log=log)
                    maps = {m.kind: m.data[0] for m in get_pipeline("mrf")(raw, dict(params), ctx)}
                    err = errors(maps, study.truth, study.label_names)
                    cells = []
                    for t in present:
                        a1, b1, a2, b2 = err[t]
                        cells += [f"{100 * a1:.1f} ({100 * b1:+.1f})", f"{100 * a2:.1f} ({100 * b2:+.1f})"]
                    secs = np.mean(times.seconds) if times.seconds else float("nan")
                    print(f"| {label} | {' | '.join(cells)} | {secs:.1f} |", flush=True)
            del study, raw


if __name__ == "__main__":
    main()
