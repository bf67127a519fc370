"""NC-PDNet: the density-compensated unrolled primal network for non-Cartesian MRI (Ramzi et al., IEEE TMI 2022).

Algorithm (the reference ``fastmri_recon/models/subclassed_models/ncpdnet.py`` with ``CrossDomainNet``):

    x0 = A^H D y                                  (density-compensated adjoint, D = Pipe-Menon weights)
    buf = [x0] * n_primal                         (the primal buffer of Adler & Oktem's learned primal-dual)
    for i in range(n_iter):
        r = A^H D (A buf[0] - y)                  (the "measurements residual"; no learned dual net)
        buf = buf + CNN_i(concat(buf, r))         (3 convolutions, 32 filters, ReLU, real/imag as channels)
    output buf[0]                                 (|buf[0]| for anatomical images)

The density compensation is what makes the unrolled residual well-scaled for radial and spiral sampling: D is
computed once per trajectory (no gradient through it) and normalised so mean |A^H D A 1| = 1
(:func:`pipelines.recon.dcf.pipe_menon_dcf`).

The residual is computed either with the Toeplitz normal operator, ``A^H D A buf[0] - A^H D y`` (one FFT pair
on the 2x grid per coil, ``A^H D y`` computed once), or with the explicit NUFFT pair; both are the same linear
map. Toeplitz is the default because it is faster at every size we measured (see ``benchmarks/ncpdnet_eval.py``
and the model cards).

Channels: the network acts on complex buffers [B, n_ch, n_primal, ny, nx] through the channel view of
:mod:`pipelines.recon.operators`. Anatomical images have one channel; MRF subspace reconstruction has the K
coefficient images as channels, coupled by the subspace normal operator
(:class:`pipelines.recon.subspace.NonCartesianSubspace`), and the CNN sees all K channels of the buffer at once
(for n_ch = 1 the layer sizes are exactly the reference's: 12 -> 32 -> 32 -> 10, 15.6 k parameters per
iteration).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.recon.operators import (
    ChannelOperator,
    NonCartesianSense,
    Operator,
    SenseChannels,
    SubspaceChannels,
    channel_operator,
)
from pipelines.recon.subspace import NonCartesianSubspace


def with_maps(op: NonCartesianSubspace, maps: torch.Tensor) -> NonCartesianSubspace:
    """A copy of ``op`` with other coil maps, sharing its NUFFT plans and Toeplitz kernels.

    The K x K kernels depend only on the trajectory, the basis and the DCF, so training samples that differ in
    their coils (or the slices of one study) need not recompute them.
    """
    op.kernels()
    new = copy.copy(op)
    new.maps = maps.to(op.device, torch.complex64)
    return new


@dataclass(frozen=True)
class NCPDNetConfig:
    n_channels: int = 1  # 1: anatomical image; K: MRF subspace coefficients
    n_iter: int = 10
    n_primal: int = 5
    n_filters: int = 32
    toeplitz: bool = True  # residual by the Toeplitz normal operator (else the explicit NUFFT pair)
    normalize: bool = True  # divide data by max |A^H D y| per example (scale-free input), undo at the end

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NCPDNetConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


class ComplexResCNN(nn.Module):
    """The per-iteration image net (reference ``CNNComplex(n_convs=3, res=True)``): complex channels as
    real/imaginary pairs, 3 convolutions with ReLU between, output added to the buffer."""

    def __init__(self, n_channels: int, n_primal: int, n_filters: int) -> None:
        super().__init__()
        self.n_channels, self.n_primal = n_channels, n_primal
        c_in, c_out = 2 * n_channels * (n_primal + 1), 2 * n_channels * n_primal
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, n_filters, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_filters, n_filters, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_filters, c_out, 3, padding=1),
        )
        for m in self.convs:
            if isinstance(m, nn.Conv2d):  # Keras defaults, as the reference: Glorot uniform, zero bias
                nn.init.xavier_uniform_(m.weight)
                assert m.bias is not None  # every Conv2d above keeps its default bias=True
                nn.init.zeros_(m.bias)

    def forward(self, buf: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """buf [B, n_ch, P, ny, nx] complex, residual [B, n_ch, ny, nx] complex -> updated buffer."""
        b, c, p, ny, nx = buf.shape
        z = torch.cat([buf, residual[:, :, None]], dim=2)  # [B, n_ch, P+1, ny, nx]
        z = torch.cat([z.real, z.imag], dim=2).reshape(b, 2 * c * (p + 1), ny, nx)
        out = self.convs(z).reshape(b, c, 2, p, ny, nx)
        return buf + torch.complex(out[:, :, 0], out[:, :, 1])


class NCPDNet(nn.Module):
    """NC-PDNet over any density-compensated operator, in its channel view
    (:func:`pipelines.recon.operators.channel_operator`); ``forward(op, y)`` returns complex buf[0]
    [B, n_ch, ny, nx]."""

    def __init__(self, config: NCPDNetConfig = NCPDNetConfig()) -> None:
        super().__init__()
        if config.n_channels < 1 or config.n_iter < 1 or config.n_primal < 1 or config.n_filters < 1:
            raise ValueError(f"NC-PDNet sizes must all be >= 1, got {config}")
        self.config = config
        self.image_nets = nn.ModuleList(
            ComplexResCNN(config.n_channels, config.n_primal, config.n_filters) for _ in range(config.n_iter)
        )

    def forward(
        self, op: Operator | ChannelOperator, y: torch.Tensor | None, rhs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``rhs``: A^H D y when the caller has it (training data made by CPU workers, so that the GPU needs no
        NUFFT); the Toeplitz residual then never reads ``y``."""
        cfg = self.config
        op = channel_operator(op)
        if op.n_channels != cfg.n_channels:
            raise ValueError(
                f"operator has {op.n_channels} image channel(s), the network was built for {cfg.n_channels}"
            )
        if not op.density_compensated:
            raise ValueError(
                "NC-PDNet needs a density-compensated operator (NonCartesianSense(..., dcf=...), "
                "NonCartesianSubspace(..., dcf=...))"
            )
        if rhs is None:
            if y is None:
                raise ValueError("NC-PDNet needs the data y or their density-compensated adjoint rhs")
            rhs = op.adjoint(y, dcf=True)  # A^H D y [B, n_ch, ny, nx]
        elif y is None and not cfg.toeplitz:
            raise ValueError("the explicit residual (toeplitz=False) reads the data y, not only their adjoint")
        scale = torch.ones(rhs.shape[0], 1, 1, 1, device=rhs.device)
        if cfg.normalize:
            scale = rhs.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12).detach()
        rhs = rhs / scale
        y_s = None if y is None else y / scale.reshape(-1, *([1] * (y.ndim - 1)))
        buf = rhs[:, :, None].expand(-1, -1, cfg.n_primal, -1, -1).contiguous()
        for net in self.image_nets:
            x = buf[:, :, 0]
            if cfg.toeplitz:
                residual = op.normal(x) - rhs
            else:
                assert y_s is not None  # checked above: the explicit residual came with y
                residual = op.adjoint(op.forward(x) - y_s, dcf=True)
            buf = net(buf, residual)
        return buf[:, :, 0] * scale

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- weights -----------------------------------------------------------------------------------------------------
def save_ncpdnet(
    model: NCPDNet,
    path: str | Path,
    meta: dict[str, Any] | None = None,
    half: bool = False,
    basis: torch.Tensor | None = None,
) -> Path:
    """Weights + config (+ the MRF subspace basis [frames, K] the coefficients are expressed in)."""
    from pipelines.weights_io import save_weights

    tensors = dict(model.state_dict())
    if basis is not None:
        tensors["basis_real"] = basis.real.float().contiguous()
        tensors["basis_imag"] = basis.imag.float().contiguous()
    return save_weights(path, tensors, {"model": "ncpdnet", "config": asdict(model.config), **(meta or {})}, half=half)


def load_ncpdnet(
    path: str | Path, device: torch.device | str = "cpu", toeplitz: bool | None = None
) -> tuple[NCPDNet, dict[str, Any]]:
    """The network stored at ``path`` (eval mode) and its metadata; ``toeplitz`` overrides the residual mode.

    MRF weights carry their subspace basis: ``meta["basis"]`` (complex [frames, K] tensor) when present.
    """
    from pipelines.weights_io import load_weights

    tensors, meta = load_weights(path, device=device)
    if "basis_real" in tensors:
        meta["basis"] = torch.complex(tensors.pop("basis_real"), tensors.pop("basis_imag"))
    if meta.get("model") != "ncpdnet":
        raise ValueError(f"{path} holds {meta.get('model')!r} weights, not ncpdnet")
    cfg = NCPDNetConfig.from_dict(meta.get("config", {}))
    if toeplitz is not None:
        cfg = NCPDNetConfig(**{**asdict(cfg), "toeplitz": toeplitz})
    model = NCPDNet(cfg).to(device)
    model.load_state_dict(tensors)
    model.eval()
    return model, meta


# ---- pipeline entry points ---------------------------------------------------------------------------------------
SHIPPED_ANATOMY = "ncpdnet_anatomy"  # radial and spiral (one network trained on both; see its model card)
SHIPPED_MRF = "ncpdnet_mrf"
_CACHE: dict[tuple[str, str], tuple[NCPDNet, dict[str, Any]]] = {}


def cached_ncpdnet(weights: str, default: str, device: torch.device | str = "cpu") -> tuple[NCPDNet, dict[str, Any]]:
    """Load (once per process) a site's weights file, or the shipped ``default`` when ``weights`` is empty."""
    from pipelines.weights_io import resolve_weights

    path = resolve_weights(weights, default)
    key = (str(path.resolve()), str(device))
    if key not in _CACHE:
        _CACHE[key] = load_ncpdnet(path, device=device)
    return _CACHE[key]


def ncpdnet_noncartesian(op: NonCartesianSense, y: torch.Tensor, weights: str = "") -> torch.Tensor:
    """Complex images [B, ny, nx] of multi-coil radial / spiral data y [B, C, M] (the operator needs its DCF)."""
    model, meta = cached_ncpdnet(weights, SHIPPED_ANATOMY, op.device)
    if model.config.n_channels != 1:
        raise ValueError(
            f"weights {weights or SHIPPED_ANATOMY!r} were trained for {model.config.n_channels} MRF "
            "coefficient channels, not for anatomical images (use them with --pipeline mrf)"
        )
    with torch.no_grad():
        return model(SenseChannels(op), y)[:, 0]


def ncpdnet_subspace(op: NonCartesianSubspace, y: torch.Tensor, model: NCPDNet) -> torch.Tensor:
    """Coefficient images [K, ny, nx] of one MRF slice, y [C, M]; ``op`` must use the network's own basis."""
    if op.rank != model.config.n_channels:
        raise ValueError(f"subspace operator has rank {op.rank}, the network {model.config.n_channels} channels")
    with torch.no_grad():
        return model(SubspaceChannels([op]), y[None].to(op.device))[0]
