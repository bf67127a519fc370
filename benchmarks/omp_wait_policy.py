"""Torch's OpenMP wait policy alone and with a second process on the same cores (README, "Scaling out").

    python benchmarks/omp_wait_policy.py [--threads 2] [--matrix 48]

Times ``fingerprint_images`` (EPG, FISP, brain phantom) in a fresh process per run: alone, then two copies at
once, for the default policy, ``GOMP_SPINCOUNT=1000`` / ``10000`` and ``OMP_WAIT_POLICY=PASSIVE``. The policy is
read once when torch loads its OpenMP runtime, hence a process per run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = (
    "import time, torch; torch.set_num_threads({threads}); "
    "from pipelines.physics.sequences import fisp_sequence; from pipelines.sim.phantoms import make_phantom; "
    "from pipelines.sim.acquisition import fingerprint_images; "
    "ph = make_phantom('brain', {matrix}); seq = fisp_sequence(); fingerprint_images(ph, seq, chunk=256); "
    "t0 = time.perf_counter(); fingerprint_images(ph, seq); print(time.perf_counter() - t0)"
)
SETTINGS = {
    "default (spin)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def run(copies: int, extra: dict[str, str], threads: int, matrix: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra, OMP_NUM_THREADS=str(threads))
    code = CHILD.format(threads=threads, matrix=matrix)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        for _ in range(copies)
    ]
    return [float(p.communicate()[0].split()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--matrix", type=int, default=48)
    args = ap.parse_args()
    print(f"| setting | alone (s) | beside a second copy (s) |  ({os.cpu_count()} cores, {args.threads} threads each)")
    print("|---|---:|---:|")
    for name, extra in SETTINGS.items():
        alone = run(1, extra, args.threads, args.matrix)[0]
        shared = max(run(2, extra, args.threads, args.matrix))
        print(f"| {name} | {alone:.1f} | {shared:.1f} |", flush=True)


if __name__ == "__main__":
    main()
