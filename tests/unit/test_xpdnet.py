"""XPDNet: Haar pooling, MWCNN sizes against the reference, operator wiring, overfitting, shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.recon.mwcnn import MWCNN, dwt, iwt, parameter_count
from pipelines.recon.operators import CartesianSense, SenseChannels, SubspaceChannels
from pipelines.recon.subspace import CartesianSubspace
from pipelines.recon.train_xpdnet import simulate_slice
from pipelines.recon.xpdnet import (XPDNet, XPDNetConfig, central_kspace_maps, load_xpdnet, low_freq_percent,
                                    save_xpdnet)
from pipelines.sim.anatomy import heldout_image, random_coil_maps

RNG = np.random.default_rng(3)


def crandn(*shape: int) -> torch.Tensor:
    return torch.from_numpy((RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex64))


def inner(a: torch.Tensor, b: torch.Tensor) -> complex:
    return complex((a.conj().to(torch.complex128) * b.to(torch.complex128)).sum())


def psnr(x: np.ndarray, t: np.ndarray) -> float:
    """PSNR after a least-squares scale (as benchmarks/xpdnet_eval.py): a zero-filled image is ~1/R too dark."""
    x = x * (x * t).sum() / max(float((x * x).sum()), 1e-30)
    return float(10 * np.log10(t.max() ** 2 / ((x - t) ** 2).mean()))


def sense_op(n: int = 32, coils: int = 4, r: int = 4) -> tuple[CartesianSense, torch.Tensor]:
    maps = random_coil_maps(np.random.default_rng(0), n, coils)
    mask = np.zeros((n, n), np.float32)
    mask[::r] = 1
    mask[n // 2 - 3: n // 2 + 3] = 1
    return CartesianSense(maps[None], mask), torch.from_numpy(mask)


def subspace_op(n: int = 32, coils: int = 3, rank: int = 3, frames: int = 12) -> CartesianSubspace:
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((frames, rank)) + 1j * rng.standard_normal((frames, rank)))
    line = np.concatenate([np.arange(f % 4, n, 4) for f in range(frames)])
    frame = np.concatenate([np.full(len(range(f % 4, n, 4)), f) for f in range(frames)])
    return CartesianSubspace(random_coil_maps(rng, n, coils), line, frame, basis.astype(np.complex64))


# ---- building blocks -----------------------------------------------------------------------------------------
def test_haar_pooling_is_orthonormal_and_inverted():
    x = torch.randn(2, 3, 16, 12)
    c = dwt(x)
    assert c.shape == (2, 12, 8, 6)
    assert torch.allclose(iwt(c), x, atol=1e-6)
    assert abs(float(c.norm()) - float(x.norm())) < 1e-4 * float(x.norm())
    ones = dwt(torch.ones(1, 1, 4, 4))  # a constant has only an LL band, of value 2 (= 4 pixels x 1/2)
    assert torch.allclose(ones[:, 0], torch.full((1, 2, 2), 2.0)) and float(ones[:, 1:].abs().max()) == 0


@pytest.mark.parametrize("size, expected", [("small", 0.34e6), ("medium", 6.2e6), ("big", 24.9e6)])
def test_mwcnn_parameter_counts_match_reference(size, expected):
    # n_primal = 5: input [buffer, residual] = 6 complex = 12 real channels, output 5 complex = 10 real
    n = parameter_count(MWCNN(12, 10, size))
    assert abs(n - expected) / expected < 0.01, n


def test_xpdnet_iteration_holds_one_mwcnn_each():
    net = XPDNet(n_iter=3, size="small", refine_smaps=True)
    per_iter = [parameter_count(m) for m in net.image_nets]
    assert per_iter == [338122] * 3  # 0.34 M per iteration, no weight sharing
    assert 0 < parameter_count(net.refiner) < 10_000  # the 4/8/16-channel map refiner is tiny


def test_central_kspace_maps_are_rss_normalised_and_sized_as_reference():
    assert low_freq_percent(4) == 8 and low_freq_percent(8) == 4
    n, c = 48, 6
    maps = random_coil_maps(np.random.default_rng(2), n, c)
    from pipelines.recon.operators import fft2c
    k = fft2c(torch.from_numpy(maps * heldout_image(0, n)))[None]
    est = central_kspace_maps(k, 8)
    rss = est.abs().pow(2).sum(1).sqrt()
    assert est.shape == (1, c, n, n) and est.dtype == torch.complex64
    assert torch.allclose(rss[rss > 0.5], torch.ones(()), atol=1e-5)
    # relative coil profiles match the truth inside the object (up to the image phase): corr > 0.9
    obj = np.abs(heldout_image(0, n)) > 0.2
    a = est[0].abs().numpy()[:, obj].ravel()
    b = np.abs(maps)[:, obj].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9


# ---- shapes, dtypes, operators ----------------------------------------------------------------------------------
def test_shapes_and_dtypes_cartesian_any_size():
    net = XPDNet(n_iter=2)
    for ny, nx in ((32, 32), (30, 34)):  # non-multiples of 4 are padded inside
        y = crandn(2, 3, ny, nx)
        mask = torch.zeros(2, ny, nx)
        mask[:, ::4] = 1
        mask[:, ny // 2 - 2: ny // 2 + 2] = 1
        y = y * mask[:, None]
        with torch.no_grad():
            mag, cplx = net(y, mask), net.cartesian_complex(y, mask)
        assert mag.shape == (2, ny, nx) and mag.dtype == torch.float32
        assert cplx.shape == (2, ny, nx) and cplx.dtype == torch.complex64
        assert torch.isfinite(mag).all()


def test_channel_operators_are_adjoint():
    op, _ = sense_op()
    sc = SenseChannels(op)
    x, y = crandn(2, 1, 32, 32), crandn(2, 4, 32, 32) * op.mask
    lhs, rhs = inner(sc.forward(x), y), inner(x, sc.adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    ss = SubspaceChannels(subspace_op())
    xs = crandn(1, 3, 32, 32)
    ys = crandn(1, *ss.ops[0].forward(xs[0]).shape)
    lhs, rhs = inner(ss.forward(xs), ys), inner(xs, ss.adjoint(ys))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


class _Landweber(torch.nn.Module):
    """Stand-in image net: buffer[0] - step * residual, i.e. one gradient step on ||A x - y||^2 / 2."""

    def __init__(self, ch: int, step: float) -> None:
        super().__init__()
        self.ch, self.step = ch, step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.ch] - self.step * x[:, self.ch: 2 * self.ch]


@pytest.mark.parametrize("kind", ["sense", "subspace"])
def test_network_wiring_is_gradient_descent_with_a_gradient_step_denoiser(kind):
    """With n_primal = 1 and each image net replaced by a gradient step, XPDNet must reproduce Landweber
    iterations computed independently from the operator: the residual A x - y, its adjoint, the buffer order
    and the update are all wired as in Algorithm 1."""
    if kind == "sense":
        op, _ = sense_op()
        ch, fwd, adj = 1, (lambda v: op.forward(v[:, 0])), (lambda k: op.adjoint(k)[:, None])
        truth = torch.from_numpy(heldout_image(1, 32))[None, None]
    else:
        op = subspace_op()
        ch, fwd, adj = 3, (lambda v: op.forward(v[0])[None]), (lambda k: op.adjoint(k[0])[None])
        truth = crandn(1, 3, 32, 32)
    y = fwd(truth)
    net = XPDNet(XPDNetConfig(n_iter=6, n_primal=1, n_channels=ch, refine_smaps=False))
    net.image_nets = torch.nn.ModuleList([_Landweber(ch, 0.5) for _ in range(6)])
    out = net.unroll(op, y)
    x = adj(y)
    for _ in range(6):
        x = x - 0.5 * adj(fwd(x) - y)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-5 * float(x.abs().max()))
    r0, r6 = float((fwd(adj(y)) - y).norm()), float((fwd(out) - y).norm())
    assert r6 < 0.9 * r0, (r6, r0)  # and it did reduce the data residual


def test_subspace_network_runs_on_coefficient_channels():
    op = subspace_op()
    net = XPDNet(n_iter=2, n_channels=3, refine_smaps=False)
    y = op.forward(crandn(3, 32, 32))[None]
    with torch.no_grad():
        out = net.reconstruct(op, y)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.complex64 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="built for 1 image channel"):
        XPDNet(n_iter=1, refine_smaps=False).unroll(op, y)


def test_scaling_is_undone_at_the_output():
    """Data in any unit: the reconstruction of c * y is c times that of y (the 1e6 of the reference, automatic)."""
    torch.manual_seed(0)
    net = XPDNet(n_iter=2).eval()
    rng = np.random.default_rng(5)
    y, m = simulate_slice(rng, heldout_image(2, 32), 4, 4, "equidistant", 0.01)
    y, m = torch.from_numpy(y[None]), torch.from_numpy(m[None])
    with torch.no_grad():
        a, b = net(y, m), net(1e6 * y, m)
    assert torch.allclose(b / 1e6, a, rtol=1e-3, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    y, mask = crandn(1, 3, 16, 16), torch.ones(1, 16, 16)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = XPDNet(n_iter=2, checkpoint=ckpt).train()
        net(y, mask).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# ---- learning, weights ------------------------------------------------------------------------------------------
def test_tiny_network_overfits_one_slice():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    img = heldout_image(0, 24)
    y, m = simulate_slice(rng, img, 4, 4, "equidistant", 0.0)
    y, m, t = torch.from_numpy(y[None]), torch.from_numpy(m[None]), torch.from_numpy(np.abs(img)[None])
    net = XPDNet(n_iter=1, refine_smaps=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(100):
        loss = ((net(y, m) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] / min(losses[-5:]) > 10, (losses[0], losses[-5:])  # measured ~1000x in 100 steps (~4 s, 1 thread)


def test_weights_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    net = XPDNet(n_iter=2).eval()
    path = save_xpdnet(net, tmp_path / "w.safetensors", {"note": "test"}, half=False)
    back = load_xpdnet(path)
    assert back.config == XPDNetConfig(n_iter=2)
    y, mask = crandn(1, 3, 32, 32), torch.ones(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(y, mask), back(y, mask))
    with pytest.raises(FileNotFoundError):
        load_xpdnet(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="safetensors"):
        load_xpdnet(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def heldout_slices():
    """Two held-out 96x96 slices (R = 4 equidistant, R = 8 random), 8 coils, 2 % noise, as the benchmark."""
    rng = np.random.default_rng(77)
    out = []
    for i, (r, kind) in enumerate(((4, "equidistant"), (8, "random"))):
        img = heldout_image(20 + i, 96)
        y, m = simulate_slice(rng, img, 8, r, kind, 0.02)
        out.append((torch.from_numpy(y[None]), torch.from_numpy(m[None]), np.abs(img)))
    return out


def test_shipped_weights_beat_zero_filled_and_an_untrained_net(heldout_slices):
    shipped = load_xpdnet()
    assert shipped.config.size == "small" and shipped.config.n_channels == 1
    torch.manual_seed(0)
    untrained = XPDNet(XPDNetConfig(**{**shipped.config.__dict__})).eval()
    for y, m, truth in heldout_slices:
        with torch.no_grad():
            zero_filled = shipped.cartesian_operator(y, m).adjoint(y)[0].abs().numpy()  # its own refined maps
            ours = shipped(y, m)[0].numpy()
        assert psnr(ours, truth) >= psnr(zero_filled, truth) + 3, (psnr(ours, truth), psnr(zero_filled, truth))
    with torch.no_grad():  # the R = 8 slice: what training added over the same architecture at initialisation
        theirs = untrained(y, m)[0].numpy()
    assert psnr(ours, truth) >= psnr(theirs, truth) + 3, (psnr(ours, truth), psnr(theirs, truth))


# ---- pipeline and CLI ---------------------------------------------------------------------------------------------
def _raw_file(tmp_path, y: torch.Tensor, mask: torch.Tensor):
    """An ISMRMRD file holding the sampled lines of one slice (the simulator's writer, one repetition)."""
    import dataclasses

    from conftest_sim import make_study

    from pipelines.sim.mrd_writer import write_ismrmrd

    k = y[0].numpy()  # [C, n, n]
    rows = np.flatnonzero(mask[0].numpy()[:, 0] > 0)
    study = make_study("cartesian", n_frames=1, n_readouts=rows.size, n_coils=k.shape[0], matrix=k.shape[-1])
    study = dataclasses.replace(study, kspace=k[:, rows, :].transpose(1, 0, 2)[None].astype(np.complex64),
                                lines=rows[None].astype(np.int32), acceleration=k.shape[-2] / rows.size)
    return write_ismrmrd(study, tmp_path / "raw.h5")


def test_cli_process_cartesian_recon_xpdnet(heldout_slices, tmp_path):
    from node.cli import main

    y, m, truth = heldout_slices[1]  # R = 8
    raw = _raw_file(tmp_path, y, m)
    got = {}
    for recon in ("xpdnet", "adjoint"):
        out = tmp_path / recon
        rc = main(["process", str(raw), "--pipeline", "cartesian_recon", "--set", f"recon={recon}",
                   "--out", str(out), "--no-dicom", "--quiet"])
        assert rc == 0
        got[recon] = np.load(out / "images.npz")["image"]
    assert got["xpdnet"].shape == (1, 96, 96) and got["xpdnet"].dtype == np.float32
    assert psnr(got["xpdnet"][0], truth) >= psnr(got["adjoint"][0], truth) + 3


def test_pipeline_site_weights_and_errors(heldout_slices, tmp_path):
    from pipelines.io.mrd_reader import raw_study_from_hdf5
    from pipelines.definitions import get_pipeline

    y, m, truth = heldout_slices[0]
    raw = raw_study_from_hdf5(_raw_file(tmp_path, y, m))
    spec = get_pipeline("cartesian_recon")
    shipped = spec(raw, {"recon": "xpdnet"})[0].data[0]
    site = tmp_path / "site.safetensors"
    save_xpdnet(load_xpdnet(), site, {"note": "a site's copy"}, half=False)
    assert np.allclose(spec(raw, {"recon": "xpdnet", "weights": str(site)})[0].data[0], shipped, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        spec(raw, {"recon": "xpdnet", "weights": str(tmp_path / "none.safetensors")})
    with pytest.raises(ValueError, match="not one of"):
        spec(raw, {"recon": "xpdnt"})
