"""EPG throughput: recon-node's EPG (pipelines.physics.epg) against mrpro's, on the same schedule, same run.

Usage::

    python benchmarks/epg.py [--batch 10000] [--threads 1 2] [--device cpu cuda] [--repeats 3]

Prints a Markdown table of fingerprints/s for

* FISP, real fast path (no off-resonance, RF phase 0) on the built-in ``fisp`` schedule (first ``--frames`` TRs);
* FISP, complex path (off-resonance df ~ U(-100, 100) Hz) on the same schedule;
* water/fat (one water EPG + six fat-peak EPGs per fingerprint) on the ``t1ff`` schedule (175 frames, 3 T);
* mrpro's EPG (``EPGSequence([InversionBlock(TI), FispBlock(flip, 0, TE, TR)])``) on the ``fisp`` schedule with
  the same tissues and the same number of dephasing orders, and the ratio ours / mrpro (> 1: ours is faster);

per thread count (CPU) and on CUDA when present; then the agreement of our fingerprints with mrpro's, the exact
command and the machine. Timing: a warm-up on a small batch, then the best of ``--repeats`` runs of the full batch,
under ``torch.no_grad()`` (the inference path). float32 inputs, complex64 fingerprints, for both libraries.

Tissues: T1 ~ U(100, 4000) ms, T2 ~ U(10, min(T1, --t2-max)) ms, B1 ~ U(0.7, 1.3). The number of dephasing orders
K is :func:`default_n_states` for that range (112 for T2 <= 1000 ms on ``fisp``; cost grows linearly with K).

mrpro is not a project dependency. It runs in a peer virtual environment, in a subprocess of this script
(``--mrpro-python``, default /work/bench-venv/bin/python; ``not installed`` is printed when it is absent or
cannot import mrpro). Set the peer venv up with the same torch as the project (an unconstrained install pulls
several GB of CUDA wheels)::

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0            # the CPU or CUDA wheel the project uses
    /work/bench-venv/bin/pip install mrpro --constraint <(echo torch==2.13.0)
    /work/bench-venv/bin/pip install numpy scipy tqdm
    /work/bench-venv/bin/pip install -e . --no-deps            # so the worker builds the same schedule

With the CPU torch wheel the torchvision that pip picks for mrpro does not load (``torchvision::nms does not
exist``); only mrpro's brainweb phantom uses it, so the worker puts empty stub modules in ``sys.modules`` first.

Convention notes (checked by the agreement section): mrpro's FispBlock does RF -> relax(TE) -> read F+_0 ->
gradient -> relax(TR - TE); ours relaxes over TR - TE before the gradient. Both orders are the same map (the gradient
moves F orders, relaxation scales every order alike and recovers only Z_0, which the gradient does not touch), and
both use Weigel's RF operator, so the fingerprints should agree to rounding, phase included. mrpro's
InversionBlock is a perfect 180 deg pulse (our inversion_efficiency = 1). mrpro works in seconds; we pass ms / 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402

REPO = _peer.REPO
DEFAULT_PEER_PYTHON = _peer.DEFAULT_PEER_PYTHON
FIELD_T = 3.0
AGREE_N = 256  # fingerprints compared with mrpro (float64 in both)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=10000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--frames", type=int, default=1000, help="TRs of the fisp schedule")
    p.add_argument("--t2-max", type=float, default=1000.0, help="upper end of the T2 range (ms)")
    p.add_argument("--n-states", type=int, default=None, help="dephasing orders (default: default_n_states)")
    p.add_argument("--mrpro-python", default=DEFAULT_PEER_PYTHON, help="python of the peer venv with mrpro")
    p.add_argument("--no-mrpro", action="store_true")
    p.add_argument("--mrpro-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
# Thread count for the OpenMP pool must be fixed before torch is imported; set_num_threads picks within it.
os.environ.setdefault("OMP_NUM_THREADS", str(max(ARGS.threads)))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.physics.epg import default_n_states, epg_fisp, epg_water_fat  # noqa: E402
from pipelines.physics.sequences import MRFSequence, fisp_sequence, t1ff_sequence  # noqa: E402


# ---- shared set-up (identical in this process and the mrpro worker) -------------------------------------
def fisp_schedule(n_frames: int) -> MRFSequence:
    seq = fisp_sequence()
    if n_frames >= seq.n_frames:
        return seq
    return MRFSequence(
        name=f"fisp{n_frames}", flip_angles_deg=seq.flip_angles_deg[:n_frames], tr_ms=seq.tr_ms[:n_frames],
        te_ms=seq.te_ms[:n_frames], ti_ms=seq.ti_ms,
    )


def tissues(batch: int, t2_max: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(100.0, 4000.0, batch)
    t2 = rng.uniform(10.0, np.minimum(t1, t2_max))
    b1 = rng.uniform(0.7, 1.3, batch)
    df = rng.uniform(-100.0, 100.0, batch)
    ff = rng.uniform(0.0, 1.0, batch)
    t2w = rng.uniform(10.0, 200.0, batch)
    t1w = rng.uniform(np.maximum(t2w, 500.0), 2500.0)
    t1f = rng.uniform(250.0, 400.0, batch)
    t2f = rng.uniform(40.0, 120.0, batch)
    return dict(t1=t1, t2=t2, b1=b1, df=df, ff=ff, t1w=t1w, t2w=t2w, t1f=t1f, t2f=t2f)


def n_states_for(seq: MRFSequence, t2_max: float, override: int | None) -> int:
    return override or default_n_states(seq.n_frames, t2_max, float(seq.tr_ms.min()))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, warm, device: str, repeats: int) -> float:
    with torch.no_grad():
        warm()
        sync(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return best


# ---- mrpro (runs in the peer venv) ---------------------------------------------------------------------
def import_mrpro_epg():
    # torchvision is used only by mrpro.phantoms.brainweb; the CPU wheel's torchvision may not load (_peer stubs it).
    mrpro = _peer.import_mrpro()
    from mrpro.operators.models import EPG

    return mrpro, EPG


def mrpro_simulator(EPG, seq: MRFSequence, device: str, dtype: torch.dtype, exact_inversion: bool = False):
    """A function (t1_ms, t2_ms, b1, n_states) -> [B, N] fingerprints from mrpro's EPG blocks.

    ``exact_inversion``: start from Z_0 = -1 followed by a DelayBlock(TI) instead of mrpro's InversionBlock, whose
    180 deg pulse is built from float32 pi (sin = -8.7e-8) and leaves a ~1e-7 transverse residue even in float64.
    """

    def t(a):
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

    blocks = []
    if seq.ti_ms is not None:
        ti = torch.tensor(seq.ti_ms * 1e-3, dtype=dtype, device=device)  # a Python float would become float32
        blocks.append(EPG.DelayBlock(ti) if exact_inversion else EPG.InversionBlock(ti))
    blocks.append(EPG.FispBlock(t(np.deg2rad(seq.flip_angles_deg)), 0.0, t(seq.te_ms * 1e-3), t(seq.tr_ms * 1e-3)))
    sequence = EPG.EPGSequence(blocks)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64

    def run(t1_ms, t2_ms, b1, n_states):
        params = EPG.Parameters(
            m0=torch.ones(t1_ms.shape, dtype=cdtype, device=device), t1=t1_ms * 1e-3, t2=t2_ms * 1e-3,
            relative_b1=b1.to(cdtype),
        )
        states = EPG.initial_state(t1_ms.shape, n_states=n_states, device=device, dtype=cdtype)
        if exact_inversion and seq.ti_ms is not None:
            states[..., 2, 0] = -1.0
        _, signals = sequence(params, states=states)
        return torch.stack(signals, dim=-1)

    return run


def mrpro_worker(args: argparse.Namespace) -> None:
    """Runs in the peer venv: time mrpro and write its fingerprints for the agreement check."""
    result: dict = {"python": sys.executable}
    try:
        mrpro, EPG = import_mrpro_epg()
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return
    result["version"] = getattr(mrpro, "__version__", "?")
    torch.set_num_threads(args.threads[0])
    device = args.device[0]
    seq = fisp_schedule(args.frames)
    k = n_states_for(seq, args.t2_max, args.n_states)
    tis = tissues(args.batch, args.t2_max)
    run32 = mrpro_simulator(EPG, seq, device, torch.float32)
    p32 = [torch.as_tensor(tis[n], dtype=torch.float32, device=device) for n in ("t1", "t2", "b1")]
    small = [x[: min(256, args.batch)] for x in p32]
    result["seconds"] = best_time(lambda: run32(*p32, k), lambda: run32(*small, k), device, args.repeats)
    result["n_states"] = k
    if args.worker_out:
        run64 = mrpro_simulator(EPG, seq, device, torch.float64)
        run64x = mrpro_simulator(EPG, seq, device, torch.float64, exact_inversion=True)
        p64 = [torch.as_tensor(tis[n][:AGREE_N], dtype=torch.float64, device=device) for n in ("t1", "t2", "b1")]
        with torch.no_grad():
            fp64 = run64(*p64, k).cpu().numpy()
            fp64x = run64x(*p64, k).cpu().numpy()
            fp32 = run32(*p32, k)[:AGREE_N].cpu().numpy()
        np.savez(args.worker_out, fp64=fp64, fp64x=fp64x, fp32=fp32)
    print(json.dumps(result))


def run_mrpro(args, device: str, threads: int, out: str | None) -> dict:
    """mrpro timing (and fingerprints in ``out``) from a subprocess in the peer venv, or in-process."""
    cmd_args = [
        "--mrpro-worker", "--batch", str(args.batch), "--threads", str(threads), "--device", device,
        "--repeats", str(args.repeats), "--frames", str(args.frames), "--t2-max", str(args.t2_max),
    ]
    if args.n_states:
        cmd_args += ["--n-states", str(args.n_states)]
    if out:
        cmd_args += ["--worker-out", out]
    peer = Path(args.mrpro_python)
    if peer.exists():
        env = _peer.thread_env(threads)
        proc = subprocess.run([str(peer), str(Path(__file__).resolve()), *cmd_args], capture_output=True, text=True,
                              env=env, cwd=str(REPO))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            return {"error": f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"}
        return json.loads(lines[-1])
    try:  # mrpro in this environment?
        import_mrpro_epg()
    except Exception:  # noqa: BLE001
        return {"error": "not installed"}
    buf = []
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as s:
        mrpro_worker(parse_args(cmd_args))
    buf = [ln for ln in s.getvalue().splitlines() if ln.startswith("{")]
    return json.loads(buf[-1])


# ---- ours ----------------------------------------------------------------------------------------------
def bench_ours(args, device: str, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    fisp = fisp_schedule(args.frames)
    t1ff = t1ff_sequence()
    k = n_states_for(fisp, args.t2_max, args.n_states)
    tis = tissues(args.batch, args.t2_max)
    p = {n: torch.as_tensor(v, dtype=torch.float32, device=device) for n, v in tis.items()}
    sm = {n: v[: min(256, args.batch)] for n, v in p.items()}

    def fisp_real(q):
        return epg_fisp(fisp, q["t1"], q["t2"], q["b1"], n_states=k)

    def fisp_complex(q):
        return epg_fisp(fisp, q["t1"], q["t2"], q["b1"], q["df"], n_states=k)

    def water_fat(q):
        return epg_water_fat(t1ff, q["ff"], q["t1w"], q["t2w"], q["t1f"], q["t2f"], q["b1"], q["df"],
                             field_strength_T=FIELD_T)

    wf_k = (f"{default_n_states(t1ff.n_frames, 200.0, float(t1ff.tr_ms.min()))}/"
            f"{default_n_states(t1ff.n_frames, 120.0, float(t1ff.tr_ms.min()))}")
    rows = []
    for name, fn, seq, kk in (
        ("FISP real fast path", fisp_real, fisp, str(k)),
        ("FISP complex (df)", fisp_complex, fisp, str(k)),
        ("water/fat (1+6 EPGs)", water_fat, t1ff, wf_k),
    ):
        sec = best_time(lambda f=fn: f(p), lambda f=fn: f(sm), device, args.repeats)
        rows.append(dict(device=device, threads=threads, model=name, schedule=f"{seq.name} ({seq.n_frames} TRs)",
                         k=kk, seconds=sec, fps=args.batch / sec))
    return rows


def agreement(args, npz_path: str) -> str:
    """Our fingerprints vs mrpro's (written by the worker): max relative differences."""
    d = np.load(npz_path)
    fisp = fisp_schedule(args.frames)
    k = n_states_for(fisp, args.t2_max, args.n_states)
    tis = tissues(args.batch, args.t2_max)
    lines = []
    labels = {
        "fp64": "float64, mrpro InversionBlock",
        "fp64x": "float64, mrpro with Z0 = -1 + DelayBlock(TI) (exact inversion)",
        "fp32": "float32 (as timed), mrpro InversionBlock",
    }
    for dtype, key in ((torch.float64, "fp64"), (torch.float64, "fp64x"), (torch.float32, "fp32")):
        n = d[key].shape[0]
        q = [torch.as_tensor(tis[x][:n], dtype=dtype) for x in ("t1", "t2", "b1")]
        with torch.no_grad():
            ours = epg_fisp(fisp, *q, n_states=k).numpy()
        theirs = d[key]
        scale = np.abs(theirs).max(axis=-1)
        mag = (np.abs(np.abs(ours) - np.abs(theirs)).max(axis=-1) / scale).max()
        cplx = (np.abs(ours - theirs).max(axis=-1) / scale).max()
        lines.append(
            f"* {labels[key]}, {n} fingerprints, K = {k}: max over fingerprints of max_t ||ours| - |mrpro|| / "
            f"max_t |mrpro| = {mag:.2e}; with the complex difference (phase included): {cplx:.2e}"
        )
    return "\n".join(lines)


def main() -> None:
    args = ARGS
    if args.mrpro_worker:
        mrpro_worker(args)
        return
    devices = [d for d in args.device if d == "cpu" or torch.cuda.is_available()]
    skipped = [d for d in args.device if d not in devices]
    rows: list[dict] = []
    notes: list[str] = []
    agree_text = None
    t_start = time.perf_counter()
    load0 = _peer.loadavg()
    for device in devices:
        for threads in args.threads if device == "cpu" else [max(args.threads)]:
            ours = bench_ours(args, device, threads)
            mr: dict = {"error": "skipped (--no-mrpro)"}
            tmp = None
            if not args.no_mrpro:
                want_agree = agree_text is None
                tmp = tempfile.NamedTemporaryFile(suffix=".npz", delete=False).name if want_agree else None
                mr = run_mrpro(args, device, threads, tmp)
                if want_agree and "error" not in mr and Path(tmp).exists() and Path(tmp).stat().st_size:
                    agree_text = agreement(args, tmp)
                if tmp:
                    Path(tmp).unlink(missing_ok=True)
            mr_fps = args.batch / mr["seconds"] if "seconds" in mr else None
            for r in ours:
                if r["model"].startswith("FISP"):
                    r["ratio"] = f"{r['fps'] / mr_fps:.2f}" if mr_fps else "n/a"
                else:
                    r["ratio"] = "n/a (mrpro: no off-resonance)"
            rows.extend(ours)
            if mr_fps:
                rows.append(dict(device=device, threads=threads, model=f"mrpro {mr.get('version', '')} EPG (FISP)",
                                 schedule=ours[0]["schedule"], k=str(mr["n_states"]), seconds=mr["seconds"],
                                 fps=mr_fps, ratio="1.00"))
            else:
                rows.append(dict(device=device, threads=threads, model="mrpro EPG (FISP)",
                                 schedule=ours[0]["schedule"], k="", seconds=None, fps=None, ratio=""))
                notes.append(f"mrpro ({device}, {threads} threads): {mr['error']}")

    cmd = " ".join(["python", "benchmarks/epg.py", *sys.argv[1:]])
    print(f"## EPG throughput (batch {args.batch}, best of {args.repeats} after a warm-up, float32 / complex64)\n")
    print("| device | threads | model | schedule | K | best time (s) | fingerprints/s | ours / mrpro |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        sec = "not installed" if r["seconds"] is None else f"{r['seconds']:.2f}"
        fps = "" if r["fps"] is None else f"{r['fps']:,.0f}"
        print(f"| {r['device']} | {r['threads']} | {r['model']} | {r['schedule']} | {r['k']} | {sec} | {fps} "
              f"| {r['ratio']} |")
    for d in skipped:
        print(f"| {d} | | (not available on this machine) | | | | | |")
    print()
    if agree_text:
        print("Agreement with mrpro (FISP, fisp schedule, same tissues, no off-resonance):\n")
        print(agree_text)
        print()
    for n in notes:
        print(f"* {n}")
    print(f"Command: `{cmd}`  ")
    omp = os.environ.get("OMP_NUM_THREADS")
    print(f"Machine: {_peer.cpu_model()}, {os.cpu_count()} logical CPUs, OMP_NUM_THREADS={omp}, "
          f"torch {torch.__version__}, Python {platform.python_version()}"
          + (f", CUDA {torch.cuda.get_device_name(0)}" if "cuda" in devices else "") + "  ")
    print("Water/fat K: water/fat orders (default_n_states for T2w <= 200 ms / T2f <= 120 ms); "
          "ratio = our fingerprints/s / mrpro's at the same device and thread count.  ")
    print(f"Total wall time: {time.perf_counter() - t_start:.0f} s; load average before / after: {load0} / "
          f"{_peer.loadavg()} (other processes on the machine make multi-thread timings noisy)")


if __name__ == "__main__":
    main()
