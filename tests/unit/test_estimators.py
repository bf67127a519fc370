"""Learned fingerprint-to-map estimators (FC, INN, BlochNet, hybrid NNLS), the MLE fitter and training labels.

Every network here trains for a few seconds on a short schedule; the shipped weights are only loaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.mapping.estimators import Estimator, FitConfig, create_estimator, load_estimator
from pipelines.mapping.estimators.data import ParameterSpace, ParamRange, add_noise, make_training_set, simulate
from pipelines.mapping.estimators.inn import INN
from pipelines.mapping.estimators.labels import TrainingLabels, label_loss, parse_weights
from pipelines.mapping.estimators.mle import fit_mle, mle_for_space
from pipelines.mapping.estimators.nnls import nnls
from pipelines.physics.ivim import ivim_signal
from pipelines.physics.sequences import MRFSequence, fisp_sequence, t1ff_sequence

# A deliberately easy problem so a few seconds of training separate a working estimator from a broken one.
SPACE = ParameterSpace("single", (ParamRange("t1_ms", 300.0, 3000.0, True), ParamRange("t2_ms", 30.0, 300.0, True),
                                  ParamRange("b1", 0.8, 1.2)))


@pytest.fixture(scope="module")
def seq60() -> MRFSequence:
    s = fisp_sequence()
    return MRFSequence("fisp60", s.flip_angles_deg[:60], s.tr_ms[:60], s.te_ms[:60], ti_ms=s.ti_ms)


@pytest.fixture(scope="module")
def data(seq60, tmp_path_factory):
    cache = tmp_path_factory.mktemp("est")
    train = make_training_set(seq60, SPACE, 1200, 0, cache_dir=cache)
    test = make_training_set(seq60, SPACE, 300, 1, cache_dir=cache)
    return train, test


def _mae_unit(space: ParameterSpace, pred: dict[str, np.ndarray], truth: torch.Tensor) -> np.ndarray:
    p = space.to_unit(space.stack(pred))
    return (p - space.to_unit(truth)).abs().mean(0).numpy()


STEPS = {"fc": 250, "inn": 250, "blochnet": 250, "hybrid": 250}
# Test-sized: BlochNet decodes every 10th step with a lighter physics term (a few seconds of training cannot
# settle the full-weight reconstruction loss), the hybrid runs fewer NNLS iterations.
OPTIONS = {"blochnet": {"decoder_batch": 32, "decoder_every": 10, "recon_weight": 0.1},
           "hybrid": {"nnls_iterations": 30}}


@pytest.fixture(scope="module")
def trained(seq60, data):
    train, _ = data
    out = {}
    for model in STEPS:
        est = create_estimator(model, seq60, SPACE, input="full", **OPTIONS.get(model, {}))
        # Light noise augmentation: a network never shown noise reads any deviation from the simulation (the
        # phantom's field offset, EPG truncation) as signal.
        est.fit(train.params, train.signals, config=FitConfig(steps=STEPS[model], batch_size=128, lr=2e-3,
                                                              snr=(100.0, 1000.0), val_every=100))
        out[model] = est
    return out


@pytest.mark.parametrize("model", list(STEPS))
def test_estimator_beats_mean_predictor(trained, data, model):
    train, test = data
    pred = trained[model].predict(test.signals)
    mae = _mae_unit(SPACE, pred, test.params)
    mean_pred = {n: np.full(len(test), float(np.median(train.params[:, i]))) for i, n in enumerate(SPACE.names)}
    mae_mean = _mae_unit(SPACE, mean_pred, test.params)
    # T1 and T2 (normalised log units): at most a third of the error of always predicting the training median.
    assert np.all(mae[:2] < mae_mean[:2] / 3), (model, mae, mae_mean)


@pytest.mark.parametrize("model", list(STEPS))
def test_save_load_roundtrip_is_identical(trained, data, model, tmp_path):
    _, test = data
    est = trained[model]
    path = est.save(tmp_path / f"{model}.safetensors")
    again = load_estimator(path)
    a, b = est.predict(test.signals[:64]), again.predict(test.signals[:64])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert again.train_info["steps"] == STEPS[model]


def test_inn_inverse_of_forward_is_identity():
    torch.manual_seed(0)
    inn = INN(dim=37, blocks=2, hidden=128)
    for p in inn.parameters():  # away from the near-identity initialisation
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(256, 37)
    with torch.no_grad():
        y = inn(x)
        assert float((y - x).abs().max()) > 1.0  # it does transform
        assert float((inn.inverse(y) - x).abs().max()) < 1e-5
        assert float((inn(inn.inverse(x)) - x).abs().max()) < 1e-5


def test_inn_forward_resimulates_fingerprints(trained, data):
    """The INN's forward pass re-simulates the fingerprint of its estimate: its consistency residual is far
    smaller for the voxel's own estimate than for another voxel's, and the EPG re-simulation agrees."""
    _, test = data
    est = trained["inn"]
    x = test.signals[:200]
    pred = est.predict(x)
    res, _ = est.consistency(x, pred)
    shuffled = {k: np.roll(v, 37) for k, v in pred.items()}
    res_wrong, _ = est.consistency(x, shuffled)
    epg_res, _ = Estimator.consistency(est, x, pred)  # the EPG re-simulation residual
    assert np.median(res) < 0.5 * np.median(res_wrong), (np.median(res), np.median(res_wrong))
    assert np.median(epg_res) < 0.15, np.median(epg_res)


def test_nnls_matches_scipy():
    from scipy.optimize import nnls as scipy_nnls

    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 50))
    y = rng.standard_normal((8, 30))
    w = nnls(torch.as_tensor(a), torch.as_tensor(y), iterations=3000).numpy()
    assert (w >= 0).all()
    for i in range(8):
        ref, _ = scipy_nnls(a, y[i])
        obj = lambda v: np.sum((a @ v - y[i]) ** 2)  # noqa: E731
        assert obj(w[i]) <= obj(ref) * (1 + 1e-4) + 1e-8


def test_mle_recovers_ivim_within_one_percent_at_high_snr():
    b = torch.tensor([0, 10, 20, 30, 50, 80, 100, 200, 400, 800], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    n = 200
    lo = torch.tensor([0.8, 0.1, 0.4e-3, 10e-3], dtype=torch.float64)
    hi = torch.tensor([1.2, 0.5, 3.0e-3, 150e-3], dtype=torch.float64)
    truth = lo + (hi - lo) * (0.15 + 0.7 * torch.rand(n, 4, generator=g, dtype=torch.float64))
    model = lambda t: ivim_signal(b, t[:, 0], t[:, 1], t[:, 2], t[:, 3])  # noqa: E731
    clean = model(truth)
    sigma = 1e-4  # SNR 10^4 at S0 = 1
    init = truth * (1 + 0.2 * (2 * torch.rand(n, 4, generator=g, dtype=torch.float64) - 1))
    for noise in ("gaussian", "rician"):
        y = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
        if noise == "rician":
            y = torch.sqrt(y**2 + (sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)) ** 2)
        res = fit_mle(lambda t: model(t.double()), y, lo, hi, init, noise=noise, sigma=sigma, steps=800, lr=0.05)
        rel = ((res.params - truth) / truth).abs()
        assert float(torch.quantile(rel, 0.9, dim=0).max()) < 0.01, (noise, torch.quantile(rel, 0.9, dim=0))


def test_mle_estimator_recovers_mrf_parameters(seq60, data):
    _, test = data
    x = add_noise(test.signals[:40], 2000.0, torch.Generator().manual_seed(3))
    est = create_estimator("mle", seq60, SPACE, input="full", steps=150)
    pred = est.predict(x)
    rel = np.abs(np.stack([pred[n] for n in SPACE.names], 1) / test.params[:40].numpy() - 1)
    assert np.median(rel[:, :2], axis=0).max() < 0.01, np.median(rel, axis=0)
    with pytest.raises(ValueError, match="nothing to train"):
        est.fit(test.params, test.signals)


def test_mle_labels_are_fitted_from_the_noisy_samples(seq60, data):
    _, test = data
    x = add_noise(test.signals[:32], 50.0, torch.Generator().manual_seed(1))
    res = mle_for_space(seq60, SPACE, x, test.params[:32], steps=60)
    assert res.params.shape == (32, 3)
    # Noisy data: the MLE moves off the ground truth it started from, and fits the data at least as well.
    assert float((res.params - test.params[:32]).abs().max()) > 0


def test_labels_and_loss_weights():
    gt = torch.zeros(4, 2)
    mle = torch.ones(4, 2)
    pred = torch.full((4, 2), 0.25)
    assert float(label_loss(pred, gt, mle, 0.0, None)) == pytest.approx(0.0625)
    assert float(label_loss(pred, gt, mle, 1.0, None)) == pytest.approx(0.5625)
    assert float(label_loss(pred, gt, mle, 0.5, None)) == pytest.approx(0.3125)
    w = parse_weights("b=3", ("a", "b"))
    assert w.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_weights("c=1", ("a", "b"))
    with pytest.raises(ValueError, match="need the MLE"):
        TrainingLabels("mle", gt)


def test_bad_inputs_raise_clear_errors(trained, seq60):
    est = trained["fc"]
    with pytest.raises(ValueError, match="expects 60 frames"):
        est.predict(torch.zeros(3, 59, dtype=torch.complex64))
    with pytest.raises(ValueError, match="magnitude"):
        est.predict(torch.zeros(3, 60))
    with pytest.raises(ValueError, match="NaN"):
        est.predict(torch.full((3, 60), float("nan"), dtype=torch.complex64))
    with pytest.raises(ValueError, match="unknown estimator"):
        create_estimator("svm", seq60, SPACE)


def test_estimators_run_inside_mrf_maps_from_images(trained, seq60, tmp_path):
    from pipelines.definitions import get_pipeline
    from pipelines.sim.acquisition import fingerprint_images
    from pipelines.sim.phantoms import make_phantom
    from pipelines.types import Geometry, ImageStudy, StudyInfo

    phantom = make_phantom("brain", 16)
    x = fingerprint_images(phantom, seq60)
    study = ImageStudy(pixels=x[:, None].astype(np.complex64), geometry=Geometry.centred((16, 16), (240.0, 240.0)),
                       study=StudyInfo(), flip_angles_deg=seq60.flip_angles_deg, tr_ms=seq60.tr_ms,
                       te_ms=seq60.te_ms, ti_ms=seq60.ti_ms, is_magnitude=False)
    pipe = get_pipeline("mrf_maps_from_images")
    wm = phantom.labels == next(k for k, v in phantom.label_names.items() if v == "white_matter")
    for model in ("fc", "inn", "hybrid"):
        path = trained[model].save(tmp_path / f"{model}.safetensors")
        maps = {m.kind: m for m in pipe(study, {"estimator": model, "estimator_weights": str(path), "model": "single"})}
        assert set(maps) == {"t1", "t2", "pd", "b1", "residual"}, model
        t1 = maps["t1"].data[0][wm]
        rel = np.median(np.abs(t1 / phantom.t1_water_ms[wm] - 1))
        assert rel < 0.15, (model, rel)
        # Percent. The INN's residual is its own learned forward process, which seconds of training leave coarse.
        assert np.median(maps["residual"].data[0][wm]) < (60 if model == "inn" else 15), model
        pd = maps["pd"].data[0]
        assert pd[wm].min() > 0.2 and pd.max() <= 1.5
    with pytest.raises(ValueError, match="trained on schedule"):
        other = MRFSequence("other", seq60.flip_angles_deg * 0.9, seq60.tr_ms, seq60.te_ms, ti_ms=seq60.ti_ms)
        study.flip_angles_deg = other.flip_angles_deg
        pipe(study, {"estimator": "fc", "estimator_weights": str(tmp_path / "fc.safetensors")})


SHIPPED = [(m, s) for m in ("fc", "inn", "blochnet", "hybrid") for s in ("fisp", "t1ff")]


@pytest.mark.parametrize("model,seq_name", SHIPPED)
def test_shipped_weights_estimate_their_sequence(model, seq_name):
    from pipelines.mapping.estimators.select import shipped_estimator_path

    seq = fisp_sequence() if seq_name == "fisp" else t1ff_sequence()
    try:
        path = shipped_estimator_path(model, seq)
    except ValueError:
        pytest.skip(f"no shipped {model} weights for {seq_name}")
    est = load_estimator(path)
    rng = np.random.default_rng(123)
    p = est.space.sample(300, rng)
    x = add_noise(simulate(seq, est.space, p), 100.0, torch.Generator().manual_seed(0))
    pred = est.predict(x)
    mae = _mae_unit(est.space, pred, p)
    # Against the mean predictor (MAE 0.25 in normalised units for a uniform parameter): every shipped model
    # gets T1 (and FF for t1ff) to a small fraction of that.
    i_t1 = est.space.names.index("t1_ms")
    assert mae[i_t1] < 0.08, (model, seq_name, dict(zip(est.space.names, mae)))
    if "ff" in est.space.names:
        assert mae[est.space.names.index("ff")] < 0.05
