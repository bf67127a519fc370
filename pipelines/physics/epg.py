"""Extended phase graphs (EPG) for FISP-type MR fingerprinting: batched, differentiable, CPU or CUDA.

Model (Weigel, JMRI 2015; Jiang et al., MRM 2015). Each TR of an unbalanced (gradient-spoiled) SSFP readout is

    RF(alpha_n * B1, phase_n) -> free precession + relaxation for TE -> readout of F+_0
    -> free precession + relaxation for TR_n - TE_n -> dephasing gradient (one cycle: F+_k -> F+_{k+1})

optionally preceded by an inversion pulse and free relaxation for TI. States are truncated at ``n_states``
orders; F- states beyond the truncation are dropped, which is exact for the first ``n_states`` TRs and
otherwise loses only high-order echo pathways; the default count adapts to the longest T2 in the batch
(see :func:`default_n_states`).

Conventions
-----------
* Times in ms, angles in degrees, off-resonance in Hz, M0 = 1.
* Free precession multiplies F+ by exp(+i 2 pi df t) (and F- by its conjugate): a spin at +df Hz gains
  positive phase. This is the convention of the water/fat literature, s(t) = (W + F sum_p a_p e^{i 2 pi f_p t})
  e^{i 2 pi df t}, with fat peaks at negative frequency relative to water.
* RF pulses rotate about the transverse axis at ``rf_phase`` (0 = x); the first pulse after equilibrium
  gives a signal of phase -90 deg, as in Weigel's operator.

Computation: per TR the RF rotation, relaxation and precession are one 3x3 complex (or real) matrix per batch
entry, the same for every dephasing order, applied to the [3, states, batch] state. Without autograd the
update runs in place in two preallocated buffers (about 3x faster than allocating); with autograd the same
update runs out of place. Where the RF phase is 0 and there is no off-resonance, F+ = -i u and F- = i v with u, v real,
and the whole recursion is real: ``fast path``, about twice as fast and exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipelines.physics.sequences import MRFSequence

GAMMA_BAR_HZ_PER_T = 42.577478e6

# Six-peak fat spectrum (Hamilton et al., NMR Biomed 2011; as used by the ISMRM fat-water toolbox):
# chemical shifts relative to water in ppm and relative amplitudes (normalised to sum 1 below).
FAT_PPM = (-3.80, -3.40, -2.60, -1.94, -0.39, 0.60)
FAT_AMPLITUDES = (0.087, 0.693, 0.128, 0.004, 0.039, 0.048)


def default_n_states(n_frames: int, t2_max_ms: float = 2000.0, tr_min_ms: float = 10.0) -> int:
    """Number of dephasing orders kept when the caller does not say.

    Pathways decay by exp(-TR/T2) per order, so the orders that matter grow with T2/TR. The rule
    K = 0.75 T2max / TRmin + 32, rounded up to a multiple of 16, keeps the worst-case error relative to the
    untruncated EPG under 1e-3 on both built-in schedules for T2 up to 2 s and T1 up to 5 s (measured:
    tests/unit/test_epg.py::test_default_states_accuracy; FISP at T2 = 2 s needs 128 orders, 64 give 3.7e-3).
    More than n_frames/2 + 2 orders never matter: a pathway dephased further cannot refocus before the end.
    """
    k = 0.75 * t2_max_ms / max(tr_min_ms, 1e-3) + 32
    k = int(math.ceil(k / 16) * 16)
    return int(max(4, min(k, n_frames // 2 + 2)))


@dataclass(frozen=True)
class SequenceTensors:
    """A schedule as tensors on the compute device (flip angles may require grad for sequence design)."""

    flip_rad: torch.Tensor  # [N]
    tr_ms: torch.Tensor  # [N]
    te_ms: torch.Tensor  # [N]
    ti_ms: float | None
    rf_phase_rad: torch.Tensor | None  # [N] or None (= 0)

    @classmethod
    def from_sequence(
        cls, seq: MRFSequence, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> SequenceTensors:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)

        return cls(
            flip_rad=t(np.deg2rad(seq.flip_angles_deg)),
            tr_ms=t(seq.tr_ms),
            te_ms=t(seq.te_ms),
            ti_ms=seq.ti_ms,
            rf_phase_rad=None if seq.rf_phase_deg is None else t(np.deg2rad(seq.rf_phase_deg)),
        )


def _as_batch(x: torch.Tensor | float | None, like: torch.Tensor, default: float) -> torch.Tensor:
    if x is None:
        return torch.full_like(like, default)
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return x.expand_as(like) if x.dim() == 0 else x.reshape(like.shape)


def epg_fisp(
    seq: MRFSequence | SequenceTensors,
    t1_ms: torch.Tensor,
    t2_ms: torch.Tensor,
    b1: torch.Tensor | float | None = None,
    df_hz: torch.Tensor | float | None = None,
    *,
    n_states: int | None = None,
    inversion_efficiency: float = 1.0,
) -> torch.Tensor:
    """FISP-MRF fingerprints for a batch of tissues.

    Args:
        seq: the schedule (an :class:`MRFSequence` is moved to ``t1_ms``'s device).
        t1_ms, t2_ms: [B] relaxation times in ms (float32 or float64).
        b1: [B] relative transmit field scaling the flip angles (default 1).
        df_hz: [B] off-resonance in Hz (default 0; any non-zero value takes the complex path).
        n_states: dephasing orders kept (default :func:`default_n_states`).
        inversion_efficiency: 1 = perfect adiabatic inversion before TI; ignored without TI.

    Returns:
        [B, N] complex fingerprints (complex64 for float32 inputs), magnetisation per unit M0 at each TE.
        Differentiable with respect to every tensor input.
    """
    t1 = torch.as_tensor(t1_ms)
    if not t1.is_floating_point():
        t1 = t1.float()
    t1 = t1.reshape(-1)
    t2 = torch.as_tensor(t2_ms, dtype=t1.dtype, device=t1.device).reshape(-1)
    if t2.shape != t1.shape:
        raise ValueError(f"t1_ms and t2_ms must have the same length, got {t1.shape[0]} and {t2.shape[0]}")
    if isinstance(seq, MRFSequence):
        seq = SequenceTensors.from_sequence(seq, device=t1.device, dtype=t1.dtype)
    b1t = _as_batch(b1, t1, 1.0)
    n_frames = int(seq.flip_rad.shape[0])
    if n_states is None:
        tr_min = float(seq.tr_ms.detach().min()) if n_frames else 10.0
        n_states = default_n_states(n_frames, float(t2.detach().max()) if t2.numel() else 0.0, tr_min)
    k = n_states

    has_df = df_hz is not None and (not isinstance(df_hz, (int, float)) or df_hz != 0)
    dft = _as_batch(df_hz, t1, 0.0) if has_df else None
    return _run_epg(seq, t1, t2, b1t, dft, k, inversion_efficiency)


def _initial_z(seq: SequenceTensors, t1: torch.Tensor, inversion_efficiency: float) -> torch.Tensor:
    """Longitudinal magnetisation at the first RF pulse: inversion then recovery over TI."""
    if seq.ti_ms is None:
        return torch.ones_like(t1)
    e1 = torch.exp(-seq.ti_ms / t1)
    return (1.0 - 2.0 * inversion_efficiency) * e1 + (1.0 - e1)


# A TR maps the state (P, M, Z) = (F+, F-, Z) at every order k through one 3x3 matrix `m` (rows already
# multiplied by the relaxation / precession over the TR), then shifts orders and adds T1 recovery to Z_0.
# The state is laid out [3, K, B] so that orders are contiguous blocks of the batch and a shift is an offset.
# In the real representation P = -i u, M = i v, and conj() is the identity.


def _step_inplace(s: torch.Tensor, d: torch.Tensor, m: list[list[torch.Tensor]], rec: torch.Tensor) -> None:
    """One TR into the preallocated buffer ``d`` (no autograd): the inference kernel."""
    p, q, z = s[0], s[1], s[2]
    dp, dq, dz = d[0], d[1], d[2]
    torch.mul(p[:-1], m[0][0], out=dp[1:])
    dp[1:].addcmul_(q[:-1], m[0][1]).addcmul_(z[:-1], m[0][2])
    dp[0] = (m[1][0] * p[1] + m[1][1] * q[1] + m[1][2] * z[1]).conj()
    torch.mul(q[1:], m[1][1], out=dq[:-1])
    dq[:-1].addcmul_(p[1:], m[1][0]).addcmul_(z[1:], m[1][2])
    dq[-1] = 0
    torch.mul(z, m[2][2], out=dz)
    dz.addcmul_(p, m[2][0]).addcmul_(q, m[2][1])
    dz[0] += rec


def _step_functional(s: torch.Tensor, m: list[list[torch.Tensor]], rec: torch.Tensor) -> torch.Tensor:
    """The same TR as :func:`_step_inplace`, out of place so that autograd can differentiate it."""
    p, q, z = s[0], s[1], s[2]
    p_body = m[0][0] * p[:-1] + m[0][1] * q[:-1] + m[0][2] * z[:-1]
    p0 = (m[1][0] * p[1] + m[1][1] * q[1] + m[1][2] * z[1]).conj()
    q_body = m[1][0] * p[1:] + m[1][1] * q[1:] + m[1][2] * z[1:]
    nz = m[2][0] * p + m[2][1] * q + m[2][2] * z
    nz = torch.cat([(nz[0] + rec)[None], nz[1:]])
    return torch.stack([torch.cat([p0[None], p_body]), torch.cat([q_body, torch.zeros_like(q_body[:1])]), nz])


def _rf_rows(
    a: torch.Tensor, phase: torch.Tensor | None, complex_dtype: torch.dtype | None
) -> list[list[torch.Tensor]]:
    """Weigel's RF rotation on (F+, F-, Z) for flip ``a`` [B] about the axis at ``phase``.

    Real representation (complex_dtype None, phase 0): the same operator on (u, v, z).
    """
    c2, s2, sa, ca = torch.cos(a / 2) ** 2, torch.sin(a / 2) ** 2, torch.sin(a), torch.cos(a)
    if complex_dtype is None:
        return [[c2, -s2, sa], [-s2, c2, sa], [-0.5 * sa, -0.5 * sa, ca]]
    ep = torch.polar(torch.ones_like(a), torch.zeros_like(a) if phase is None else phase + torch.zeros_like(a))
    c2, s2, sa, ca = (x.to(complex_dtype) for x in (c2, s2, sa, ca))
    ep2, isa = ep * ep, 1j * sa
    return [
        [c2, ep2 * s2, -isa * ep],
        [ep2.conj() * s2, c2, isa * ep.conj()],
        [-0.5 * isa * ep.conj(), 0.5 * isa * ep, ca],
    ]


def _run_epg(
    seq: SequenceTensors,
    t1: torch.Tensor,
    t2: torch.Tensor,
    b1: torch.Tensor,
    df: torch.Tensor | None,
    k: int,
    inv_eff: float,
) -> torch.Tensor:
    is_complex = df is not None or seq.rf_phase_rad is not None
    cdtype = (torch.complex128 if t1.dtype == torch.float64 else torch.complex64) if is_complex else None
    sdtype = cdtype or t1.dtype
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad
        for x in (t1, t2, b1, df, seq.flip_rad, seq.tr_ms, seq.te_ms, seq.rf_phase_rad)
    )
    batch = t1.shape[0]
    state = torch.zeros(3, k, batch, dtype=sdtype, device=t1.device)
    z_init = _initial_z(seq, t1, inv_eff).to(sdtype)
    if needs_grad:
        state = torch.cat([state[:2], torch.cat([z_init[None], state[2, 1:]])[None]])
    else:
        state[2, 0] = z_init
        spare = torch.empty_like(state)
    r1, r2 = 1.0 / t1, 1.0 / t2
    w = None if df is None else 2 * math.pi * df * 1e-3  # rad per ms
    signals = []
    for n in range(seq.flip_rad.shape[0]):
        rf = _rf_rows(seq.flip_rad[n] * b1, None if seq.rf_phase_rad is None else seq.rf_phase_rad[n], cdtype)
        tr, te = seq.tr_ms[n], seq.te_ms[n]
        e1 = torch.exp(-tr * r1)
        if w is None:
            p_tr, p_te = torch.exp(-tr * r2), torch.exp(-te * r2)
        else:
            p_tr, p_te = torch.polar(torch.exp(-tr * r2), w * tr), torch.polar(torch.exp(-te * r2), w * te)
        # F+_0 just after the pulse, relaxed and precessed to TE.
        signals.append((rf[0][0] * state[0, 0] + rf[0][1] * state[1, 0] + rf[0][2] * state[2, 0]) * p_te)
        e1c = e1.to(sdtype)
        relax = (p_tr, p_tr.conj(), e1c)
        m = [[relax[i] * rf[i][j] for j in range(3)] for i in range(3)]
        rec = 1.0 - e1c
        if needs_grad:
            state = _step_functional(state, m, rec)
        else:
            _step_inplace(state, spare, m, rec)
            state, spare = spare, state
    sig = torch.stack(signals, dim=-1)
    if cdtype is None:  # F+ = -i u
        return torch.complex(torch.zeros_like(sig), -sig)
    return sig


# ---- water / fat -----------------------------------------------------------------------------------------
def fat_peak_frequencies_hz(field_strength_T: float) -> np.ndarray:
    """Frequencies of the six fat peaks relative to water (negative: below water)."""
    return np.asarray(FAT_PPM) * 1e-6 * GAMMA_BAR_HZ_PER_T * field_strength_T


def fat_peak_amplitudes() -> np.ndarray:
    a = np.asarray(FAT_AMPLITUDES, dtype=np.float64)
    return a / a.sum()


def epg_fat(
    seq: MRFSequence | SequenceTensors,
    t1_ms: torch.Tensor,
    t2_ms: torch.Tensor,
    b1: torch.Tensor | float | None = None,
    df_hz: torch.Tensor | float | None = None,
    *,
    field_strength_T: float = 3.0,
    n_states: int | None = None,
    inversion_efficiency: float = 1.0,
) -> torch.Tensor:
    """Fingerprints of pure fat: the amplitude-weighted sum of one EPG per spectral peak.

    Each peak precesses at its own frequency throughout the sequence, not only at TE, because with varying TR
    the off-resonance changes which echo pathways add in phase.
    """
    t1 = torch.as_tensor(t1_ms).reshape(-1)
    if not t1.is_floating_point():
        t1 = t1.float()
    t2 = torch.as_tensor(t2_ms, dtype=t1.dtype, device=t1.device).reshape(-1)
    b1t = _as_batch(b1, t1, 1.0)
    dft = _as_batch(df_hz, t1, 0.0)
    freqs = torch.as_tensor(fat_peak_frequencies_hz(field_strength_T), dtype=t1.dtype, device=t1.device)
    amps = torch.as_tensor(fat_peak_amplitudes(), dtype=t1.dtype, device=t1.device)
    n_peaks, batch = freqs.shape[0], t1.shape[0]
    sig = epg_fisp(
        seq,
        t1.repeat(n_peaks),
        t2.repeat(n_peaks),
        b1t.repeat(n_peaks),
        (dft[None, :] + freqs[:, None]).reshape(-1),
        n_states=n_states,
        inversion_efficiency=inversion_efficiency,
    )
    return (sig.reshape(n_peaks, batch, -1) * amps[:, None, None].to(sig.dtype)).sum(0)


def epg_water_fat(
    seq: MRFSequence | SequenceTensors,
    ff: torch.Tensor,
    t1_water_ms: torch.Tensor,
    t2_water_ms: torch.Tensor,
    t1_fat_ms: torch.Tensor,
    t2_fat_ms: torch.Tensor,
    b1: torch.Tensor | float | None = None,
    df_hz: torch.Tensor | float | None = None,
    *,
    field_strength_T: float = 3.0,
    n_states: int | None = None,
    inversion_efficiency: float = 1.0,
) -> torch.Tensor:
    """Two-compartment fingerprints for T1-FF MRF, per unit total proton density.

    FF is the proton-density fat fraction: fat protons / (water + fat protons), so the signal is
    (1 - FF) * water(T1w, T2w) + FF * fat(T1f, T2f), both compartments sharing B1 and the field offset df.
    Relaxation weighting is part of the signal, not of FF, which is what makes this FF the PDFF of the
    Dixon literature (Reeder et al., JMRI 2012). All inputs are promoted to one real dtype.
    """
    tensors = [torch.as_tensor(v) for v in (ff, t1_water_ms, t2_water_ms, t1_fat_ms, t2_fat_ms)]
    dtype = torch.promote_types(torch.float32, tensors[0].dtype)
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    ff, t1w, t2w, t1f, t2f = (t.to(dtype).reshape(-1) for t in tensors)
    b1 = None if b1 is None else torch.as_tensor(b1, dtype=dtype)
    df_hz = None if df_hz is None else torch.as_tensor(df_hz, dtype=dtype)
    water = epg_fisp(seq, t1w, t2w, b1, df_hz, n_states=n_states, inversion_efficiency=inversion_efficiency)
    fat = epg_fat(
        seq,
        t1f,
        t2f,
        b1,
        df_hz,
        field_strength_T=field_strength_T,
        n_states=n_states,
        inversion_efficiency=inversion_efficiency,
    )
    ffc = ff.to(water.dtype)[:, None]
    return (1 - ffc) * water + ffc * fat


def epg_chunked(
    fn: Callable[..., torch.Tensor],
    *params: torch.Tensor,
    chunk: int = 20000,
    progress: bool = False,
    desc: str = "EPG",
    **kwargs: Any,
) -> torch.Tensor:
    """Run an EPG function over a long batch in chunks (bounded memory), optionally with a progress bar."""
    n = int(params[0].shape[0])
    starts = range(0, n, chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", total=math.ceil(n / chunk))
    out = [fn(*(p[i : i + chunk] for p in params), **kwargs) for i in starts]
    return torch.cat(out, dim=0)
