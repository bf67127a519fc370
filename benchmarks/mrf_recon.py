"""Raw MRF -> maps: accuracy and time of the subspace reconstructions on the simulated brain.

    OMP_NUM_THREADS=2 python benchmarks/mrf_recon.py [--matrix 64] [--threads 2]

Prints one markdown table: trajectory, reconstruction, median |T1| and |T2| relative errors in white and grey
matter against the phantom's truth, and seconds for reconstruction + matching (the dictionary is cached first).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.definitions import get_pipeline
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.mapping.dictionary import build_dictionary, fisp_spec
from pipelines.physics.sequences import fisp_sequence
from pipelines.registry import RunContext
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.mrd_writer import write_ismrmrd

CASES = [
    ("spiral", None, {"recon": "adjoint"}),
    ("spiral", None, {"recon": "cgsense", "filter": "none"}),
    ("spiral", None, {"recon": "cgsense"}),
    ("spiral", None, {"recon": "cgsense", "rank": 6}),
    ("radial", None, {"recon": "cgsense"}),
    ("cartesian", 8.0, {"recon": "adjoint"}),
    ("cartesian", 8.0, {"recon": "cgsense"}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=64)
    ap.add_argument("--snr", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=None, help="dictionary cache (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache or tempfile.mkdtemp())
    seq = fisp_sequence()
    build_dictionary(seq, fisp_spec(3.0), cache_dir=cache)
    print(f"brain phantom {args.matrix}x{args.matrix}, FISP 1000 frames, 8 coils, SNR {args.snr:g}, "
          f"{args.threads} threads\n")
    print("| trajectory | R per frame | params | WM T1 | WM T2 | GM T1 | GM T2 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    studies: dict[tuple[str, float | None], tuple] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for traj, acc, params in CASES:
            if (traj, acc) not in studies:
                st = simulate_study("brain", seq, AcquisitionSettings(trajectory=traj, coils=8, snr=args.snr,
                                                                      acceleration=acc), matrix=args.matrix)
                path = Path(tmp) / f"{traj}{acc}.h5"
                write_ismrmrd(st, path)
                studies[(traj, acc)] = (st, raw_study_from_hdf5(path))
            st, raw = studies[(traj, acc)]
            t0 = time.perf_counter()
            maps = {m.kind: m.data[0] for m in get_pipeline("mrf")(raw, params, RunContext(cache_dir=cache))}
            seconds = time.perf_counter() - t0
            cells = []
            for tissue in ("white_matter", "grey_matter"):
                label = next(k for k, v in st.label_names.items() if v == tissue)
                roi = st.truth["labels"] == label
                for q in ("t1", "t2"):
                    err = np.median(np.abs(maps[q][roi] / st.truth[f"{q}_water_ms"][roi] - 1))
                    cells.append(f"{100 * err:.1f} %")
            p = ", ".join(f"{k}={v}" for k, v in params.items())
            print(f"| {traj} | {st.acceleration:.1f} | {p} | {' | '.join(cells)} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
