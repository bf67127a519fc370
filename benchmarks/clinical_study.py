"""A clinical-size raw MRF study end to end: simulate once, then `recon-node process --pipeline mrf` to DICOM maps.

    OMP_NUM_THREADS=2 python benchmarks/clinical_study.py [--slices 10] [--matrix 256] [--coils 16]
        [--trajectory spiral|radial|cartesian] [--acceleration R] [--work /tmp/clinical] [--cache DIR]
        [--cold-dictionary] [--set KEY=VALUE ...]

Steps, each in its own subprocess (its wall time and peak RSS from getrusage of that child alone):
1. ``recon-node simulate --slices N --matrix M --coils C --trajectory T --snr 30`` (one interleaf or spoke per
   frame; Cartesian: ``--acceleration`` R, default 8) (skipped when the file exists; FISP, 1000 frames, brain phantom with distinct anatomy per slice);
2. with ``--cold-dictionary``: the default FISP dictionary built into an empty cache (a new schedule's cost);
3. ``recon-node process <file> --pipeline mrf`` with a warm dictionary cache: per-stage seconds read from the job
   log lines (per-slice reconstruction, mapping), total wall time and peak RSS.
Then voxel-wise median |relative error| of T1 and T2 per tissue over all slices, against the phantom's truth.
Prints one markdown report (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed; see {log}")
    return wall, usage.ru_maxrss / 1024**2


def dictionary_cmd(cache: Path) -> list[str]:
    code = ("import torch; torch.set_num_threads(int(__import__('os').environ.get('OMP_NUM_THREADS', '2')));"
            "from pipelines.physics.sequences import get_sequence;"
            "from pipelines.mapping.dictionary import build_dictionary, fisp_spec;"
            f"d = build_dictionary(get_sequence('fisp'), fisp_spec(), cache_dir={str(cache)!r}, report=print);"
            "print('atoms', d.n_atoms)")
    return [sys.executable, "-c", code]


def tissue_errors(truth: dict[str, np.ndarray], maps: dict[str, np.ndarray]) -> list[tuple[str, int, float, float]]:
    names = json.loads(str(truth["label_names"]))  # {"1": "scalp", ...}
    labels = truth["labels"].reshape(maps["t1"].shape)
    t1, t2 = truth["t1_ms"].reshape(labels.shape), truth["t2_ms"].reshape(labels.shape)
    rows = []
    for key, name in sorted(names.items(), key=lambda kv: int(kv[0])):
        sel = (labels == int(key)) & (maps["t1"] > 0) & (t1 > 0) & (t2 > 0)
        if sel.sum() < 3:
            continue
        rows.append((name, int(sel.sum()), 100 * float(np.median(np.abs(maps["t1"][sel] / t1[sel] - 1))),
                     100 * float(np.median(np.abs(maps["t2"][sel] / t2[sel] - 1)))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=10)
    ap.add_argument("--matrix", type=int, default=256)
    ap.add_argument("--coils", type=int, default=16)
    ap.add_argument("--trajectory", default="spiral", choices=("spiral", "radial", "cartesian"))
    ap.add_argument("--acceleration", type=float, default=8.0, help="cartesian: R per frame")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "recon-node-clinical")
    ap.add_argument("--cache", type=Path, default=None, help="dictionary cache (default: <work>/cache)")
    ap.add_argument("--cold-dictionary", action="store_true", help="also time a cold build of the dictionary")
    ap.add_argument("--set", action="append", default=[], help="pipeline parameter for the mrf run")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    cache = a.cache or a.work / "cache"
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    cartesian = a.trajectory == "cartesian"
    tag = f"{a.slices}x{a.matrix}_{a.coils}c" + ("" if a.trajectory == "spiral" else f"_{a.trajectory}")
    if cartesian:
        tag += f"_R{a.acceleration:g}"
    raw = a.work / f"study_{tag}.h5"
    print(f"## Clinical MRF study: {a.slices} slices, {a.matrix}^2, {a.coils} coils, {a.trajectory}"
          + (f" (R {a.acceleration:g})" if cartesian else "") + " FISP 1000 frames\n")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {threads} threads; python {platform.python_version()}\n")
    print("| step | wall s | peak RSS GB |\n|---|---|---|")
    if not raw.exists():
        wall, rss = run(["recon-node", "simulate", "--matrix", str(a.matrix), "--coils", str(a.coils),
                         "--trajectory", a.trajectory, "--snr", "30", "--slices", str(a.slices), "--out", str(raw),
                         "--threads", threads, "--quiet"]
                        + (["--acceleration", str(a.acceleration)] if cartesian else []), a.work / "simulate.log")
        print(f"| simulate (not part of the node) | {wall:.0f} | {rss:.2f} |")
    if a.cold_dictionary:
        cold = a.work / "cold-cache"
        for f in cold.glob("*.npz"):
            f.unlink()
        wall, rss = run(dictionary_cmd(cold), a.work / "dictionary.log")
        print(f"| FISP dictionary, cold build (477k atoms) | {wall:.0f} | {rss:.2f} |")
        cache = cold
    elif not any(cache.glob("*.npz")):
        run(dictionary_cmd(cache), a.work / "dictionary.log")  # warm the cache; not the measured run
    out = a.work / f"out_{tag}"
    cmd = ["recon-node", "process", str(raw), "--pipeline", "mrf", "--out", str(out), "--cache-dir", str(cache),
           "--threads", threads, "--quiet"] + [x for kv in a.set for x in ("--set", kv)]
    wall, rss = run(cmd, a.work / "process.log")
    log = (a.work / "process.log").read_text()
    recon = [float(x) for x in re.findall(r"coefficient images in ([0-9.]+) s", log)]
    mapping = [float(x) for x in re.findall(r"maps of \d+ slices in ([0-9.]+) s", log)]
    print(f"| reconstruction, {len(recon)} slices (sum; per slice {min(recon):.1f}-{max(recon):.1f}) | "
          f"{sum(recon):.0f} | |")
    print(f"| mapping (coefficient-domain matching, all slices) | {sum(mapping):.0f} | |")
    print(f"| **`recon-node process --pipeline mrf`, total (warm cache)** | **{wall:.0f}** | **{rss:.2f}** |")
    truth = dict(np.load(raw.with_name(raw.stem + "_truth.npz"), allow_pickle=False))
    maps = dict(np.load(out / "maps.npz", allow_pickle=False))
    print("\n| tissue | voxels | median abs T1 error % | median abs T2 error % |\n|---|---|---|---|")
    for name, n, e1, e2 in tissue_errors(truth, maps):
        print(f"| {name} | {n} | {e1:.1f} | {e2:.1f} |")
    print(f"\ncommand: OMP_NUM_THREADS={threads} python benchmarks/clinical_study.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
