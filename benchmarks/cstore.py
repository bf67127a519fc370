"""DICOM C-STORE into the node: a scanner's 1000-frame MRF series, with and without TCP_NODELAY.

    OMP_NUM_THREADS=2 python benchmarks/cstore.py [--frames 1000] [--matrix 64]

A node (NodeService, folder destination, no route for the series) runs in this process; pynetdicom sends the
series in one association, as the demo's scanner does. Each instance is fsynced (file and folder) before the
node answers, as always. "off" replaces :func:`node.tcp.no_delay` by a no-op on both ends (what the node did before),
"on" is the node as shipped. Prints instances/s and ms per instance for each.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def _series(frames: int, matrix: int, out: Path) -> list[Path]:
    import numpy as np

    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.dicom_frames import write_dicom_frames

    s = fisp_sequence()
    seq = MRFSequence(f"fisp{frames}", s.flip_angles_deg[:frames], s.tr_ms[:frames], s.te_ms[:frames], ti_ms=s.ti_ms)
    study = simulate_study(
        "brain", seq, AcquisitionSettings(trajectory="cartesian", coils=1, snr=np.inf), matrix=matrix
    )
    return write_dicom_frames(study, out)


def _run(files: list[Path], root: Path, nodelay: bool) -> float:
    import node.tcp
    from node.config import parse_config
    from node.demo import NODE_AE, SCANNER_AE, store_files
    from node.service import NodeService

    real = node.tcp.no_delay
    if not nodelay:
        node.tcp.no_delay = lambda assoc: None  # type: ignore[assignment]
    try:
        cfg = parse_config(
            {
                "node": {
                    "ae_title": NODE_AE,
                    "spool_dir": str(root / "spool"),
                    "dicom_port": 0,
                    "mrd_port": 0,
                    "bind": "127.0.0.1",
                },
                "sources": [{"name": "scanner", "ae_title": SCANNER_AE, "hosts": ["127.0.0.1"]}],
                "destinations": [{"name": "pacs", "kind": "folder", "path": str(root / "pacs")}],
                "grouping": {"default": {"by": "study", "quiet_seconds": 60}},
                "routes": [],
            },
            where="<benchmark>",
        )
        svc = NodeService(cfg)
        svc.start()
        assert svc.dicom_scp is not None
        try:
            t0 = time.perf_counter()
            n = store_files(files, svc.dicom_scp.port)
            seconds = time.perf_counter() - t0
        finally:
            svc.stop()
        assert n == len(files)
        return seconds
    finally:
        node.tcp.no_delay = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--matrix", type=int, default=64)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.frames} frames of {args.matrix}x{args.matrix} uint16")
    with tempfile.TemporaryDirectory() as d:
        files = _series(args.frames, args.matrix, Path(d) / "frames")
        rows = []
        for nodelay in (False, True):
            seconds = _run(files, Path(d) / f"node-{nodelay}", nodelay)
            rows.append((nodelay, seconds))
    print("| TCP_NODELAY | seconds | instances/s | ms/instance |")
    print("|---|---:|---:|---:|")
    for nodelay, s in rows:
        print(f"| {'on' if nodelay else 'off'} | {s:.1f} | {args.frames / s:.0f} | {1000 * s / args.frames:.1f} |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
