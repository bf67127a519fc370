"""NC-PDNet vs classical non-Cartesian reconstructions and BART, and vs low-rank CG-SENSE for MRF: one table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ncpdnet_eval.py [--matrix 128] [--n 8] [--device auto]

Anatomical part: held-out random brain / thigh images (:func:`pipelines.sim.anatomy.heldout_image`, phantom seeds
training never draws; indices from ``--first``, away from the training run's validation images), 8 random
birdcage coils, SNR 30, on the fixed trajectories NC-PDNet was trained on
(:func:`pipelines.recon.train_ncpdnet.anatomical_trajectory`): radial N/4 golden-angle spokes of 2N samples
(32 spokes at 128^2: the CPU-sized equivalent of 64 spokes at 256^2, R ~ 6.3) and 8 of the 24 arms of the
variable-density spiral. Every method uses the same low-resolution coil maps estimated from the data (as the
``noncartesian_recon`` pipeline does). PSNR / SSIM on magnitudes after a least-squares scale against the truth
(as ``benchmarks/recon_vs_bart.py``); seconds per slice exclude the coil maps and DCF (shared by all). BART runs
``pics -t traj`` through .cfl files with the same maps: ``-l2 -r 0.01`` (CG on Tikhonov) and ``-m -l1 -r 0.01``
(ADMM, L1-wavelet), OMP_NUM_THREADS=1; its seconds include process start-up and file I/O.

MRF part: the ``mrf`` pipeline end to end (ISMRMRD file -> subspace reconstruction -> dictionary matching) on
FISP spiral data, one interleaf per frame, 8 coils, SNR 30, 64x64: the canonical brain phantom and a randomised
held-out brain (a phantom seed training never draws). Median |relative error| of T1 and T2 in white matter, grey
matter and CSF; seconds per slice of the reconstruction alone and of reconstruction + matching.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.recon_vs_bart import psnr_ssim, read_cfl, write_cfl  # noqa: E402
from pipelines.recon.classical import adjoint_recon, cg_sense, l1_wavelet  # noqa: E402
from pipelines.recon.ncpdnet import load_ncpdnet  # noqa: E402
from pipelines.recon.train_ncpdnet import AnatomySampler, anatomical_trajectory  # noqa: E402
from pipelines.compute import select_device  # noqa: E402
from pipelines.weights_io import WEIGHTS_DIR  # noqa: E402

TISSUES = ("white_matter", "grey_matter", "csf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bart_pics(y: np.ndarray, k: np.ndarray, maps: np.ndarray, args: list[str]) -> tuple[np.ndarray, float]:
    """``bart pics -t`` on data y [C, M] at k [M, 2] (cycles/FOV = BART's units) with maps [C, ny, nx]."""
    c, ny, nx = maps.shape
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        traj = np.zeros((3, k.shape[0], 1), np.complex64)
        traj[0, :, 0], traj[1, :, 0] = k[:, 0], k[:, 1]  # BART dim 0 = our x, dim 1 = our y
        write_cfl(d / "t", traj)
        write_cfl(d / "k", y.T[None, :, None, :])  # [1, M, 1, C]
        write_cfl(d / "s", maps.transpose(2, 1, 0)[:, :, None, :])  # [x, y, 1, C]
        t0 = time.perf_counter()
        subprocess.run(["bart", "pics", "-S", *args, "-t", str(d / "t"), str(d / "k"), str(d / "s"), str(d / "x")],
                       check=True, env=env, capture_output=True)
        dt = time.perf_counter() - t0
        x = read_cfl(d / "x").reshape(nx, ny).T
    return x, dt


def anatomical(args: argparse.Namespace, device: torch.device, rows: list[str]) -> None:
    model, meta = load_ncpdnet(args.anatomy_weights, device=device)
    n = args.matrix
    for kind in ("radial", "spiral"):
        sampler = AnatomySampler((kind,), n, 8, (30.0, 30.0), device)
        k = anatomical_trajectory(kind, n)
        batches = sampler.heldout(kind, args.n, snr=30.0, first=args.first)
        results: dict[str, list[tuple[float, float, float]]] = {}

        def record(name: str, x: np.ndarray, truth: np.ndarray, dt: float) -> None:
            results.setdefault(name, []).append((*psnr_ssim(x, truth), dt))

        model(batches[0].op, batches[0].y.to(device))  # warm-up: plans, kernels, allocator
        for b in batches:
            truth = b.target[0].cpu().numpy()
            op, y = b.op.op, b.y.to(device)
            for name, fn in (("adjoint + DCF", lambda: adjoint_recon(op, y)),
                             ("CG-SENSE (DCF-weighted, 15 it.)", lambda: cg_sense(op, y)),
                             ("L1-wavelet FISTA (ours, 40 it.)", lambda: l1_wavelet(op, y)),
                             ("NC-PDNet", lambda: model(b.op, y)[:, 0])):
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    x = fn()
                _sync(device)
                record(name, x[0].cpu().numpy(), truth, time.perf_counter() - t0)
            if args.bart:
                maps = op.maps[0].cpu().numpy()
                yc = b.y[0].cpu().numpy()
                for name, opts in (("BART pics -l2 -r 0.01", ["-l2", "-r", "0.01"]),
                                   ("BART pics -m -l1 -r 0.01 (ADMM)", ["-m", "-l1", "-r", "0.01"])):
                    x, dt = bart_pics(yc, k, maps, opts)
                    record(name, x, truth, dt)
        for name, vals in results.items():
            a = np.asarray(vals)
            rows.append(f"| {kind} {n}x{n}, {k.shape[0]} samples | {name} | {a[:, 0].mean():.2f} | "
                        f"{a[:, 1].mean():.3f} | {np.median(a[:, 2]):.3f} |")
            print(rows[-1], flush=True)


def mrf(args: argparse.Namespace, device: torch.device, rows: list[str]) -> None:
    from pipelines.definitions import get_pipeline
    from pipelines.io.mrd_reader import raw_study_from_hdf5
    from pipelines.mapping.dictionary import build_dictionary
    from pipelines.mapping.maps import default_spec
    from pipelines.physics.sequences import fisp_sequence
    from pipelines.recon.ncpdnet import cached_ncpdnet, ncpdnet_subspace
    from pipelines.recon.subspace import reconstruct, slice_operator
    from pipelines.registry import RunContext
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.anatomy import heldout_seeds
    from pipelines.sim.mrd_writer import write_ismrmrd
    from pipelines.sim.phantoms import make_phantom

    seq = fisp_sequence()
    cache = Path(args.cache or tempfile.mkdtemp())
    dictionary = build_dictionary(seq, default_spec(seq, "single", 3.0, complex_data=True), cache_dir=cache)
    net, meta = cached_ncpdnet(str(args.mrf_weights), "", device)
    m = args.mrf_matrix
    phantoms = {"brain (canonical)": "brain",
                "brain (held-out random)": make_phantom("brain", m, seed=heldout_seeds(1)[0], randomize=True)}
    cases = [("adjoint", {"recon": "adjoint"}), ("low-rank CG-SENSE (Hann)", {"recon": "cgsense"}),
             ("low-rank CG-SENSE (no filter)", {"recon": "cgsense", "filter": "none"}),
             ("NC-PDNet", {"recon": "ncpdnet", "weights": str(args.mrf_weights)})]
    ctx = RunContext(cache_dir=cache, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        for label, ph in phantoms.items():
            st = simulate_study(ph, seq, AcquisitionSettings(trajectory="spiral", coils=8, snr=30.0), matrix=m)
            path = Path(tmp) / "mrf.h5"
            write_ismrmrd(st, path)
            raw = raw_study_from_hdf5(path)
            rows_idx = np.flatnonzero(raw.slice == raw.slice[0])
            for name, params in cases:
                # The reconstruction alone (same operator construction as the pipeline, not timed) ...
                if params["recon"] == "ncpdnet":
                    basis = meta["basis"].to(device)
                else:
                    basis = dictionary.complex.basis[:, :8].to(device)
                op, data = slice_operator(raw, rows_idx, basis, device, weighted=True)
                with torch.no_grad():
                    if params["recon"] == "ncpdnet":
                        ncpdnet_subspace(op, torch.as_tensor(data), net)  # warm-up
                        _sync(device)
                        t0 = time.perf_counter()
                        ncpdnet_subspace(op, torch.as_tensor(data), net)
                    else:
                        t0 = time.perf_counter()
                        reconstruct(op, data, params["recon"])
                    _sync(device)
                t_rec = time.perf_counter() - t0
                # ... and the whole pipeline (reconstruction + expansion + matching).
                t0 = time.perf_counter()
                out = {o.kind: o.data[0] for o in get_pipeline("mrf")(raw, params, ctx)}
                t_all = time.perf_counter() - t0
                cells = []
                for tissue in TISSUES:
                    lab = next(k for k, v in st.label_names.items() if v == tissue)
                    roi = st.truth["labels"] == lab
                    for q in ("t1", "t2"):
                        err = np.median(np.abs(out[q][roi] / st.truth[f"{q}_water_ms"][roi] - 1))
                        cells.append(f"{100 * err:.1f} %")
                rows.append(f"| {label} | {name} | {' | '.join(cells)} | {t_rec:.2f} | {t_all:.1f} |")
                print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, default=128, help="anatomical image size")
    ap.add_argument("--mrf-matrix", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="held-out images per trajectory")
    ap.add_argument("--first", type=int, default=100, help="first held-out image index")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="dictionary cache")
    ap.add_argument("--anatomy-weights", type=Path, default=WEIGHTS_DIR / "ncpdnet_anatomy.safetensors")
    ap.add_argument("--mrf-weights", type=Path, default=WEIGHTS_DIR / "ncpdnet_mrf.safetensors")
    ap.add_argument("--no-bart", dest="bart", action="store_false")
    ap.add_argument("--skip", choices=("anatomy", "mrf"), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = select_device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else platform.processor()}), "
          f"{args.threads} thread(s); held-out anatomical images {args.first}..{args.first + args.n - 1}\n")
    rows: list[str] = []
    if args.skip != "anatomy":
        print("| data | method | PSNR (dB) | SSIM | s / slice |\n|---|---|---:|---:|---:|")
        anatomical(args, device, rows)
    if args.skip != "mrf":
        print("\n| MRF phantom | reconstruction | WM T1 | WM T2 | GM T1 | GM T2 | CSF T1 | CSF T2 | s recon | "
              "s recon + matching |\n|---|---|---|---|---|---|---|---|---:|---:|")
        mrf(args, device, rows)


if __name__ == "__main__":
    main()
