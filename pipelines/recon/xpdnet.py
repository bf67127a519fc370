"""XPDNet (Ramzi, Ciuciu, Starck; 2nd in the fastMRI 2020 brain challenge): unrolled cross-domain network.

Algorithm 1 of Ramzi's thesis and the TensorFlow reference (fastmri-reproducible-benchmark:
``subclassed_models/xpdnet.py``, ``cross_domain.py``, ``multiscale_complex.py``, ``utils/fourier.py``):

    buffer = [A^H y] * n_primal                                    (n_primal complex images)
    for i in 1..n_iter:
        r = A^H (A buffer[0] - y)                                  (k-space net = measurements residual)
        buffer = buffer + MWCNN_i([buffer, r] as real/imag channels)
    return |buffer[0]|

Every iteration has its own MWCNN (no weight sharing). For multi-coil data the sensitivity maps come from the
central k-space (``32 // R`` % of the lines and columns, as the reference's ``extract_smaps``), divided by
their root-sum-of-squares, refined by a small per-coil complex U-net (3 levels, 4/8/16 channels, leaky ReLU,
residual) and renormalised.

Operator-pluggable: :meth:`XPDNet.unroll` takes any operator in the channel view of
:mod:`pipelines.recon.operators` (complex buffers [B, n_ch, ny, nx]): Cartesian SENSE has one channel; the
Cartesian MRF subspace operator has its K coefficient images as channels of one slice. The network is built for
a fixed ``n_channels``.

k-space scaling: the reference multiplies fastMRI k-space by 1e6 so that images are O(1) for a network whose
output layer has a bias. Here every slice is divided by ``max |A^H y|`` before the network and the output is
multiplied back, so any data unit works (the simulator's images have max 1; scanners' are arbitrary).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipelines.recon.mwcnn import MWCNN, MWCNN_SIZES
from pipelines.recon.operators import CartesianSense, ChannelOperator, channel_operator, ifft2c


# ---- sensitivity maps ------------------------------------------------------------------------------------------
def low_freq_percent(acceleration: float) -> int:
    """The reference's calibration size: ``32 // R`` % of the k-space lines (8 % at R = 4, 4 % at R = 8)."""
    return max(1, 32 // max(1, int(round(acceleration))))


def central_kspace_maps(y: torch.Tensor, percent: int | list[int], min_lines: int = 8) -> torch.Tensor:
    """Maps [B, C, ny, nx] from the central ``percent`` % of ky and kx of y [B, C, ny, nx], RSS-normalised.

    ``min_lines``: the reference's percentages were set for fastMRI's 640 x 372 k-space (8 %: 51 x 29 lines);
    on a 96-line matrix 4 % would keep 2 lines, maps of no use, so at least ``min_lines`` are kept (the 8 %
    calibration block of a 96-line acquisition).
    """
    b, _, ny, nx = y.shape
    pcts = [percent] * b if isinstance(percent, int) else list(percent)
    if len(pcts) != b:
        raise ValueError(f"one calibration percentage per slice expected, got {len(pcts)} for {b} slices")
    low = torch.zeros_like(y)
    for i, p in enumerate(pcts):
        hy, hx = max(int(p * ny / 100), min_lines, 2) // 2, max(int(p * nx / 100), min_lines, 2) // 2
        low[i, :, ny // 2 - hy : ny // 2 + hy, nx // 2 - hx : nx // 2 + hx] = y[
            i, :, ny // 2 - hy : ny // 2 + hy, nx // 2 - hx : nx // 2 + hx
        ]
    return rss_normalise(ifft2c(low))


def rss_normalise(maps: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    rss = torch.sqrt((maps.abs() ** 2).sum(dim=1, keepdim=True))
    return maps / rss.clamp_min(floor * float(rss.max().detach()) + 1e-30)


def _complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.real, x.imag], dim=1)


def _channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[1] // 2
    return torch.complex(x[:, :n], x[:, n:])


def _pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pad) if ph or pw else x), pad


def _crop(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pad
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


class SensitivityRefiner(nn.Module):
    """The reference's smaps refiner: per-coil complex U-net, 3 levels of 4/8/16 channels, 2 convolutions per
    level with leaky ReLU (0.1), max pooling, nearest upsampling + 2x2 up-convolution, concatenated skips, two
    1x1 output convolutions, residual; the refined maps are renormalised to unit RSS."""

    def __init__(self, channels: tuple[int, ...] = (4, 8, 16)) -> None:
        super().__init__()
        self.levels = len(channels)

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.LeakyReLU(0.1),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.LeakyReLU(0.1),
            )

        self.down = nn.ModuleList()
        c_in = 2
        for c in channels:
            self.down.append(block(c_in, c))
            c_in = c
        # 2x2 "same" up-convolution as Keras pads it: one zero row/column after the image
        self.upconv = nn.ModuleList(
            [
                nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels[i + 1], channels[i], 2), nn.LeakyReLU(0.1))
                for i in range(self.levels - 1)
            ]
        )
        self.up = nn.ModuleList([block(2 * channels[i], channels[i]) for i in range(self.levels - 1)])
        self.out = nn.Sequential(nn.Conv2d(channels[0], 4, 1), nn.LeakyReLU(0.1), nn.Conv2d(4, 2, 1))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        b, c, ny, nx = maps.shape
        x, pad = _pad_to_multiple(_complex_to_channels(maps.reshape(b * c, 1, ny, nx)), 2 ** (self.levels - 1))
        skips = []
        h = x
        for i, blk in enumerate(self.down):
            h = blk(h)
            if i < self.levels - 1:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for i in range(self.levels - 2, -1, -1):
            h = self.upconv[i](F.interpolate(h, scale_factor=2, mode="nearest"))
            h = self.up[i](torch.cat([skips[i], h], dim=1))
        refined = _channels_to_complex(_crop(x + self.out(h), pad)).reshape(b, c, ny, nx)
        return rss_normalise(refined)


class ComplexMWCNN(nn.Module):
    """The reference's MultiscaleComplex around an MWCNN: complex channels -> (real, imag) -> MWCNN ->
    complex, zero-padded to a multiple of 2**n_scales, residual on the first ``n_out`` input channels."""

    def __init__(self, n_in: int, n_out: int, size: str) -> None:
        super().__init__()
        self.n_out = n_out
        self.net = MWCNN(2 * n_in, 2 * n_out, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, pad = _pad_to_multiple(_complex_to_channels(x), 2**self.net.n_scales)
        return x[:, : self.n_out] + _channels_to_complex(_crop(self.net(h), pad))


# ---- the network ----------------------------------------------------------------------------------------------
@dataclass
class XPDNetConfig:
    n_iter: int = 10  # the challenge used 25
    n_primal: int = 5
    size: str = "small"  # MWCNN size: small | medium | big
    n_channels: int = 1  # image channels per slice: 1 for SENSE, K for the MRF subspace
    refine_smaps: bool = True
    checkpoint: bool = False  # gradient checkpointing per iteration (training memory)
    min_calib_lines: int = 8  # floor on the central k-space block of the maps (see central_kspace_maps)

    def __post_init__(self) -> None:
        if self.size not in MWCNN_SIZES:
            raise ValueError(f"XPDNet size {self.size!r} is not one of {', '.join(MWCNN_SIZES)}")
        if self.n_iter < 1 or self.n_primal < 1 or self.n_channels < 1:
            raise ValueError(
                f"n_iter, n_primal and n_channels must be >= 1, got {self.n_iter}, {self.n_primal}, {self.n_channels}"
            )


class XPDNet(nn.Module):
    def __init__(self, config: XPDNetConfig | None = None, **kw: Any) -> None:
        super().__init__()
        self.config = config or XPDNetConfig(**kw)
        c = self.config
        self.image_nets = nn.ModuleList(
            [ComplexMWCNN((c.n_primal + 1) * c.n_channels, c.n_primal * c.n_channels, c.size) for _ in range(c.n_iter)]
        )
        self.refiner = SensitivityRefiner() if c.refine_smaps else None

    # -- core: any operator -----------------------------------------------------------------------------------
    def _iteration(self, i: int, buf: torch.Tensor, op: ChannelOperator, y: torch.Tensor) -> torch.Tensor:
        b, p, ch, ny, nx = buf.shape
        residual = op.adjoint(op.forward(buf[:, 0]) - y)  # measurements residual, back in image space
        x = torch.cat([buf, residual[:, None]], dim=1).reshape(b, (p + 1) * ch, ny, nx)
        return self.image_nets[i](x).reshape(b, p, ch, ny, nx)

    def unroll(self, op: Any, y: torch.Tensor) -> torch.Tensor:
        """Complex buffer[0] [B, n_ch, ny, nx] after ``n_iter`` iterations on (already scaled) data y."""
        op = channel_operator(op)
        if op.n_channels != self.config.n_channels:
            raise ValueError(
                f"this XPDNet was built for {self.config.n_channels} image channel(s), the operator has {op.n_channels}"
            )
        x0 = op.adjoint(y)
        buf = x0[:, None].expand(-1, self.config.n_primal, -1, -1, -1).contiguous()
        for i in range(self.config.n_iter):
            if self.config.checkpoint and self.training and torch.is_grad_enabled():
                buf = checkpoint(lambda b, i=i: self._iteration(i, b, op, y), buf, use_reentrant=False)
            else:
                buf = self._iteration(i, buf, op, y)
        return buf[:, 0]

    def reconstruct(self, op: Any, y: torch.Tensor) -> torch.Tensor:
        """Complex images [B, n_ch, ny, nx] from data y in any unit: scaled by max |A^H y| per slice and back."""
        cop = channel_operator(op)
        scale = cop.adjoint(y).abs().flatten(1).amax(dim=1).clamp_min(1e-30)
        shape = (-1,) + (1,) * (y.ndim - 1)
        return self.unroll(cop, y / scale.reshape(shape)) * scale[:, None, None, None]

    # -- Cartesian multi-coil, maps estimated inside the network (the reference's set-up) ----------------------
    def cartesian_operator(self, y: torch.Tensor, mask: torch.Tensor) -> CartesianSense:
        """SENSE operator with central-k-space maps (refined when configured) for y [B, C, ny, nx]."""
        m = mask if mask.ndim == 3 else mask.expand(y.shape[0], *mask.shape[-2:])
        if m.shape[0] != y.shape[0]:
            raise ValueError(f"mask has {m.shape[0]} slices, the data {y.shape[0]}")
        ny = y.shape[-2]
        rows = (m.abs() > 0).any(dim=-1).sum(dim=-1).clamp_min(1)  # sampled phase-encode lines per slice
        pcts = [low_freq_percent(ny / float(r)) for r in rows]
        maps = central_kspace_maps(y, pcts, self.config.min_calib_lines)
        if self.refiner is not None:
            maps = self.refiner(maps)
        return CartesianSense(maps, m, device=y.device)

    def forward(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Magnitude images [B, ny, nx] from Cartesian multi-coil k-space y [B, C, ny, nx] and its mask."""
        return self.reconstruct(self.cartesian_operator(y, mask), y)[:, 0].abs()

    def cartesian_complex(self, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(self.cartesian_operator(y, mask), y)[:, 0]


# ---- weights -------------------------------------------------------------------------------------------------
SHIPPED_NAME = "xpdnet_small"


def save_xpdnet(model: XPDNet, path: str | Path, meta: dict[str, Any] | None = None, half: bool = True) -> Path:
    from pipelines.weights_io import save_weights

    info = {"model": "xpdnet", "config": dataclasses.asdict(model.config), **(meta or {})}
    return save_weights(path, dict(model.state_dict()), info, half=half)


def load_xpdnet(path: str | Path | None = None, device: torch.device | str = "cpu") -> XPDNet:
    """XPDNet from a safetensors file written by :func:`save_xpdnet` (None: the shipped small weights)."""
    from pipelines.weights_io import load_weights, shipped_weights

    path = shipped_weights(SHIPPED_NAME) if path in (None, "") else Path(path)
    tensors, meta = load_weights(path)
    if meta.get("model") != "xpdnet" or "config" not in meta:
        raise ValueError(f"{path} does not hold XPDNet weights (metadata model={meta.get('model')!r})")
    cfg = {**meta["config"], "checkpoint": False}
    model = XPDNet(XPDNetConfig(**cfg))
    model.load_state_dict(tensors)
    return model.to(device).eval()


_LOADED: dict[tuple[str, str], XPDNet] = {}


def cached_xpdnet(weights: str | Path | None, device: torch.device | str) -> XPDNet:
    """:func:`load_xpdnet` once per (file, device) per process: a node reconstructs many studies."""
    key = (str(Path(weights).expanduser().resolve()) if weights else "", str(device))
    if key not in _LOADED:
        _LOADED[key] = load_xpdnet(Path(weights).expanduser() if weights else None, device)
    return _LOADED[key]


def xpdnet_cartesian(op: Any, y: torch.Tensor, weights: str | Path | None = None, chunk: int = 4) -> torch.Tensor:
    """Complex images [S, ny, nx] from Cartesian k-space y [S, C, ny, nx] and the mask of a CartesianSense ``op``.

    XPDNet estimates its own maps from y (as it was trained); the operator only lends its mask. Slices go
    through ``chunk`` at a time to bound memory.
    """
    if not isinstance(op, CartesianSense):
        raise ValueError(
            f"XPDNet reconstructs Cartesian SENSE data; got a {type(op).__name__} operator "
            "(use ncpdnet for non-Cartesian data)"
        )
    model = cached_xpdnet(weights, op.device)
    if model.config.n_channels != 1:
        raise ValueError(
            f"weights {weights or SHIPPED_NAME!r} are for {model.config.n_channels} image channels "
            "(an MRF subspace network), not single-image SENSE"
        )
    mask = op.mask if op.mask.ndim == 3 else op.mask.expand(y.shape[0], *op.shape)
    with torch.no_grad():
        out = [model.cartesian_complex(y[i : i + chunk], mask[i : i + chunk]) for i in range(0, y.shape[0], chunk)]
    return torch.cat(out)
