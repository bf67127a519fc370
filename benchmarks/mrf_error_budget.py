"""Where the raw-path T2 error comes from: one error source added at a time, on the same phantom and scan.

    OMP_NUM_THREADS=1 python benchmarks/mrf_error_budget.py [--matrix 64 128] [--seed 9001] [--coils 8]

Randomised brain (held-out seed), FISP 1000 frames, one spiral interleaf per frame (24 arms, R 24), simulated
on the recon matrix (``simulate_study``) so every step can be compared with an exact truth. Each row matches
coefficient images with the default dictionary (coefficient domain, rank 8) and reports the median |relative
error| of T1 and T2 in white and grey matter:

1. the true fingerprints projected on the rank-8 dictionary basis (subspace truncation + dictionary grid);
2. the same, k-space cut to the spiral's disk (what no reconstruction can recover: Gibbs ringing), and with the
   Hann filter the pipeline applies instead;
3. low-rank CG-SENSE (true coil maps, no noise, Hann) of data synthesised *inside* the rank-8 model (A c_true);
4. the same on the simulated data, whose fingerprints lie partly outside the subspace (scalp fat, CSF, off-
   resonance): the "model error" the undersampling aliases into the small high-order coefficients;
5. as 4 with the coil maps estimated from the data (the pipeline's operator);
6. as 5 with an oracle basis (SVD of this phantom's true fingerprints) instead of the dictionary's;
7. that at SNR 30 (the default until issue 16);
8. the same with two fat directions added to the basis (pipelines/recon/fat_subspace.py; the default now).

Also prints the fingerprint residual outside the rank-8 basis per tissue (share of the total out-of-model energy).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipelines.io.mrd_reader import raw_study_from_hdf5
from pipelines.mapping.dictionary import MRFDictionary, build_dictionary
from pipelines.mapping.maps import MappingOptions, default_spec, estimate_maps
from pipelines.physics.sequences import MRFSequence, fisp_sequence
from pipelines.recon.fat_subspace import with_fat_directions
from pipelines.recon.subspace import NonCartesianSubspace, kspace_filter, reconstruct, slice_operator, union_dcf
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
from pipelines.sim.mrd_writer import write_ismrmrd
from pipelines.sim.phantoms import Phantom, make_phantom
from pipelines.types import Geometry

RANK = 8


def disk(c: np.ndarray) -> np.ndarray:
    """Coefficient images with k-space outside the inscribed disk (the spiral's extent) set to zero."""
    ny, nx = c.shape[-2:]
    ky, kx = np.meshgrid((np.arange(ny) - ny // 2) / (ny / 2), (np.arange(nx) - nx // 2) / (nx / 2), indexing="ij")
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(c, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k *= np.hypot(kx, ky) <= 1
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)).astype(
        c.dtype
    )


def score(c: np.ndarray, basis: torch.Tensor, ph: Phantom, d: MRFDictionary, seq: MRFSequence) -> str:
    """WM T1 | WM T2 | GM T1 | GM T2 median |relative error| (%) of the maps matched from coefficients ``c``."""
    m = ph.matrix[0]
    geometry = Geometry.centred((m, m), (240.0, 240.0))
    options = MappingOptions(rank=basis.shape[1])
    maps = {q.kind: q.data[0] for q in estimate_maps(c[:, None], seq, geometry, options, basis=basis, dictionary=d)}
    ids = {v: k for k, v in ph.label_names.items()}
    cells = []
    for tissue in ("white_matter", "grey_matter"):
        r = ph.labels == ids[tissue]
        cells += [
            100 * float(np.median(np.abs(maps[q][r] / getattr(ph, f"{q}_water_ms")[r] - 1))) for q in ("t1", "t2")
        ]
    return " | ".join(f"{v:.1f}" for v in cells)


def row(label: str, c: np.ndarray, basis: torch.Tensor, ph: Phantom, d: MRFDictionary, seq: MRFSequence) -> None:
    print(f"| {label} | {score(c, basis, ph, d, seq)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--matrix", type=int, nargs="+", default=[64])
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seq = fisp_sequence()
    d = build_dictionary(
        seq, default_spec(seq, "single", 3.0, complex_data=True), cache_dir=Path(args.cache) if args.cache else None
    )
    for m in args.matrix:
        ph = make_phantom("brain", m, seed=args.seed, randomize=True)

        print(f"\n### {m}x{m}, {args.coils} coils, brain seed {args.seed}\n")
        print("| step | WM T1 % | WM T2 % | GM T1 % | GM T2 % |\n|---|---:|---:|---:|---:|")
        basis = d.complex.basis[:, :RANK]
        studies = {}
        for snr in (float("inf"), 30.0):
            st = simulate_study(
                ph, seq, AcquisitionSettings(trajectory="spiral", coils=args.coils, snr=snr, seed=args.seed)
            )
            with tempfile.TemporaryDirectory() as tmp:
                write_ismrmrd(st, Path(tmp) / "s.h5")
                studies[snr] = (st, raw_study_from_hdf5(Path(tmp) / "s.h5"))
        st, raw = studies[float("inf")]
        x = torch.as_tensor(st.fingerprints.reshape(seq.n_frames, -1)).to(torch.complex64)
        c_true = (basis.T.to(torch.complex64) @ x).reshape(RANK, m, m).numpy()
        row("1. truth on the rank-8 basis", c_true, basis, ph, d, seq)
        row("2a. truth, k-space cut to the spiral's disk", disk(c_true), basis, ph, d, seq)
        row("2b. truth, Hann filter", kspace_filter(c_true), basis, ph, d, seq)
        rows = np.arange(raw.data.shape[0])
        k = raw.trajectory[rows][..., :2].reshape(-1, 2)
        frame = np.repeat(raw.frame[rows], raw.trajectory.shape[1])
        op = NonCartesianSubspace(st.coil_maps, k, frame, basis, dcf=union_dcf(k, (m, m)))
        inside = op.forward(torch.as_tensor(c_true)).numpy()
        measured = raw.data[rows].transpose(1, 0, 2).reshape(raw.data.shape[1], -1)
        c = reconstruct(op, inside, "cgsense", iterations=20).coefficients
        row("3. CG-SENSE of data inside the model (true maps, no noise) + Hann", kspace_filter(c), basis, ph, d, seq)
        c = reconstruct(op, measured, "cgsense", iterations=20).coefficients
        row("4. CG-SENSE of the simulated data (true maps, no noise) + Hann", kspace_filter(c), basis, ph, d, seq)
        op_est, data = slice_operator(raw, rows, basis, torch.device("cpu"), weighted=True, coil_energy=0.99)
        c = reconstruct(op_est, data, "cgsense", iterations=20).coefficients
        row("5. as 4, coil maps estimated (the pipeline)", kspace_filter(c), basis, ph, d, seq)
        mask = torch.as_tensor(ph.mask.ravel())
        u = torch.linalg.svd(x[:, mask], full_matrices=False)[0]
        oracle = u[:, :RANK].conj().contiguous()  # x_t = sum_k conj(V[t, k]) c_k
        op_o, data = slice_operator(raw, rows, oracle, torch.device("cpu"), weighted=True, coil_energy=0.99)
        c = reconstruct(op_o, data, "cgsense", iterations=20).coefficients
        row("6. as 5, oracle basis (SVD of this phantom's fingerprints)", kspace_filter(c), oracle, ph, d, seq)
        st30, raw30 = studies[30.0]
        op_est, data = slice_operator(raw30, rows, basis, torch.device("cpu"), weighted=True, coil_energy=0.99)
        c = reconstruct(op_est, data, "cgsense", iterations=20).coefficients
        row("7. as 5 at SNR 30 (the default before fat directions)", kspace_filter(c), basis, ph, d, seq)
        fat = with_fat_directions(basis, seq, 3.0, 2)
        op_f, data = slice_operator(raw30, rows, fat, torch.device("cpu"), weighted=True, coil_energy=0.99)
        c = reconstruct(op_f, data, "cgsense", iterations=20).coefficients
        row("8. as 7 with 2 fat directions (the default)", kspace_filter(c), fat, ph, d, seq)
        res = x - basis.conj().to(torch.complex64) @ (basis.T.to(torch.complex64) @ x)
        total = float(res.norm() ** 2)
        outside = float(res[:, mask].norm() / x[:, mask].norm())
        outside_oracle = float((x - oracle.conj() @ (oracle.T @ x))[:, mask].norm() / x[:, mask].norm())
        print(
            f"\nFingerprints outside the rank-{RANK} dictionary basis: {outside:.3f} of the object's norm "
            f"(oracle basis: {outside_oracle:.3f})\n"
        )
        print("| tissue | voxels | residual / norm | share of the out-of-model energy |\n|---|---:|---:|---:|")
        lab = torch.as_tensor(ph.labels.ravel())
        for k_, v in ph.label_names.items():
            sel = lab == k_
            if int(sel.sum()) and float(x[:, sel].norm()) > 0:
                print(
                    f"| {v} | {int(sel.sum())} | {float(res[:, sel].norm() / x[:, sel].norm()):.3f} | "
                    f"{float(res[:, sel].norm() ** 2) / total:.2f} |"
                )


if __name__ == "__main__":
    main()
