"""Shared pieces of network training: image metrics, the loop (checkpoint / resume), weights files, anatomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from pipelines.recon.training import TrainConfig, psnr, ssim, ssim_l1_loss, train
from pipelines.sim.anatomy import heldout_image, heldout_seeds, random_coil_maps, random_image
from pipelines.weights_io import load_weights, resolve_weights, save_weights


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 7) -> float:
    """Wang et al. 2004 with a uniform window and unbiased variances (skimage's defaults), valid region only."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    f = lambda a: uniform_filter(a, size=win)  # noqa: E731
    n = win * win
    ux, uy = f(x), f(y)
    vx = n / (n - 1) * (f(x * x) - ux * ux)
    vy = n / (n - 1) * (f(y * y) - uy * uy)
    vxy = n / (n - 1) * (f(x * y) - ux * uy)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    h = win // 2
    return float(s[h:-h, h:-h].mean())


def test_ssim_and_psnr_match_references() -> None:
    rng = np.random.default_rng(0)
    x = np.abs(random_image(rng, 64)).astype(np.float64)
    y = x + 0.05 * rng.standard_normal(x.shape)
    got = float(ssim(torch.from_numpy(y), torch.from_numpy(x))[0])
    assert got == pytest.approx(_ssim_reference(y, x, float(x.max())), abs=1e-5)
    assert float(ssim(torch.from_numpy(x), torch.from_numpy(x))[0]) == pytest.approx(1.0, abs=1e-6)
    mse = float(np.mean((y - x) ** 2))
    assert float(psnr(torch.from_numpy(y), torch.from_numpy(x))[0]) == pytest.approx(
        10 * np.log10(x.max() ** 2 / mse), abs=1e-3)


def test_loss_is_scale_invariant_and_zero_at_target() -> None:
    x = torch.from_numpy(np.abs(random_image(np.random.default_rng(1), 48)))[None]
    noisy = x + 0.1 * torch.randn_like(x)
    assert float(ssim_l1_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(ssim_l1_loss(1000 * noisy, 1000 * x)) == pytest.approx(float(ssim_l1_loss(noisy, x)), rel=1e-4)


def test_train_resumes_from_checkpoint_exactly(tmp_path) -> None:
    """A run stopped at step 6 and resumed to 12 ends with the same weights as an uninterrupted run."""
    target = torch.from_numpy(np.abs(heldout_image(0, 24)))

    def sample(rng: np.random.Generator, b: int) -> torch.Tensor:
        return target[None] + 0.05 * torch.from_numpy(rng.standard_normal((b, 24, 24))).float()

    def run(model: torch.nn.Module, batch: torch.Tensor, device: torch.device):
        pred = model(batch[:, None].to(device))[:, 0]
        return pred, target.expand_as(pred).to(device)

    def net() -> torch.nn.Module:
        conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        torch.nn.init.zeros_(conv.weight)  # starts at PSNR 0 dB: learning is visible in 12 steps
        torch.nn.init.zeros_(conv.bias)
        return conv

    val = [sample(np.random.default_rng(9), 2)]
    full = net()
    cfg = dict(batch_size=2, lr=1e-2, val_every=3, checkpoint_every=3, device="cpu", progress=False)
    res = train(full, sample, run, val, TrainConfig(steps=12, out_dir=tmp_path / "a", **cfg), log=lambda s: None)
    part = net()
    train(part, sample, run, val, TrainConfig(steps=6, out_dir=tmp_path / "b", **cfg), log=lambda s: None)
    resumed = net()
    res2 = train(resumed, sample, run, val, TrainConfig(steps=12, out_dir=tmp_path / "b", resume=True, **cfg),
                 log=lambda s: None)
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)
    assert res2.val_psnr == pytest.approx(res.val_psnr, abs=1e-4)
    assert res.history[-1]["psnr"] > res.history[0]["psnr"]  # it learned something
    assert (tmp_path / "a" / "history.json").is_file()


def test_time_limit_stops_validates_and_checkpoints(tmp_path) -> None:
    """A run given a time budget stops inside it, validates and checkpoints its last step, and a cosine schedule
    has decayed the learning rate by then (a lease that ends mid-run still yields usable weights)."""
    import time

    target = torch.from_numpy(np.abs(heldout_image(0, 24)))

    def sample(rng: np.random.Generator, b: int) -> torch.Tensor:
        time.sleep(0.05)  # a step costs ~50 ms: 0.5 s of budget is ~10 steps of the 1000 asked for
        return target[None] + 0.05 * torch.from_numpy(rng.standard_normal((b, 24, 24))).float()

    model = torch.nn.Conv2d(1, 1, 3, padding=1)

    def run(m: torch.nn.Module, batch: torch.Tensor, device: torch.device):
        pred = m(batch[:, None].to(device))[:, 0]
        return pred, target.expand_as(pred).to(device)

    # The optimiser is the loop's own: its steps record the learning rate the schedule set.
    lrs_seen: list[float] = []
    orig_step = torch.optim.Adam.step

    def step(self, *a, **k):  # type: ignore[no-untyped-def]
        lrs_seen.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    torch.optim.Adam.step = step  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        res = train(model, sample, run, [sample(np.random.default_rng(9), 2)],
                    TrainConfig(steps=1000, batch_size=2, lr=1e-2, optimizer="adam", val_every=500,
                                checkpoint_every=500, device="cpu", progress=False, time_limit_s=0.5,
                                schedule="cosine", out_dir=tmp_path),
                    log=lambda s: None)
        wall = time.perf_counter() - t0
    finally:
        torch.optim.Adam.step = orig_step  # type: ignore[method-assign]
    assert 1 <= res.steps < 1000 and wall < 5.0, (res.steps, wall)
    assert res.history and res.history[-1]["step"] == res.steps  # validated at the step it stopped
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == res.steps
    assert lrs_seen[0] > 0.9e-2 and lrs_seen[-1] < 0.5 * lrs_seen[0], lrs_seen  # cosine over the time budget
    with pytest.raises(ValueError, match="schedule"):
        train(model, sample, run, [], TrainConfig(steps=1, schedule="linear", device="cpu", progress=False,
                                                  out_dir=tmp_path / "x"), log=lambda s: None)


def test_weights_round_trip_and_errors(tmp_path) -> None:
    t = {"w": torch.randn(4, 3), "n": torch.arange(3)}
    p = save_weights(tmp_path / "m.safetensors", t, {"n_iter": 3, "name": "x"})
    back, meta = load_weights(p)
    torch.testing.assert_close(back["w"], t["w"])
    assert meta["n_iter"] == 3 and meta["stored_dtype"] == "float32"
    back16, _ = load_weights(save_weights(tmp_path / "h.safetensors", t, {}, half=True))
    assert back16["w"].dtype == torch.float32
    assert float((back16["w"] - t["w"]).abs().max()) < 2e-3
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="no shipped weights named 'nope'"):
        resolve_weights("", "nope")


def test_anatomy_heldout_is_disjoint_and_reproducible() -> None:
    a, b = heldout_image(3, 32), heldout_image(3, 32)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() == pytest.approx(1.0)
    rng = np.random.default_rng(5)
    drawn = rng.integers(0, heldout_seeds(1)[0], size=1000)
    assert drawn.max() < heldout_seeds(1)[0]
    maps = random_coil_maps(rng, 32, 6)
    np.testing.assert_allclose(np.sqrt((np.abs(maps) ** 2).sum(0)), 1.0, atol=1e-5)
