"""Dictionary-matching throughput: recon-node's match() (SVD subspace) against full-length brute force and mrpro.

Usage::

    python benchmarks/matching.py [--threads 1 2] [--atoms-step 5] [--voxels 16384] [--full-voxels 4096]
                                  [--skip-mrpro] [--out results.md]

Set-up (not timed; its duration is printed): a FISP dictionary on ``fisp_sequence()`` (1000 TRs) over
T1 = geometric_grid(100, 5000, step), T2 = geometric_grid(10, 2000, step) (T2 <= T1), B1 in ``--b1``; with the
default step 5 % and B1 (0.9, 1.0, 1.1) that is 21,186 atoms (if a grid has fewer than ``--min-atoms`` atoms the
step is refined until it has enough, and the table says so). It is built twice: once by the project's
``build_dictionary`` (compressed atoms, what ``match()`` uses) and once as the full normalised atom matrix
(``simulate_atoms`` then L2 normalisation) for the uncompressed matchers. The fingerprints of a 128 x 128 slice
(``--voxels``) are ``epg_fisp`` signals of random tissues inside the grid (T1 log-uniform 100-5000 ms, T2
log-uniform 10-min(T1, 2000) ms, B1 uniform over the B1 range), times a random complex M0 (|M0| in 0.5-1.5, random
phase), plus complex Gaussian noise at SNR ``--snr`` (RMS signal over RMS noise, per complex sample, over the slice).

Matchers, each timed in a fresh subprocess per (matcher, device, thread count) with OMP/MKL/OpenBLAS pools bounded
by environment variables *and* ``torch.set_num_threads``:

* ``full (no SVD)``: brute force over the full-length atoms: chunked complex inner products ``x @ D^H``, ``|.|``,
  argmax; the same voxel x atom chunking rule as ``match()`` (4096 voxels per chunk, atom chunks under
  ``--memory-bytes``);
* ``match() rank 5 / rank 10 / rank auto``: ``pipelines.mapping.matching.match`` on the compressed dictionary, rank
  passed explicitly, or ``rank=None`` (chosen by retained energy ``DEFAULT_ENERGY``; the table gives the rank);
* ``mrpro DictionaryMatchOp``: in the peer venv (``--mrpro-python``, default /work/bench-venv/bin/python) on the same
  full-length atoms and the same fingerprints (passed as .npy files); the op's generating function looks atoms up by
  index, so the op returns atom indices. ``batch_size`` (voxels per chunk) is ``--mrpro-batch`` (default 4096, like
  ours; mrpro's default, 1M voxels, takes the whole slice at once: ~7 GB of temporaries at 21k atoms).

The two uncompressed matchers cost ~V x A x N complex multiply-adds; they are timed on the first ``--full-voxels``
voxels (default 4096) to keep the run short, and their fingerprints/s are for that subset (the table says so).
The SVD matchers run on all ``--voxels``. Agreement (fraction of voxels where the matcher picks the same atom as the
full brute force / as mrpro) is computed on the voxels both have matched, i.e. the first ``--full-voxels``.

Timing: a warm-up on 512 voxels, then the best of ``--repeats`` runs over the voxels, under ``torch.no_grad()``;
data and dictionary are already in memory (and on the device for CUDA). Memory: ``tracemalloc`` does not see
torch's allocations, so each worker reports its peak RSS at the end minus its RSS after loading its inputs (for
mrpro: after ``append``, i.e. after the op has built its normalised copy of the atoms). The peak is VmHWM from
/proc/self/status, reset to the current RSS after loading (``echo 5 > /proc/self/clear_refs``), not ``ru_maxrss``:
Linux carries ru_maxrss across execve, so a worker's ru_maxrss starts at its parent's RSS (~400 MB here) and hides
any smaller peak; ru_maxrss deltas are still returned in the worker's JSON. On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation after loading.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402

REPO = _peer.REPO
FIELD_T = 3.0
WARM_VOXELS = 512
KINDS = ("full", "rank5", "rank10", "auto")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--atoms-step", type=float, default=5.0, help="relative T1/T2 grid step in percent")
    p.add_argument("--b1", type=float, nargs="+", default=[0.9, 1.0, 1.1], help="B1 grid values")
    p.add_argument("--min-atoms", type=int, default=20000, help="refine the step until the grid has this many atoms")
    p.add_argument("--voxels", type=int, default=16384, help="fingerprints (128 x 128 slice)")
    p.add_argument("--full-voxels", type=int, default=4096,
                   help="voxels the uncompressed matchers (ours full, mrpro) are timed on")
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-bytes", type=int, default=None, help="match()'s memory_bytes (default: its default)")
    p.add_argument("--mrpro-batch", type=int, default=4096, help="DictionaryMatchOp batch_size (voxels per chunk)")
    p.add_argument("--mrpro-python", default=_peer.DEFAULT_PEER_PYTHON, help="python of the peer venv with mrpro")
    p.add_argument("--skip-mrpro", action="store_true")
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    p.add_argument("--workdir", default=None, help="keep the dictionary / data / index files here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prep-threads", type=int, default=1,
                   help="threads for the (untimed) EPG set-up; >1 can be very slow on a loaded machine")
    # worker mode (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mrpro-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-vox", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- helpers usable in both venvs (numpy / torch only) ---------------------------------------------------------
def best_time(fn, warm, device: str, repeats: int) -> tuple[float, list[float], object]:
    import torch

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        warm()
        sync()
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
    return min(times), times, out


def load_voxels(workdir: Path, n: int):
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.load(workdir / "data.npy", mmap_mode="r")[:n]))


def memory_baseline() -> dict:
    """Call once the inputs are loaded: resets the peak-RSS mark (VmHWM) to the current RSS where possible."""
    import gc

    gc.collect()
    reset = _peer.reset_peak_rss()
    return {"rss_base_mib": _peer.rss_mib() if reset else _peer.peak_rss_mib(), "hwm_reset": reset,
            "ru_maxrss_base_mib": _peer.maxrss_mib()}


def memory_report(device: str, base: dict, base_cuda: int) -> dict:
    import torch

    out = dict(base, rss_peak_mib=_peer.peak_rss_mib(), ru_maxrss_peak_mib=_peer.maxrss_mib())
    out["rss_delta_mib"] = out["rss_peak_mib"] - base["rss_base_mib"]
    out["ru_maxrss_delta_mib"] = out["ru_maxrss_peak_mib"] - base["ru_maxrss_base_mib"]
    if device == "cuda":
        out["cuda_delta_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def setup_worker(threads: int, device: str) -> int:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


# ---- our matchers (project venv) --------------------------------------------------------------------------------
def brute_force(x, atoms, memory_bytes: int):
    """Index of the atom with the largest |<d, x>| per voxel; x [V, N], atoms [A, N] normalised, chunked."""
    import torch

    n_vox, n_atoms = x.shape[0], atoms.shape[0]
    v_chunk = max(1, min(n_vox, 4096))  # as match()
    a_chunk = max(1, min(n_atoms, int(memory_bytes // (3 * 8 * v_chunk))))
    best_idx = torch.empty(n_vox, dtype=torch.long, device=x.device)
    for v0 in range(0, n_vox, v_chunk):
        xc = x[v0:v0 + v_chunk]
        bv = torch.full((xc.shape[0],), -1.0, device=x.device)
        bi = torch.zeros(xc.shape[0], dtype=torch.long, device=x.device)
        for a0 in range(0, n_atoms, a_chunk):
            ip = xc @ atoms[a0:a0 + a_chunk].conj().T
            val, idx = ip.abs().max(dim=1)
            better = val > bv
            bv = torch.where(better, val, bv)
            bi = torch.where(better, idx + a0, bi)
        best_idx[v0:v0 + v_chunk] = bi
    return best_idx


def ours_worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from pipelines.mapping.dictionary import MRFDictionary
    from pipelines.mapping.matching import DEFAULT_ENERGY, DEFAULT_MEMORY_BYTES, match

    kind, device, threads = args.worker, args.device[0], args.threads[0]
    base_cuda = setup_worker(threads, device)
    workdir = Path(args.workdir)
    mem = args.memory_bytes or DEFAULT_MEMORY_BYTES
    x = load_voxels(workdir, args.n_vox).to(device)
    res: dict = {"kind": kind, "device": device, "threads": threads, "n_vox": int(x.shape[0])}
    if kind == "full":
        atoms = torch.from_numpy(np.load(workdir / "atoms.npy")).to(device)

        def fn(xx):
            return brute_force(xx, atoms, mem)

        res["rank"] = "-"
        to_idx = None
    else:
        d = MRFDictionary.load(workdir / "dict.npz").to(device)
        rank = {"rank5": 5, "rank10": 10, "auto": None}[kind]
        res["rank_auto"] = d.complex.rank_for_energy(DEFAULT_ENERGY)
        res["rank_stored"] = int(d.complex.basis.shape[1])

        def fn(xx):
            return match(xx, d, rank=rank, memory_bytes=mem)

        params = d.params["water"]
        lookup = {tuple(row): i for i, row in enumerate(params[:, :3].tolist())}

        def to_idx(r):
            rows = np.stack([r.t1_ms, r.t2_ms, r.b1], 1).astype(np.float32).tolist()
            return np.array([lookup[tuple(row)] for row in rows], dtype=np.int64)
    base_rss = memory_baseline()
    best, times, out = best_time(lambda: fn(x), lambda: fn(x[:WARM_VOXELS]), device, args.repeats)
    res.update(memory_report(device, base_rss, base_cuda))
    if to_idx is not None:
        res["rank"] = int(out.rank)
        idx = to_idx(out)
    else:
        idx = out.cpu().numpy()
    res.update(seconds=best, times=times, fps=res["n_vox"] / best)
    path = workdir / f"idx_{args.tag}.npy"
    np.save(path, idx)
    res["idx"] = str(path)
    return res


# ---- mrpro (peer venv) ------------------------------------------------------------------------------------------
def mrpro_worker(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    device, threads = args.device[0], args.threads[0]
    base_cuda = setup_worker(threads, device)
    mrpro = _peer.import_mrpro()
    from mrpro.operators import DictionaryMatchOp

    workdir = Path(args.workdir)
    x = load_voxels(workdir, args.n_vox).to(device)  # [V, N]
    holder = {"atoms": torch.from_numpy(np.load(workdir / "atoms.npy")).to(device)}  # [A, N]
    n_atoms = holder["atoms"].shape[0]

    def generating_function(index):
        # The "signal model": atom index -> signal, with the signal (time) dimension first, as mrpro expects.
        return (holder["atoms"][index].mT,)

    op = DictionaryMatchOp(generating_function, index_of_scaling_parameter=None, batch_size=args.mrpro_batch)
    op.append(torch.arange(n_atoms, device=device))
    holder.clear()  # the op keeps its own normalised copy (op.y, [N, A])
    y = x.mT  # mrpro wants (signal dim, *batch)
    base_rss = memory_baseline()

    def fn(yy):
        (idx,) = op(yy)
        return idx

    best, times, idx = best_time(lambda: fn(y), lambda: fn(y[:, :WARM_VOXELS]), device, args.repeats)
    res = {"kind": "mrpro", "device": device, "threads": threads, "n_vox": int(x.shape[0]), "rank": "-",
           "version": getattr(mrpro, "__version__", "?"), "batch_size": args.mrpro_batch,
           "seconds": best, "times": times, "fps": x.shape[0] / best}
    res.update(memory_report(device, base_rss, base_cuda))
    path = workdir / f"idx_{args.tag}.npy"
    np.save(path, idx.cpu().numpy().astype(np.int64))
    res["idx"] = str(path)
    return res


# ---- set-up (project venv) --------------------------------------------------------------------------------------
def make_grid(args):
    from pipelines.mapping.dictionary import CompartmentGrid, geometric_grid

    step, note = args.atoms_step, None
    while True:
        grid = CompartmentGrid(geometric_grid(100, 5000, step), geometric_grid(10, 2000, step), tuple(args.b1))
        n = grid.combos().shape[0]
        if n >= args.min_atoms or step < 0.2:
            break
        step = round(step * 0.9, 3)
    if step != args.atoms_step:
        note = (f"grid step refined from {args.atoms_step} % to {step} % to reach >= {args.min_atoms} atoms "
                f"({n} atoms)")
    return grid, step, note


def make_data(args, seq, grid):
    import numpy as np
    import torch

    from pipelines.physics.epg import epg_chunked, epg_fisp

    rng = np.random.default_rng(args.seed)
    v = args.voxels
    t1 = np.exp(rng.uniform(np.log(100.0), np.log(5000.0), v))
    t2 = np.exp(rng.uniform(np.log(10.0), np.log(np.minimum(t1, 2000.0))))
    b1 = rng.uniform(min(args.b1), max(args.b1), v)
    p = torch.as_tensor(np.stack([t1, t2, b1], 1), dtype=torch.float32)
    order = torch.argsort(p[:, 1], stable=True)  # T2-sorted chunks keep fewer dephasing orders
    q = p[order]
    with torch.no_grad():
        s = epg_chunked(lambda a, b, c: epg_fisp(seq, a, b, c), q[:, 0], q[:, 1], q[:, 2], chunk=2048)
    sig = torch.empty_like(s)
    sig[order] = s
    m0 = rng.uniform(0.5, 1.5, v) * np.exp(1j * rng.uniform(0, 2 * np.pi, v))
    sig = sig.numpy() * m0[:, None].astype(np.complex64)
    sigma = np.sqrt(np.mean(np.abs(sig) ** 2)) / args.snr
    noise = (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape)) * (sigma / np.sqrt(2))
    data = (sig + noise).astype(np.complex64)
    return data, np.stack([t1, t2, b1], 1)


# ---- report -----------------------------------------------------------------------------------------------------
def main() -> None:
    args = ARGS
    if args.worker or args.mrpro_worker:
        try:
            res = mrpro_worker(args) if args.mrpro_worker else ours_worker(args)
        except Exception as e:  # noqa: BLE001 - report, the parent prints it
            import traceback

            res = {"error": f"{type(e).__name__}: {e} | {traceback.format_exc()[-600:]}"}
        print(json.dumps(res))
        return

    os.environ.update({k: str(args.prep_threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    import numpy as np
    import torch

    from pipelines.mapping.dictionary import DictionarySpec, build_dictionary, simulate_atoms
    from pipelines.mapping.matching import DEFAULT_ENERGY
    from pipelines.physics.sequences import fisp_sequence

    torch.set_num_threads(args.prep_threads)
    t_start, load0 = time.perf_counter(), _peer.loadavg()
    started = datetime.datetime.now().astimezone()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-matching-"))
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa

    seq = fisp_sequence()
    grid, step, note = make_grid(args)
    if note:
        notes.append(note)
    spec = DictionarySpec({"water": grid}, FIELD_T)
    params = grid.combos()
    n_atoms = params.shape[0]
    log(f"grid: {len(grid.t1_ms)} T1 x {len(grid.t2_ms)} T2 x {len(grid.b1)} B1 -> {n_atoms} atoms")
    t0 = time.perf_counter()
    with torch.no_grad():
        d = build_dictionary(seq, spec, use_cache=False)
    t_dict = time.perf_counter() - t0
    d.save(workdir / "dict.npz")
    log(f"build_dictionary: {t_dict:.1f} s (rank stored {d.complex.basis.shape[1]})")
    t0 = time.perf_counter()
    with torch.no_grad():
        atoms = simulate_atoms(seq, grid, "water", FIELD_T)
        atoms = atoms / torch.linalg.vector_norm(atoms, dim=1, keepdim=True).clamp_min(1e-12)
    t_atoms = time.perf_counter() - t0
    np.save(workdir / "atoms.npy", atoms.numpy())
    del atoms
    log(f"full atoms: {t_atoms:.1f} s")
    t0 = time.perf_counter()
    data, truth = make_data(args, seq, grid)
    t_data = time.perf_counter() - t0
    np.save(workdir / "data.npy", data)
    del data
    log(f"fingerprints: {t_data:.1f} s")
    auto_rank = d.complex.rank_for_energy(DEFAULT_ENERGY)
    n_full = min(args.full_voxels, args.voxels)

    devices = [dev for dev in args.device if dev == "cpu" or torch.cuda.is_available()]
    peer = None if args.skip_mrpro else _peer.peer_python(args.mrpro_python)
    if args.skip_mrpro:
        notes.append("mrpro skipped (--skip-mrpro)")
    elif peer is None:
        notes.append(f"mrpro: peer python {args.mrpro_python} not found (not installed)")
    rows: list[dict] = []
    script = Path(__file__).resolve()
    for dev in devices:
        for threads in (args.threads if dev == "cpu" else [max(args.threads)]):
            jobs = [(k, n_full if k == "full" else args.voxels) for k in KINDS]
            if peer:
                jobs.append(("mrpro", n_full))
            for kind, nv in jobs:
                tag = f"{kind}_{dev}_{threads}"
                wargs = ["--workdir", str(workdir), "--threads", str(threads), "--device", dev, "--n-vox", str(nv),
                         "--repeats", str(args.repeats), "--tag", tag, "--mrpro-batch", str(args.mrpro_batch)]
                if args.memory_bytes:
                    wargs += ["--memory-bytes", str(args.memory_bytes)]
                if kind == "mrpro":
                    res = _peer.run_json(peer, script, ["--mrpro-worker", *wargs], threads)
                else:
                    res = _peer.run_json(sys.executable, script, ["--worker", kind, *wargs], threads)
                res.setdefault("kind", kind)
                res.update(device=dev, threads=threads)
                if "error" in res:
                    notes.append(f"{kind} ({dev}, {threads} threads): {res['error']}")
                    log(f"{tag}: ERROR {res['error'][:300]}")
                else:
                    log(f"{tag}: {res['fps']:,.0f} fp/s, peak RSS delta {res['rss_delta_mib']:.0f} MiB, "
                        f"times {', '.join(f'{t:.2f}' for t in res['times'])}")
                rows.append(res)

    # agreement on the first n_full voxels
    def idx_of(r):
        return np.load(r["idx"]) if "idx" in r else None

    ref_full = next((idx_of(r)[:n_full] for r in rows if r["kind"] == "full" and "idx" in r), None)
    ref_mrpro = next((idx_of(r)[:n_full] for r in rows if r["kind"] == "mrpro" and "idx" in r), None)
    full_fps = {(r["device"], r["threads"]): r["fps"] for r in rows if r["kind"] == "full" and "fps" in r}

    label = {"full": "full (no SVD), brute force", "rank5": "match() rank 5", "rank10": "match() rank 10",
             "auto": "match() rank auto (energy)", "mrpro": "mrpro DictionaryMatchOp (no SVD)"}
    lines = []
    title = (f"## Dictionary matching: {args.voxels} fingerprints (128 x 128 slice) x {n_atoms:,} atoms, FISP "
             f"{seq.n_frames} TRs, complex64, best of {args.repeats} after a warm-up")
    lines += [title, ""]
    lines.append("| device | threads | matcher | rank | voxels timed | best time (s) | fingerprints/s | vs full "
                 "| peak RSS (MiB) | Δ peak RSS (MiB) | same atom as full | same atom as mrpro "
                 "| median rel. err T1 / T2 |")
    lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = label[r["kind"]]
        if "error" in r:
            lines.append(f"| {r['device']} | {r['threads']} | {name} | | | failed (see notes) | | | | | | | |")
            continue
        idx = idx_of(r)
        same_full = f"{np.mean(idx[:n_full] == ref_full):.4f}" if ref_full is not None else "n/a"
        same_mr = f"{np.mean(idx[:n_full] == ref_mrpro):.4f}" if ref_mrpro is not None else "n/a"
        est = params[idx]
        tr = truth[: idx.shape[0]]
        e1 = np.median(np.abs(est[:, 0] - tr[:, 0]) / tr[:, 0])
        e2 = np.median(np.abs(est[:, 1] - tr[:, 1]) / tr[:, 1])
        vt = f"{r['n_vox']}" + (" (subset)" if r["n_vox"] < args.voxels else "")
        ff = full_fps.get((r["device"], r["threads"]))
        speed = f"{r['fps'] / ff:.1f}x" if ff else ""
        mem = f"{r['rss_delta_mib']:.0f}"
        if r["device"] == "cuda" and "cuda_delta_mib" in r:
            mem += f" (CUDA {r['cuda_delta_mib']:.0f})"
        lines.append(f"| {r['device']} | {r['threads']} | {name} | {r['rank']} | {vt} | {r['seconds']:.3f} "
                     f"| {r['fps']:,.0f} | {speed} | {r['rss_peak_mib']:.0f} | {mem} | {same_full} | {same_mr} "
                     f"| {e1:.3f} / {e2:.3f} |")
    for dev in args.device:
        if dev not in devices:
            lines.append(f"| {dev} | | (not available on this machine) | | | | | | | | | | |")
    lines.append("")
    mr = next((r for r in rows if r["kind"] == "mrpro" and "version" in r), None)
    cmd = " ".join(["python", "benchmarks/matching.py", *sys.argv[1:]])
    lines += [
        f"* Dictionary: T1 geometric_grid(100, 5000, {step}) x T2 geometric_grid(10, 2000, {step}) (T2 <= T1) x "
        f"B1 {tuple(args.b1)} = {n_atoms:,} atoms; build_dictionary {t_dict:.1f} s (stores rank "
        f"{d.complex.basis.shape[1]}), full atoms (simulate_atoms + normalise) {t_atoms:.1f} s, "
        f"{args.voxels} test fingerprints {t_data:.1f} s (not timed; {args.prep_threads} thread(s)).",
        f"* rank auto = `match(rank=None)`: rank_for_energy({DEFAULT_ENERGY}) = {auto_rank}.",
        f"* Test data: epg_fisp of random tissues in the grid range x random complex M0, complex Gaussian noise at "
        f"SNR {args.snr:g} (RMS signal / RMS noise). 'median rel. err' is against the true (off-grid) T1 / T2 "
        f"(grid step {step} %: quantisation alone gives ~{step / 4:.1f} %).",
        f"* The uncompressed matchers are timed on the first {n_full} voxels (fingerprints/s is for that subset); "
        f"agreement columns compare atom indices on those {n_full} voxels "
        f"(reference: full brute force{' and mrpro' if ref_mrpro is not None else ''} "
        f"at {args.threads[0] if 'cpu' in devices else 'cuda'} thread(s)).",
        "* Memory: one fresh subprocess per row; peak RSS = VmHWM (/proc/self/status); Δ = peak minus the RSS "
        "after the inputs were loaded (data, atoms or compressed dictionary; for mrpro after `append`, so its "
        "normalised copy of the atoms is in the baseline, not in Δ), with VmHWM reset at that point via "
        "/proc/self/clear_refs. Not ru_maxrss: Linux carries ru_maxrss over execve from the parent (the "
        "benchmark's own ~400 MB), which hides smaller peaks; not tracemalloc: it does not see torch's "
        "allocations.",
        f"* match() and the brute force use memory_bytes = {args.memory_bytes or 'default (2 GiB)'}: "
        "4096-voxel chunks, atom chunks of memory_bytes / (24 B x 4096).",
    ]
    if mr:
        lines.append(f"* mrpro {mr['version']} (peer venv {args.mrpro_python}): "
                     f"`DictionaryMatchOp(f, index_of_scaling_parameter=None, batch_size={mr['batch_size']})`, "
                     "f(index) = (atoms[index].mT,) on the same normalised atoms, one `append(arange(n_atoms))`, "
                     "called on the fingerprints as (frames, voxels); it returns the atom index.")
    if any(r.get("hwm_reset") is False for r in rows):
        notes.append("/proc/self/clear_refs was not writable: Δ is over the peak RSS reached while loading")
    lines += [f"* {n}" for n in notes]
    lines += [
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {_peer.cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}"
        + (f", CUDA {torch.cuda.get_device_name(0)}" if "cuda" in devices else ", no CUDA") + "  ",
        f"Date: {started.strftime('%Y-%m-%d %H:%M %Z')}; total wall time {time.perf_counter() - t_start:.0f} s; "
        f"load average before / after: {load0} / {_peer.loadavg()}",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])

if __name__ == "__main__":
    main()
