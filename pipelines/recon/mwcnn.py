"""Multi-level wavelet CNN (MWCNN, Liu et al. CVPR-W 2018): XPDNet's image-domain denoiser.

A U-net whose pooling is the 2D Haar transform (DWT: 4x the channels at half the resolution, no information
lost) and whose unpooling is its exact inverse (IWT); 3x3 convolutions without bias followed by ReLU, no batch
norm. Layer layout and sizes follow the XPDNet reference (fastmri-reproducible-benchmark,
``denoisers/mwcnn.py`` and ``proposed_params.py``):

* ``n_first_convs`` full-resolution convolutions, then per scale ``n_convs`` convolutions after a DWT on the
  way down and ``n_convs`` on the way up, the last of each scale producing 4x the channels of the scale above
  so that the IWT hands that scale back its own width; skips are additions (not concatenations);
* after the last IWT, the first-convolution features are added and ``n_first_convs`` convolutions follow, the
  final one linear with bias (the output layer).

Per XPDNet iteration with a buffer of 5 complex images (12 real input, 10 real output channels) the three sizes
hold 0.34 M (small), 6.2 M (medium) and 24.9 M (big) parameters, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def dwt(x: torch.Tensor) -> torch.Tensor:
    """Haar analysis [B, C, H, W] -> [B, 4C, H/2, W/2], channel blocks LL, HL, LH, HH (orthonormal: /2)."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"dwt needs even image sizes, got {tuple(x.shape[-2:])}")
    even_rows, odd_rows = x[..., 0::2, :] / 2, x[..., 1::2, :] / 2
    a, b = even_rows[..., 0::2], odd_rows[..., 0::2]
    c, d = even_rows[..., 1::2], odd_rows[..., 1::2]
    return torch.cat((a + b + c + d, -a - b + c + d, -a + b - c + d, a - b - c + d), dim=1)


def iwt(x: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`dwt`: [B, 4C, h, w] -> [B, C, 2h, 2w]."""
    ll, hl, lh, hh = (t / 2 for t in torch.chunk(x, 4, dim=1))
    b, c, h, w = ll.shape
    out = x.new_empty((b, c, 2 * h, 2 * w))
    out[..., 0::2, 0::2] = ll - hl - lh + hh
    out[..., 1::2, 0::2] = ll - hl + lh - hh
    out[..., 0::2, 1::2] = ll + hl - lh - hh
    out[..., 1::2, 1::2] = ll + hl + lh + hh
    return out


@dataclass(frozen=True)
class MWCNNSize:
    n_scales: int
    n_filters_per_scale: tuple[int, ...]
    n_convs_per_scale: tuple[int, ...]
    n_first_convs: int
    first_conv_n_filters: int


# The reference's three sizes (proposed_params.py).
MWCNN_SIZES: dict[str, MWCNNSize] = {
    "small": MWCNNSize(2, (32, 64), (2, 2), 2, 32),
    "medium": MWCNNSize(3, (64, 128, 256), (3, 3, 3), 2, 32),
    "big": MWCNNSize(3, (128, 256, 512), (3, 3, 3), 3, 64),
}


def _conv_relu(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.ReLU(inplace=True))


class MWCNN(nn.Module):
    """MWCNN on real images [B, n_inputs, H, W] -> [B, n_outputs, H, W]; H and W multiples of 2**n_scales."""

    def __init__(
        self, n_inputs: int, n_outputs: int, size: str | MWCNNSize = "small", kernel_size: int = 3, res: bool = False
    ) -> None:
        super().__init__()
        if isinstance(size, str):
            if size not in MWCNN_SIZES:
                raise ValueError(f"MWCNN size {size!r} is not one of {', '.join(MWCNN_SIZES)}")
            size = MWCNN_SIZES[size]
        self.size, self.res, self.n_scales = size, res, size.n_scales
        if res and n_inputs < n_outputs:
            raise ValueError(f"a residual MWCNN needs n_inputs >= n_outputs, got {n_inputs} < {n_outputs}")
        k, f0, nf = kernel_size, size.first_conv_n_filters, size.n_filters_per_scale
        if size.n_first_convs > 0:
            chans = [n_inputs] + [f0] * size.n_first_convs
            self.first_down: nn.Module = nn.Sequential(
                *[_conv_relu(chans[i], chans[i + 1], k) for i in range(size.n_first_convs)]
            )
            # after the last IWT: f0 channels (the 4*f0 produced at scale 0, unpooled), last layer linear.
            ups = [_conv_relu(f0, f0, k) for _ in range(size.n_first_convs - 1)]
            self.first_up: nn.Module = nn.Sequential(*ups, nn.Conv2d(f0, n_outputs, k, padding=k // 2, bias=True))
            c = f0
        else:
            self.first_down, self.first_up = nn.Identity(), nn.Identity()
            c = n_inputs
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for s in range(size.n_scales):
            n = size.n_convs_per_scale[s]
            chans = [4 * c] + [nf[s]] * n
            self.down.append(nn.Sequential(*[_conv_relu(chans[i], chans[i + 1], k) for i in range(n)]))
            if s == 0:
                last = max(4 * f0, 4 * n_outputs) if size.n_first_convs > 0 else 4 * n_outputs
            else:
                last = 4 * nf[s - 1]
            layers: list[nn.Module] = [_conv_relu(nf[s], nf[s], k) for _ in range(n - 1)]
            if s == 0 and size.n_first_convs < 1:
                layers.append(nn.Conv2d(nf[s], last, k, padding=k // 2, bias=True))
            else:
                layers.append(_conv_relu(nf[s], last, k))
            self.up.append(nn.Sequential(*layers))
            c = nf[s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2**self.n_scales
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(
                f"MWCNN with {self.n_scales} scales needs sizes divisible by {m}, got {tuple(x.shape[-2:])}"
            )
        first = self.first_down(x)
        h, skips = first, []
        for block in self.down:
            h = block(dwt(h))
            skips.append(h)
        for s in range(self.n_scales - 1, -1, -1):
            if s != self.n_scales - 1:
                h = iwt(h) + skips[s]
            h = self.up[s](h)
        h = iwt(h)
        if self.size.n_first_convs > 0:
            h = self.first_up(h + first)
        return x[:, : h.shape[1]] + h if self.res else h


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
