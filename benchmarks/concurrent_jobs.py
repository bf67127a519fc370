"""Two raw MRF jobs at once in one process: each at the node's full thread count (before) or on its share
(node.cores.CoreShare, what the local executor does now).

    python benchmarks/concurrent_jobs.py [--matrix 64 128] [--threads 2] [--jobs 2]

The demo's scan (brain, FISP 1000 frames, one spiral interleaf per frame, 8 coils, SNR 40) through the ``mrf``
pipeline with its defaults, in ``--jobs`` Python threads started together, as the node's workers run them. Prints
the median wall time of the batch over ``--repeats`` (range in brackets) and each job's median time (fastest
first), and one job alone for reference.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from node.cores import CoreShare
from node.demo import DemoOptions, _simulate
from pipelines.definitions import get_pipeline
from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.registry import RunContext
from pipelines.sim.mrd_writer import write_ismrmrd


def batch(raw, jobs: int, cores: CoreShare | None, threads: int) -> tuple[float, list[float]]:
    times: list[float] = []

    def one() -> None:
        torch.set_num_threads(threads)  # what every worker thread had before: the process's count
        t0 = time.perf_counter()
        if cores is None:
            get_pipeline("mrf")(raw, {}, RunContext(log=logging.getLogger("bench")))
        else:
            with cores.job():
                ctx = RunContext(log=logging.getLogger("bench"), phase=lambda _p: cores.apply())
                get_pipeline("mrf")(raw, {}, ctx)
        times.append(time.perf_counter() - t0)

    ts = [threading.Thread(target=one) for _ in range(jobs)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, sorted(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--matrix", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="batches per setting, interleaved; medians printed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| matrix | setting | wall (s) | per job (s) |  ({args.jobs} jobs, {args.threads} threads in all)")
    print("|---|---|---|---|")
    for matrix in args.matrix:
        study = _simulate(DemoOptions(matrix=matrix), "spiral")
        with tempfile.TemporaryDirectory() as tmp:
            write_ismrmrd(study, Path(tmp) / "s.h5")
            raw = raw_study_from_hdf5(Path(tmp) / "s.h5")
            batch(raw, 1, None, args.threads)  # dictionary load, NUFFT plans, first-touch
            rows = [
                ("one job alone", 1, None),
                ("each job at the full count (before)", args.jobs, None),
                ("each job on its share (CoreShare)", args.jobs, CoreShare(args.threads)),
            ]
            runs: dict[str, list[tuple[float, list[float]]]] = {label: [] for label, _, _ in rows}
            for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every setting
                for label, jobs, cores in rows:
                    runs[label].append(batch(raw, jobs, cores, args.threads))
            for label, _, _ in rows:
                walls = [w for w, _ in runs[label]]
                per = [float(np.median([p[i] for _, p in runs[label]])) for i in range(len(runs[label][0][1]))]
                print(
                    f"| {matrix}² | {label} | {np.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) | "
                    f"{', '.join(f'{t:.1f}' for t in per)} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
