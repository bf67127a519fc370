"""Learned fingerprint-to-map estimators side by side: the four tables of issue 9, as markdown.

    python benchmarks/estimators_eval.py                 # all four tables (~20-30 min on 2 busy CPU cores)
    python benchmarks/estimators_eval.py --sections 3,4  # only some
    python benchmarks/estimators_eval.py --report        # print the markdown of the results already computed

1. T1-FF sequence, shaped like Balsiger et al. Table 1: MAE, mean relative error, R^2 of FF, T1 water, T1 fat,
   field offset and B1 on held-out random parameters off the training and dictionary grids (unperturbed
   fingerprints, as in the paper; MAE also at SNR 30), and inference time per 1,000 fingerprints.
   Dictionary matching vs the shipped FC, INN, BlochNet and hybrid weights.
2. The same on the FISP sequence for T1, T2, B1.
3. IVIM after Epstein et al.: S0, f, D, D* at b = 0 ... 800 s/mm^2, Rician noise at SNR 15 and 30; bias, SD and
   RMSE against ground truth on a parameter grid with noise repetitions for networks trained on GT labels,
   Rician-MLE labels, Gaussian-MLE labels and hybrid alpha = 0.5 labels, and for the MLE fit itself.
4. Out of distribution, as BlochNet's Table 2: FC and BlochNet trained on two 300-frame FISP-type schedules
   (spline5, spline11noisy), tested on a third (FISP half-sine lobes); MSE of log T1, log T2 against dictionary
   matching with the training schedules' dictionary (the paper's setting) and with the test schedule's own.

Sized for this machine (2 shared CPU cores, no GPU): 1,000 test fingerprints per MRF table, networks of
sections 3 and 4 trained here for minutes, not the papers' epochs. Results go to --out (JSON, one file per
section) so a later --report prints them without recomputing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

OUT_DEFAULT = Path(os.environ.get("RECON_NODE_BENCH_OUT", "/tmp/estimators/bench"))


# ---- shared metrics ------------------------------------------------------------------------------------------
def regression_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    err = pred - truth
    ae = np.abs(err)
    denom = np.abs(truth)
    ok = denom > 1e-6 * max(float(denom.max()), 1e-30)  # relative error undefined at 0 (FF = 0, df = 0)
    re = ae[ok] / denom[ok] * 100
    ss_res, ss_tot = float((err**2).sum()), float(((truth - truth.mean()) ** 2).sum())
    return {"mae": float(ae.mean()), "mae_sd": float(ae.std()), "mre": float(re.mean()), "mre_sd": float(re.std()),
            "r2": 1 - ss_res / max(ss_tot, 1e-30)}


def time_per_1000(fn, x: torch.Tensor, repeat: int = 3) -> float:  # noqa: ANN001
    fn(x[:100])
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
    return best / x.shape[0] * 1000


# ---- sections 1 and 2: MRF tables ------------------------------------------------------------------------------
MRF_PARAMS = {"t1ff": ("ff", "t1_ms", "t1_fat_ms", "df_hz", "b1"), "fisp": ("t1_ms", "t2_ms", "b1")}
LABEL = {"ff": "FF", "t1_ms": "T1 water (ms)", "t1_fat_ms": "T1 fat (ms)", "df_hz": "Δf (Hz)", "b1": "B1",
         "t2_ms": "T2 (ms)"}


def mrf_table(seq_name: str, n_test: int, weights_dir: Path, seed: int = 2024,
              models: tuple[str, ...] = ("dictionary", "fc", "inn", "blochnet", "hybrid")) -> dict:
    from pipelines.mapping.dictionary import build_dictionary
    from pipelines.mapping.estimators.base import load_estimator
    from pipelines.mapping.estimators.data import add_noise, default_space, simulate
    from pipelines.mapping.maps import default_spec
    from pipelines.mapping.matching import match
    from pipelines.mapping.water_fat import match_water_fat
    from pipelines.physics.sequences import get_sequence

    seq = get_sequence(seq_name)
    space = default_space(seq)
    # Held-out parameters: a seed no training run used; continuous values, so off every grid.
    p = space.sample(n_test, np.random.default_rng(seed))
    clean = simulate(seq, space, p, chunk=512)
    noisy = add_noise(clean, 30.0, torch.Generator().manual_seed(seed))
    truth = space.as_dict(p)
    names = MRF_PARAMS[seq_name]
    methods: dict[str, dict] = {}
    dictionary = build_dictionary(seq, default_spec(seq, space.kind, 3.0, True))

    def dm(x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.no_grad():
            if space.kind == "water_fat":
                r = match_water_fat(x, dictionary)
                return {"ff": r.ff, "t1_ms": r.t1_ms, "t1_fat_ms": r.t1_fat_ms, "df_hz": r.df_hz, "b1": r.b1}
            r = match(x, dictionary)
            return {"t1_ms": r.t1_ms, "t2_ms": r.t2_ms, "b1": r.b1}

    estimators = {"dictionary": dm} if "dictionary" in models else {}
    for model in ("fc", "inn", "blochnet", "hybrid"):
        path = weights_dir / f"estimator_{model}_{seq_name}.safetensors"
        if path.exists() and model in models:
            est = load_estimator(path)
            estimators[model] = est.predict
    for name, fn in estimators.items():
        pred = fn(clean)
        pred_noisy = fn(noisy)
        t_cpu = time_per_1000(fn, clean[:1000])
        methods[name] = {
            "clean": {k: regression_metrics(np.asarray(pred[k], np.float64), truth[k].astype(np.float64)) for k in names},
            "snr30": {k: regression_metrics(np.asarray(pred_noisy[k], np.float64), truth[k].astype(np.float64))
                      for k in names},
            "ms_per_1000_cpu": t_cpu * 1000,
        }
        if torch.cuda.is_available() and name != "dictionary":
            est = load_estimator(weights_dir / f"estimator_{name}_{seq_name}.safetensors", "cuda")
            xg = clean[:1000].cuda()
            methods[name]["ms_per_1000_gpu"] = time_per_1000(lambda v: (est.predict(v), torch.cuda.synchronize()), xg) * 1000
        print(f"  {seq_name} {name}: done", flush=True)
    return {"sequence": seq_name, "n_test": n_test, "names": list(names), "methods": methods,
            "threads": torch.get_num_threads()}


def mrf_markdown(res: dict, title: str) -> str:
    names, methods = res["names"], res["methods"]
    cols = list(methods)
    lines = [f"### {title}", "", f"{res['n_test']} held-out random parameter sets (off the training and dictionary "
             f"grids), unperturbed fingerprints; CPU timing with {res['threads']} thread(s).", "",
             "| metric | parameter | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for metric, label in (("mae", "MAE"), ("mre", "MRE (%)"), ("r2", "R²")):
        for k in names:
            vals = []
            for c in cols:
                m = methods[c]["clean"][k]
                vals.append(f"{m[metric]:.3f}" if metric == "r2" else f"{m[metric]:.3g} ± {m[metric + '_sd']:.2g}")
            best = _best([methods[c]["clean"][k][metric] for c in cols], metric == "r2")
            vals = [f"**{v}**" if i == best else v for i, v in enumerate(vals)]
            lines.append(f"| {label} | {_label(k, res)} | " + " | ".join(vals) + " |")
    lines.append("| MAE at SNR 30 | " + " / ".join(_label(k, res) for k in names) + " | " + " | ".join(
        " / ".join(f"{methods[c]['snr30'][k]['mae']:.3g}" for k in names) for c in cols) + " |")
    lines.append("| ms per 1000 fingerprints (CPU) | | " + " | ".join(f"{methods[c]['ms_per_1000_cpu']:.1f}" for c in cols) + " |")
    if any("ms_per_1000_gpu" in methods[c] for c in cols):
        lines.append("| ms per 1000 fingerprints (GPU) | | " + " | ".join(
            f"{methods[c].get('ms_per_1000_gpu', float('nan')):.2f}" for c in cols) + " |")
    return "\n".join(lines)


def _label(k: str, res: dict) -> str:
    return "T1 (ms)" if (k == "t1_ms" and res["sequence"] == "fisp") else LABEL[k]


def _best(vals: list[float], higher: bool) -> int:
    arr = np.asarray(vals, dtype=np.float64)
    return int(np.nanargmax(arr) if higher else np.nanargmin(arr))


# ---- section 3: IVIM labels study ---------------------------------------------------------------------------------
IVIM_B = (0, 10, 20, 30, 50, 80, 100, 200, 400, 800)
IVIM_LO = np.array([0.8, 0.1, 0.4e-3, 10e-3])
IVIM_HI = np.array([1.2, 0.5, 3.0e-3, 150e-3])
IVIM_NAMES = ("S0", "f", "D", "D*")


def _ivim_model(theta: torch.Tensor) -> torch.Tensor:
    from pipelines.physics.ivim import ivim_signal

    return ivim_signal(IVIM_B, theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3])


def _rician(clean: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    n1, n2 = torch.randn(clean.shape, generator=g), torch.randn(clean.shape, generator=g)
    return torch.sqrt((clean + sigma * n1) ** 2 + (sigma * n2) ** 2)


def _ivim_net() -> torch.nn.Module:
    n = len(IVIM_B)  # Epstein et al.: 3 hidden layers as wide as the number of b-values, ELU
    return torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.ELU(), torch.nn.Linear(n, n), torch.nn.ELU(),
                               torch.nn.Linear(n, n), torch.nn.ELU(), torch.nn.Linear(n, 4))


def _train_ivim(net: torch.nn.Module, x: torch.Tensor, gt_u: torch.Tensor, mle_u: torch.Tensor | None, alpha: float,
                valid: torch.Tensor | None, steps: int, seed: int) -> torch.nn.Module:
    from pipelines.mapping.estimators.labels import label_loss

    g = torch.Generator().manual_seed(seed)
    n_tr = int(0.8 * x.shape[0])  # 80/20 split as the paper; validation keeps the best weights
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state = float("inf"), None
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_tr, (256,), generator=g)
        loss = label_loss(net(x[idx]), gt_u[idx], None if mle_u is None else mle_u[idx], alpha, None,
                          None if valid is None else valid[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps:
            with torch.no_grad():
                v = slice(n_tr, None)
                val = float(label_loss(net(x[v]), gt_u[v], None if mle_u is None else mle_u[v], alpha, None,
                                       None if valid is None else valid[v]))
            if val < best:
                best, best_state = val, {k: t.clone() for k, t in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net


def ivim_study(snr: float, n_train: int, steps: int, grid_points: int, reps: int, seed: int = 0) -> dict:
    from pipelines.mapping.estimators.mle import fit_mle

    lo, hi = torch.as_tensor(IVIM_LO, dtype=torch.float32), torch.as_tensor(IVIM_HI, dtype=torch.float32)
    sigma = 1.0 / snr  # SNR of the b = 0 signal at S0 = 1
    g = torch.Generator().manual_seed(seed)
    theta = lo + (hi - lo) * torch.rand(n_train, 4, generator=g)
    y = _rician(_ivim_model(theta), sigma, g)
    to_u = lambda t: (t - lo) / (hi - lo)  # noqa: E731
    t0 = time.perf_counter()
    labels = {}
    for noise in ("rician", "gaussian"):  # initialised at the ground truth, as Epstein et al.
        r = fit_mle(_ivim_model, y, lo, hi, theta, noise=noise, sigma=sigma, steps=300, lr=0.05)
        labels[noise] = (to_u(r.params), ~r.on_bound)
    t_labels = time.perf_counter() - t0
    torch.manual_seed(seed)
    gt_net = _train_ivim(_ivim_net(), y, to_u(theta), None, 0.0, None, steps, seed)
    nets = {"GT labels": gt_net}
    for name, (noise, alpha) in {"MLE (Rician) labels": ("rician", 1.0), "MLE (Gaussian) labels": ("gaussian", 1.0),
                                 "hybrid α=0.5 (Rician)": ("rician", 0.5)}.items():
        net = _ivim_net()
        net.load_state_dict(gt_net.state_dict())  # Epstein et al. initialise every variant from the GT network
        mle_u, valid = labels[noise]
        nets[name] = _train_ivim(net, y, to_u(theta), mle_u, alpha, valid, steps, seed + 1)
    # Test: a grid over the interior of the training ranges, noise repetitions at every point.
    axes = [torch.linspace(0.1, 0.9, grid_points)] * 4
    grid_u = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 4)
    grid = lo + (hi - lo) * grid_u
    truth = grid.repeat_interleave(reps, 0)
    yt = _rician(_ivim_model(truth), sigma, torch.Generator().manual_seed(seed + 99))
    est = {}
    with torch.no_grad():
        for name, net in nets.items():
            est[name] = lo + (hi - lo) * net(yt)
    t0 = time.perf_counter()
    est["MLE fit (Rician)"] = fit_mle(_ivim_model, yt, lo, hi, truth, noise="rician", sigma=sigma, steps=300,
                                      lr=0.05).params
    t_fit = time.perf_counter() - t0
    out = {}
    for name, e in est.items():
        e = e.reshape(-1, reps, 4)
        tr = grid
        bias = (e.mean(1) - tr).abs().mean(0)  # |bias| per grid point, averaged over the grid
        sd = e.std(1).mean(0)
        rmse = torch.sqrt(((e - tr[:, None]) ** 2).mean((0, 1)))
        out[name] = {"bias": bias.tolist(), "sd": sd.tolist(), "rmse": rmse.tolist()}
    return {"snr": snr, "n_train": n_train, "steps": steps, "grid_points": grid_points, "reps": reps,
            "label_seconds": t_labels, "fit_seconds": t_fit, "n_test": int(yt.shape[0]), "results": out}


def ivim_markdown(res: dict) -> str:
    scale = (1.0, 1.0, 1e3, 1e3)  # D and D* in 10^-3 mm^2/s
    lines = [f"#### IVIM, SNR {res['snr']:g}", "",
             f"{res['n_train']} training signals (Rician noise), {res['steps']} Adam steps per network; test grid "
             f"{res['grid_points']}^4 points x {res['reps']} noise repetitions. |bias| and SD are per grid point, "
             "averaged over the grid; D, D* in 10^-3 mm²/s.", "",
             "| method | " + " | ".join(f"{n} |bias|" for n in IVIM_NAMES) + " | " + " | ".join(
                 f"{n} SD" for n in IVIM_NAMES) + " | " + " | ".join(f"{n} RMSE" for n in IVIM_NAMES) + " |",
             "|---|" + "---|" * 12]
    for name, r in res["results"].items():
        cells = [f"{v * s:.3g}" for key in ("bias", "sd", "rmse") for v, s in zip(r[key], scale)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- section 4: out of distribution (BlochNet Table 2) -------------------------------------------------------------
def ood_schedules(n: int = 300) -> dict:
    from scipy.interpolate import CubicSpline

    from pipelines.physics.sequences import MRFSequence, fisp_sequence

    base = fisp_sequence(n)
    rng = np.random.default_rng(11)
    t = np.arange(n)

    def spline(knots: int, noise: float) -> np.ndarray:
        x = np.linspace(0, n - 1, knots)
        fa = CubicSpline(x, rng.uniform(10, 70, knots))(t)
        fa = fa + noise * rng.standard_normal(n)
        return np.clip(fa, 2, 80)

    def seq(name: str, fa: np.ndarray) -> MRFSequence:
        return MRFSequence(name, fa, base.tr_ms, base.te_ms, ti_ms=base.ti_ms)

    return {"spline5": seq("spline5", spline(5, 0.0)), "spline11noisy": seq("spline11noisy", spline(11, 3.0)),
            "fisp": seq("fisp300", base.flip_angles_deg)}


def ood_study(n_train: int, steps: int, n_test: int, seed: int = 0) -> dict:
    from pipelines.mapping.dictionary import CompartmentGrid, DictionarySpec, build_dictionary, geometric_grid
    from pipelines.mapping.estimators import FitConfig, create_estimator
    from pipelines.mapping.estimators.data import ParameterSpace, ParamRange, simulate
    from pipelines.mapping.matching import match

    space = ParameterSpace("single", (ParamRange("t1_ms", 100.0, 5000.0, True), ParamRange("t2_ms", 10.0, 2500.0, True)))
    seqs = ood_schedules()
    rng = np.random.default_rng(seed)
    p_a, p_b = space.sample(n_train, rng), space.sample(n_train, rng)
    x_a, x_b = simulate(seqs["spline5"], space, p_a), simulate(seqs["spline11noisy"], space, p_b)
    params = torch.cat([p_a, p_b])
    x = torch.cat([x_a, x_b])
    ids = torch.cat([torch.zeros(n_train, dtype=torch.long), torch.ones(n_train, dtype=torch.long)])
    p_test = space.sample(n_test, np.random.default_rng(seed + 5))
    x_test = simulate(seqs["fisp"], space, p_test)
    x_in = simulate(seqs["spline5"], space, p_test)  # in-distribution reference: a training schedule
    res: dict = {"n_train": 2 * n_train, "steps": steps, "n_test": n_test}
    log_truth = torch.log(p_test)

    def mse_log(pred: dict[str, np.ndarray]) -> float:
        lp = torch.log(torch.as_tensor(np.stack([pred["t1_ms"], pred["t2_ms"]], 1)).clamp_min(1e-3))
        return float(((lp - log_truth) ** 2).mean())

    def rel(pred: dict[str, np.ndarray]) -> list[float]:
        return [float(np.median(np.abs(pred[k] / p_test[:, i].numpy() - 1))) * 100 for i, k in enumerate(("t1_ms", "t2_ms"))]

    cfg = FitConfig(steps=steps, batch_size=256, lr=1e-3, seed=seed, snr=None, val_every=250)
    for model, opts in (("fc", {}), ("blochnet", {"decoder_batch": 64, "decoder_every": 4})):
        est = create_estimator(model, seqs["spline5"], space, input="full", **opts)
        if model == "blochnet":
            est.decoder_sequences = [seqs["spline5"], seqs["spline11noisy"]]
        t0 = time.perf_counter()
        est.fit(params, x, config=cfg, sequence_ids=ids)
        res[model] = {"ood_mse_log": mse_log(est.predict(x_test)), "ood_median_rel_err_pct": rel(est.predict(x_test)),
                      "in_dist_mse_log": mse_log(est.predict(x_in)), "train_seconds": time.perf_counter() - t0}
        print(f"  ood {model}: {res[model]}", flush=True)
    grid = CompartmentGrid(geometric_grid(100, 5000, 3.0), geometric_grid(10, 2500, 3.0))
    for name, dseq in (("dictionary (training schedule spline5)", seqs["spline5"]),
                       ("dictionary (test schedule, as the node does)", seqs["fisp"])):
        d = build_dictionary(dseq, DictionarySpec({"water": grid}), use_cache=False)
        r = match(x_test, d)
        pred = {"t1_ms": r.t1_ms, "t2_ms": r.t2_ms}
        res[name] = {"ood_mse_log": mse_log(pred), "ood_median_rel_err_pct": rel(pred)}
    return res


def ood_markdown(res: dict) -> str:
    lines = ["### Out of distribution (BlochNet Table 2 setting)", "",
             f"Trained on {res['n_train']} fingerprints of two 300-frame schedules (spline5, spline11noisy; "
             f"{res['steps']} steps), tested on {res['n_test']} of a third (FISP half-sine lobes). MSE of (log T1, "
             "log T2), as the paper; median relative errors.", "",
             "| method | MSE log (test schedule) | median rel. err. T1 / T2 (%) | MSE log (training schedule) |",
             "|---|---|---|---|"]
    for name, r in res.items():
        if not isinstance(r, dict):
            continue
        e = r["ood_median_rel_err_pct"]
        lines.append(f"| {name} | {r['ood_mse_log']:.4f} | {e[0]:.1f} / {e[1]:.1f} | "
                     f"{r.get('in_dist_mse_log', float('nan')):.4f} |")
    return "\n".join(lines)


# ---- driver ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="1,2,3,4")
    ap.add_argument("--out", default=str(OUT_DEFAULT))
    ap.add_argument("--weights-dir", default="")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ivim-train", type=int, default=100000)
    ap.add_argument("--ivim-steps", type=int, default=8000)
    ap.add_argument("--ood-train", type=int, default=8000, help="fingerprints per training schedule")
    ap.add_argument("--ood-steps", type=int, default=1500)
    ap.add_argument("--report", action="store_true", help="only print the markdown of stored results")
    ap.add_argument("--models", default="dictionary,fc,inn,blochnet,hybrid",
                    help="sections 1-2: methods to (re)evaluate; results merge into an existing section file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pipelines.weights_io import WEIGHTS_DIR

    wdir = Path(args.weights_dir) if args.weights_dir else WEIGHTS_DIR
    sections = {int(s) for s in args.sections.split(",") if s}
    if not args.report:
        for s in sorted(sections):
            t0 = time.perf_counter()
            if s in (1, 2):
                r = mrf_table("t1ff" if s == 1 else "fisp", args.n_test, wdir, models=tuple(args.models.split(",")))
                old = out / f"section{s}.json"
                if old.exists():  # merge: keep methods not re-evaluated, in the usual column order
                    prev = json.loads(old.read_text())
                    merged = {**prev["methods"], **r["methods"]}
                    order = ["dictionary", "fc", "inn", "blochnet", "hybrid"]
                    r["methods"] = {k: merged[k] for k in order if k in merged}
            elif s == 3:
                r = {"snr15": ivim_study(15.0, args.ivim_train, args.ivim_steps, 5, 100),
                     "snr30": ivim_study(30.0, args.ivim_train, args.ivim_steps, 5, 100)}
            elif s == 4:
                r = ood_study(args.ood_train, args.ood_steps, args.n_test)
            else:
                raise ValueError(f"unknown section {s}")
            r["seconds"] = time.perf_counter() - t0
            (out / f"section{s}.json").write_text(json.dumps(r, indent=1))
            print(f"section {s} done in {r['seconds']:.0f} s", flush=True)
    parts = []
    for s in sorted(sections):
        f = out / f"section{s}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        if s == 1:
            parts.append(mrf_markdown(r, "T1-FF sequence (Balsiger et al. Table 1 layout)"))
        elif s == 2:
            parts.append(mrf_markdown(r, "FISP sequence"))
        elif s == 3:
            parts.append("### IVIM training labels (Epstein et al.)\n\n" + ivim_markdown(r["snr15"]) + "\n\n"
                         + ivim_markdown(r["snr30"]))
        elif s == 4:
            parts.append(ood_markdown(r))
        parts[-1] += f"\n\n(section {s}: {r['seconds']:.0f} s)"
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
