"""The project's one non-uniform FFT, backed by FINUFFT (Barnett et al., SISC 2019).

Conventions shared with :mod:`pipelines.sim.trajectories` and the ISMRMRD files the node reads:
k-space coordinates are (kx, ky) in cycles per FOV, in [-N/2, N/2); images are [..., y, x] with the centre at
index N/2; scaling is the orthonormal one, so on grid points the forward transform equals the centred
orthonormal FFT (``fftshift(fft2(ifftshift(img), norm="ortho"))``).

Three layers, one code path:

* :class:`FinufftPoints` holds the points of one trajectory and cached FINUFFT plans (per batch size), and
  applies type 2 (image -> samples, "forward") and type 1 (samples -> image, "adjoint") to NumPy arrays.
* :func:`nufft_forward` / :func:`nufft_adjoint`: the NumPy functions the simulator uses (double precision).
* :class:`NUFFT`: a torch operator (complex64) whose forward and adjoint are ``autograd.Function``\\ s, each
  the other's gradient, so unrolled networks and MRF subspace solvers can differentiate through it.

Toeplitz embedding (:func:`toeplitz_kernel`, :func:`toeplitz_normal`) replaces ``A^H W A`` by one FFT pair on a
twice-as-large grid: it is how iterative solvers avoid a NUFFT pair per iteration.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import finufft
import numpy as np
import torch

_EPS = 1e-6  # ~ float32 round-off; FINUFFT's error is relative to the norm of the input
_PLAN_CACHE = 4  # plans kept per point set (one per batch size seen recently)


def _radians(k: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(k, dtype=np.float64).reshape(-1, 2)
    ny, nx = shape
    return 2 * np.pi * k[:, 1] / ny, 2 * np.pi * k[:, 0] / nx  # (y, x) order matches the image axes


def _as_numpy_points(k: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(k, torch.Tensor):
        k = k.detach().cpu().numpy()
    k = np.asarray(k)
    if k.ndim < 2 or k.shape[-1] != 2:
        raise ValueError(f"k-space points must be [..., 2] as (kx, ky) in cycles/FOV, got shape {k.shape}")
    return k.reshape(-1, 2)


class FinufftPoints:
    """FINUFFT type 1 / type 2 for one point set on one image grid, with plans cached per batch size.

    Plan creation and ``setpts`` (sorting the points) cost about as much as a transform for MRI-sized
    problems, so the plans are kept: repeated calls with the same batch size only execute.
    ``dtype`` complex64 gives single-precision plans (what the torch layer uses), complex128 double.
    ``modes`` is the grid the transforms act on; it defaults to ``shape`` and is ``2 * shape`` for the
    Toeplitz point-spread function (same radians, twice the modes).
    """

    def __init__(
        self,
        k: np.ndarray | torch.Tensor,
        shape: tuple[int, int],
        eps: float = _EPS,
        dtype: Any = np.complex64,
        modes: tuple[int, int] | None = None,
        nthreads: int | None = None,
        **opts: Any,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.modes = self.shape if modes is None else (int(modes[0]), int(modes[1]))
        self.dtype = np.dtype(dtype)
        real = np.float32 if self.dtype == np.complex64 else np.float64
        wy, wx = _radians(_as_numpy_points(k), self.shape)
        self.wy = np.ascontiguousarray(wy, dtype=real)
        self.wx = np.ascontiguousarray(wx, dtype=real)
        self.n_points = self.wy.size
        # Single precision cannot reach below ~1e-6 relative; asking for less makes FINUFFT warn and clamp.
        self.eps = max(float(eps), 1e-6) if self.dtype == np.complex64 else float(eps)
        self.scale = 1.0 / np.sqrt(self.shape[0] * self.shape[1])
        self.opts = dict(opts)
        self.nthreads = nthreads
        self._plans: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def _plan(self, kind: int, n_trans: int) -> Any:
        key = (kind, n_trans)
        plan = self._plans.get(key)
        if plan is None:
            nthreads = torch.get_num_threads() if self.nthreads is None else self.nthreads
            plan = finufft.Plan(
                kind,
                self.modes,
                n_trans=n_trans,
                eps=self.eps,
                isign=-1 if kind == 2 else +1,
                dtype=self.dtype.name,
                nthreads=nthreads,
                **self.opts,
            )
            plan.setpts(self.wy, self.wx)
            self._plans[key] = plan
            while len(self._plans) > 2 * _PLAN_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def forward(self, images: np.ndarray) -> np.ndarray:
        """Samples [B, M] of images [B, *modes] (type 2, orthonormal scaling)."""
        b = images.shape[0]
        f = np.ascontiguousarray(images, dtype=self.dtype)
        out = self._plan(2, b).execute(f if b > 1 else f[0])
        return (out.reshape(b, self.n_points) * self.dtype.type(self.scale)).astype(self.dtype, copy=False)

    def adjoint(self, data: np.ndarray) -> np.ndarray:
        """Images [B, *modes] from samples [B, M] (type 1, orthonormal scaling)."""
        b = data.shape[0]
        c = np.ascontiguousarray(data, dtype=self.dtype)
        out = self._plan(1, b).execute(c if b > 1 else c[0])
        return (out.reshape(b, *self.modes) * self.dtype.type(self.scale)).astype(self.dtype, copy=False)


# ---- NumPy functions (the simulator's) ------------------------------------------------------------------------
def nufft_forward(images: np.ndarray, k: np.ndarray, eps: float = _EPS) -> np.ndarray:
    """Samples [..., M] of the images [..., ny, nx] at the points k [M, 2] (double precision inside)."""
    images = np.asarray(images)
    shape = images.shape[-2:]
    lead = images.shape[:-2]
    pts = FinufftPoints(k, shape, eps=eps, dtype=np.complex128, nthreads=0)
    out = pts.forward(images.reshape((-1, *shape)))
    return out.reshape((*lead, -1)).astype(np.complex64 if images.dtype != np.complex128 else np.complex128)


def nufft_adjoint(data: np.ndarray, k: np.ndarray, shape: tuple[int, int], eps: float = _EPS) -> np.ndarray:
    """Adjoint of :func:`nufft_forward`: images [..., ny, nx] from samples [..., M]."""
    data = np.asarray(data)
    lead = data.shape[:-1]
    pts = FinufftPoints(k, shape, eps=eps, dtype=np.complex128, nthreads=0)
    out = pts.adjoint(data.reshape((-1, data.shape[-1])))
    return out.reshape((*lead, *shape)).astype(np.complex64 if data.dtype != np.complex128 else np.complex128)


# ---- torch ------------------------------------------------------------------------------------------------------
class _CudaPoints:
    """cufinufft plans for CUDA tensors (used only when ``cufinufft`` imports; untested without a GPU)."""

    def __init__(self, host: FinufftPoints, device: torch.device) -> None:
        import importlib

        self.lib = importlib.import_module("cufinufft")  # ImportError when absent: the caller falls back to CPU
        self.host = host
        self.wy = torch.as_tensor(host.wy, device=device)
        self.wx = torch.as_tensor(host.wx, device=device)
        self._plans: dict[tuple[int, int], Any] = {}

    def _plan(self, kind: int, n_trans: int) -> Any:
        key = (kind, n_trans)
        if key not in self._plans:
            plan = self.lib.Plan(
                kind,
                self.host.modes,
                n_trans=n_trans,
                eps=self.host.eps,
                isign=-1 if kind == 2 else +1,
                dtype="complex64",
            )
            plan.setpts(self.wy, self.wx)
            self._plans[key] = plan
        return self._plans[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = self._plan(2, b).execute(x.contiguous() if b > 1 else x[0].contiguous())
        return torch.as_tensor(out, device=x.device).reshape(b, -1) * self.host.scale

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        b = y.shape[0]
        out = self._plan(1, b).execute(y.contiguous() if b > 1 else y[0].contiguous())
        return torch.as_tensor(out, device=y.device).reshape(b, *self.host.modes) * self.host.scale


def _apply(op: NUFFT, x: torch.Tensor, forward: bool) -> torch.Tensor:
    """Run type 2 (forward) or type 1 (adjoint) on a [B, ...] complex64 tensor on its own device."""
    if x.device.type == "cuda" and op._cuda is not None:
        return op._cuda.forward(x) if forward else op._cuda.adjoint(x)
    arr = x.detach().to("cpu", torch.complex64).numpy()
    out = op._host.forward(arr) if forward else op._host.adjoint(arr)
    return torch.from_numpy(out).to(x.device)


class _Forward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, op: NUFFT) -> torch.Tensor:
        ctx.op = op
        return _apply(op, x, forward=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # y = A x is linear: the vector-Jacobian product is A^H grad (PyTorch's conjugate-Wirtinger convention).
        return _Adjoint.apply(grad.contiguous(), ctx.op), None


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, op: NUFFT) -> torch.Tensor:
        ctx.op = op
        return _apply(op, y, forward=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _Forward.apply(grad.contiguous(), ctx.op), None


class NUFFT:
    """Torch NUFFT for a fixed point set; autograd works through forward and adjoint (each is the other's gradient).

    ``k`` [M, 2] in cycles/FOV (kx, ky); images [..., ny, nx] complex64; samples [..., M]. Leading dimensions
    are flattened into FINUFFT's ``n_trans`` batch, and plans are cached per batch size, so repeated calls
    (iterations of a solver, epochs of training) pay only the transforms.

    Devices: on CPU FINUFFT runs in single precision with ``torch.get_num_threads()`` threads. CUDA tensors use
    cufinufft when it imports; otherwise they are copied to the CPU, transformed there and copied back (correct
    but slow: install cufinufft on GPU sites).
    """

    def __init__(
        self,
        k: np.ndarray | torch.Tensor,
        shape: tuple[int, int],
        device: torch.device | str = "cpu",
        eps: float = _EPS,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = torch.device(device)
        self._host = FinufftPoints(k, self.shape, eps=eps, dtype=np.complex64)
        self.n_points = self._host.n_points
        self._cuda: _CudaPoints | None = None
        if self.device.type == "cuda":
            try:
                self._cuda = _CudaPoints(self._host, self.device)
            except ImportError:
                self._cuda = None

    def _check(self, x: torch.Tensor, trailing: tuple[int, ...], what: str) -> torch.Tensor:
        if tuple(x.shape[x.ndim - len(trailing) :]) != trailing or x.ndim < len(trailing):
            raise ValueError(f"NUFFT.{what}: expected [..., {', '.join(map(str, trailing))}], got {tuple(x.shape)}")
        return x.to(torch.complex64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Samples [..., M] of images [..., ny, nx]."""
        x = self._check(x, self.shape, "forward")
        lead = x.shape[:-2]
        y = _Forward.apply(x.reshape(-1, *self.shape).contiguous(), self)
        return y.reshape(*lead, self.n_points)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Images [..., ny, nx] from samples [..., M]."""
        y = self._check(y, (self.n_points,), "adjoint")
        lead = y.shape[:-1]
        x = _Adjoint.apply(y.reshape(-1, self.n_points).contiguous(), self)
        return x.reshape(*lead, *self.shape)

    __call__ = forward


def toeplitz_kernel(
    k: np.ndarray | torch.Tensor,
    shape: tuple[int, int],
    weights: torch.Tensor | np.ndarray | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """FFT-domain kernel(s) [..., 2ny, 2nx] complex64 such that
    toeplitz_normal(x, kernel) == nufft.adjoint(weights * nufft.forward(x)); weights [..., M] real or complex
    (leading dims give several kernels).

    Why it works: ``(A^H W A x)(n) = sum_n' T(n - n') x(n')`` with ``T(d) = 1/N sum_m w_m exp(i k_m . d)``, a
    linear convolution with offsets |d| < N per axis. ``T`` on the 2N grid is one type-1 NUFFT of the weights
    (same radians, 2N modes); its FFT turns the convolution of the zero-padded image into a product.
    """
    ny, nx = int(shape[0]), int(shape[1])
    pts = _as_numpy_points(k)
    m = pts.shape[0]
    if weights is None:
        w = np.ones((1, m), dtype=np.complex64)
        lead: tuple[int, ...] = ()
    else:
        w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
        if w.shape[-1] != m:
            raise ValueError(f"toeplitz_kernel: weights end in {w.shape[-1]} samples, k has {m} points")
        lead = w.shape[:-1]
        w = w.reshape(-1, m).astype(np.complex128)
    # Double precision for the PSF: it is computed once and every later normal product inherits its error.
    psf_op = FinufftPoints(pts, (ny, nx), eps=1e-9, dtype=np.complex128, modes=(2 * ny, 2 * nx))
    # psf_op.adjoint scales by 1/sqrt(N); T needs 1/N.
    psf = psf_op.adjoint(w) * psf_op.scale  # [K, 2ny, 2nx], offset d = 0 at index (ny, nx)
    kernel = np.fft.fft2(np.fft.ifftshift(psf, axes=(-2, -1)), axes=(-2, -1))
    return torch.from_numpy(kernel.astype(np.complex64).reshape(*lead, 2 * ny, 2 * nx)).to(device)


def toeplitz_normal(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``A^H W A x`` for images x [..., ny, nx] with a kernel from :func:`toeplitz_kernel`; broadcasting over
    leading dims."""
    ny, nx = x.shape[-2:]
    if kernel.shape[-2:] != (2 * ny, 2 * nx):
        raise ValueError(
            f"toeplitz_normal: kernel grid {tuple(kernel.shape[-2:])} does not fit images "
            f"{(ny, nx)} (needs {(2 * ny, 2 * nx)})"
        )
    spec = torch.fft.fft2(x.to(torch.complex64), s=(2 * ny, 2 * nx))  # zero-pads at the end of each axis
    return torch.fft.ifft2(spec * kernel)[..., :ny, :nx]
