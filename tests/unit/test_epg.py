"""Tests of pipelines.physics.epg against an independent float64 NumPy EPG written here.

The reference (:func:`ref_epg`) follows Weigel, JMRI 2015 step by step, without any of the implementation's
shortcuts: per TR it applies the RF operator order by order, relaxes and precesses to TE, reads F+_0, relaxes
and precesses over TR - TE, then applies the dephasing gradient. The implementation folds the relaxation over the
whole TR into the RF matrix, works in a real representation where it can and updates buffers in place; those
choices are exactly what these tests check.

Tolerances (relative error = max |ours - ref| / max |ref| per fingerprint):
* float64: < 1e-5 required; measured 2e-15 .. 1e-14.
* float32 (complex64 out): measured up to 1.7e-6 on these schedules (300 FISP frames, 175 T1-FF frames);
  asserted < 2e-5, 10x margin, well inside the 1e-4 allowed for single precision.

Runtime: ~10-15 s on 2 threads (the reference loops over TRs and states in Python, vectorised over the batch).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from pipelines.physics.epg import (
    SequenceTensors,
    default_n_states,
    epg_fat,
    epg_fisp,
    epg_water_fat,
    fat_peak_amplitudes,
    fat_peak_frequencies_hz,
)
from pipelines.physics.sequences import MRFSequence, fisp_sequence, t1ff_sequence

N_THREADS = min(2, os.cpu_count() or 1)

# Fat model written out independently of the implementation's constants.
REF_FAT_PPM = np.array([-3.80, -3.40, -2.60, -1.94, -0.39, 0.60])
REF_FAT_AMP = np.array([0.087, 0.693, 0.128, 0.004, 0.039, 0.048])
REF_FAT_AMP = REF_FAT_AMP / REF_FAT_AMP.sum()
REF_GAMMA_BAR = 42.577478e6  # Hz/T

TOL64 = 1e-5
TOL32 = 2e-5  # measured <= 1.7e-6; see module docstring


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(N_THREADS)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------------
# Independent reference
# ---------------------------------------------------------------------------------------------------------
def ref_epg(
    flip_deg,
    tr_ms,
    te_ms,
    ti_ms,
    t1,
    t2,
    b1,
    df_hz,
    n_states,
    rf_phase_deg=None,
    inv_eff=1.0,
):
    """FISP EPG (Weigel 2015), float64, batched over tissues: returns [B, N] complex128.

    States: F+[k], F-[k], Z[k], k = 0..K-1, each an array over the batch (stored as [B, K]).
    """
    t1 = np.atleast_1d(np.asarray(t1, dtype=np.float64))
    bsz = t1.size
    t2 = np.broadcast_to(np.asarray(t2, dtype=np.float64), (bsz,))
    b1 = np.broadcast_to(np.asarray(b1, dtype=np.float64), (bsz,))
    df = np.broadcast_to(np.asarray(df_hz, dtype=np.float64), (bsz,))
    n = len(flip_deg)
    K = n_states
    fp = np.zeros((bsz, K), np.complex128)
    fm = np.zeros((bsz, K), np.complex128)
    z = np.zeros((bsz, K), np.complex128)
    z[:, 0] = 1.0

    if ti_ms is not None:
        z[:, 0] = 1.0 - 2.0 * inv_eff
        e1 = np.exp(-ti_ms / t1)
        z[:, 0] = z[:, 0] * e1 + (1.0 - e1)

    def relax_precess(dt_ms):
        e1 = np.exp(-dt_ms / t1)[:, None]
        e2 = np.exp(-dt_ms / t2)[:, None]
        rot = np.exp(1j * 2.0 * np.pi * df * dt_ms * 1e-3)[:, None]
        fp[:] = fp * e2 * rot
        fm[:] = fm * e2 * np.conj(rot)
        z[:] = z * e1
        z[:, 0] += 1.0 - e1[:, 0]

    out = np.zeros((bsz, n), np.complex128)
    for i in range(n):
        a = np.deg2rad(flip_deg[i]) * b1
        phi = 0.0 if rf_phase_deg is None else np.deg2rad(rf_phase_deg[i])
        c2 = np.cos(a / 2) ** 2
        s2 = np.sin(a / 2) ** 2
        sa = np.sin(a)
        ca = np.cos(a)
        e = np.exp(1j * phi)
        T = [
            [c2, e**2 * s2, -1j * e * sa],
            [np.conj(e) ** 2 * s2, c2, 1j * np.conj(e) * sa],
            [-0.5j * np.conj(e) * sa, 0.5j * e * sa, ca],
        ]
        # RF: the same operator on every order k.
        for k in range(K):
            p, m, l = fp[:, k].copy(), fm[:, k].copy(), z[:, k].copy()
            fp[:, k] = T[0][0] * p + T[0][1] * m + T[0][2] * l
            fm[:, k] = T[1][0] * p + T[1][1] * m + T[1][2] * l
            z[:, k] = T[2][0] * p + T[2][1] * m + T[2][2] * l
        relax_precess(te_ms[i])
        out[:, i] = fp[:, 0]
        relax_precess(tr_ms[i] - te_ms[i])
        # Dephasing gradient: F+ up one order, F- down one order, Z unchanged.
        fp[:, 1:] = fp[:, :-1].copy()
        fm[:, :-1] = fm[:, 1:].copy()
        fm[:, -1] = 0.0
        fp[:, 0] = np.conj(fm[:, 0])
    return out


def ref_epg_scalar(flip_deg, tr_ms, te_ms, ti_ms, t1, t2, b1, df_hz, K, rf_phase_deg=None):
    """The same model for one tissue in plain Python complex scalars (cross-checks :func:`ref_epg`)."""
    import cmath

    fp, fm, z = [0j] * K, [0j] * K, [0j] * K
    z[0] = 1.0 + 0j
    if ti_ms is not None:
        e1 = math.exp(-ti_ms / t1)
        z[0] = -1.0 * e1 + 1 - e1
    out = []
    for i in range(len(flip_deg)):
        a = math.radians(flip_deg[i]) * b1
        phi = 0.0 if rf_phase_deg is None else math.radians(rf_phase_deg[i])
        for k in range(K):
            # Rotation in the transverse/longitudinal basis, written via Mx, My, Mz for independence:
            # F+ = Mx + i My, F- = conj(F+) of the -k state, Z = Mz; for k=0 F- = conj(F+).
            p, m, l = fp[k], fm[k], z[k]
            c, s = math.cos(a), math.sin(a)
            eip = cmath.exp(1j * phi)
            fp[k] = (1 + c) / 2 * p + eip**2 * (1 - c) / 2 * m - 1j * eip * s * l
            fm[k] = eip.conjugate() ** 2 * (1 - c) / 2 * p + (1 + c) / 2 * m + 1j * eip.conjugate() * s * l
            z[k] = -0.5j * eip.conjugate() * s * p + 0.5j * eip * s * m + c * l
        for dt, read in ((te_ms[i], True), (tr_ms[i] - te_ms[i], False)):
            e1, e2 = math.exp(-dt / t1), math.exp(-dt / t2)
            w = cmath.exp(2j * math.pi * df_hz * dt * 1e-3)
            fp = [x * e2 * w for x in fp]
            fm = [x * e2 * w.conjugate() for x in fm]
            z = [x * e1 for x in z]
            z[0] += 1 - e1
            if read:
                out.append(fp[0])
        fp = [None] + fp[:-1]
        fm = fm[1:] + [0j]
        fp[0] = fm[0].conjugate()
    return np.array(out)


def ref_water_fat(seq, ff, t1w, t2w, t1f, t2f, b1, df, field_T, n_states):
    args = (seq.flip_angles_deg, seq.tr_ms, seq.te_ms, seq.ti_ms)
    ph = None if seq.rf_phase_deg is None else seq.rf_phase_deg
    water = ref_epg(*args, t1w, t2w, b1, df, n_states, rf_phase_deg=ph)
    fat = np.zeros_like(water)
    for ppm, amp in zip(REF_FAT_PPM, REF_FAT_AMP):
        f = ppm * 1e-6 * REF_GAMMA_BAR * field_T
        fat += amp * ref_epg(*args, t1f, t2f, b1, np.asarray(df) + f, n_states, rf_phase_deg=ph)
    ff = np.asarray(ff)[:, None]
    return (1 - ff) * water + ff * fat


def ref_for(seq, t1, t2, b1, df, n_states, inv_eff=1.0):
    return ref_epg(
        seq.flip_angles_deg, seq.tr_ms, seq.te_ms, seq.ti_ms, t1, t2, b1, df, n_states,
        rf_phase_deg=seq.rf_phase_deg, inv_eff=inv_eff,
    )


def rel_err(ours, ref) -> float:
    """Worst over fingerprints of max |ours - ref| / max |ref|."""
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = np.asarray(ref)
    return float(np.max(np.abs(ours - ref).max(axis=-1) / np.abs(ref).max(axis=-1)))


# ---------------------------------------------------------------------------------------------------------
# Schedules and parameters
# ---------------------------------------------------------------------------------------------------------
def truncated(seq: MRFSequence, n: int, rf_phase_deg=None, name=None) -> MRFSequence:
    return MRFSequence(
        name=name or f"{seq.name}{n}",
        flip_angles_deg=seq.flip_angles_deg[:n],
        tr_ms=seq.tr_ms[:n],
        te_ms=seq.te_ms[:n],
        ti_ms=seq.ti_ms,
        readout=seq.readout,
        rf_phase_deg=rf_phase_deg,
    )


def with_phase(seq: MRFSequence, seed: int = 0) -> MRFSequence:
    """The schedule with non-trivial RF phases: quadratic (RF-spoiling-like) plus random jitter."""
    rng = np.random.default_rng(seed)
    n = np.arange(seq.n_frames)
    ph = (50.0 * n * (n + 1) / 2 + rng.uniform(-30, 30, seq.n_frames)) % 360.0
    return truncated(seq, seq.n_frames, rf_phase_deg=ph, name=seq.name + "_phase")


@pytest.fixture(scope="module")
def schedules():
    fisp300 = truncated(fisp_sequence(), 300)
    t1ff = t1ff_sequence()
    return {"fisp300": fisp300, "t1ff": t1ff}


def random_tissues(n: int, seed: int, df_fraction: float = 0.5):
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(200, 4000, n)
    t2 = rng.uniform(10, np.minimum(t1, 1500))
    b1 = rng.uniform(0.6, 1.3, n)
    df = rng.uniform(-100, 100, n)
    df[rng.random(n) >= df_fraction] = 0.0
    df[0] = 0.0
    df[1] = 37.0
    return t1, t2, b1, df


def tens(*arrays, dtype=torch.float64):
    return [torch.as_tensor(np.asarray(a), dtype=dtype) for a in arrays]


# ---------------------------------------------------------------------------------------------------------
# The reference against itself
# ---------------------------------------------------------------------------------------------------------
def test_reference_scalar_matches_vectorised():
    seq = with_phase(truncated(fisp_sequence(), 30), seed=3)
    vec = ref_for(seq, [900.0], [70.0], [0.9], [23.0], 8)[0]
    sca = ref_epg_scalar(seq.flip_angles_deg, seq.tr_ms, seq.te_ms, seq.ti_ms, 900.0, 70.0, 0.9, 23.0, 8,
                         rf_phase_deg=seq.rf_phase_deg)
    np.testing.assert_allclose(vec, sca, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# epg_fisp against the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n_states", [("fisp300", 48), ("t1ff", 32)])
@pytest.mark.parametrize("phase", [False, True], ids=["phase0", "rfphase"])
def test_fisp_matches_reference(schedules, name, n_states, phase):
    seq = schedules[name]
    if phase:
        seq = with_phase(seq, seed=11)
    t1, t2, b1, df = random_tissues(24, seed=len(name) * 10 + int(phase))
    ref = ref_for(seq, t1, t2, b1, df, n_states)

    # float64: complex path for everything (df passed as a tensor, zeros included).
    out64 = epg_fisp(seq, *tens(t1, t2, b1, df), n_states=n_states)
    assert out64.dtype == torch.complex128 and out64.shape == (24, seq.n_frames)
    assert rel_err(out64, ref) < TOL64

    # float32 inputs -> complex64; reference recomputed from the float32-rounded parameters.
    p32 = tens(t1, t2, b1, df, dtype=torch.float32)
    out32 = epg_fisp(seq, *p32, n_states=n_states)
    assert out32.dtype == torch.complex64
    ref32 = ref_for(seq, *(p.double().numpy() for p in p32), n_states)
    assert rel_err(out32, ref32) < TOL32

    # df None: the real fast path when there is no RF phase, otherwise complex with df = 0.
    zero = df == 0
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
        p = tens(t1[zero], t2[zero], b1[zero], dtype=dtype)
        out = epg_fisp(seq, *p, n_states=n_states)
        r = ref_for(seq, *(x.double().numpy() for x in p), 0.0, n_states)
        assert rel_err(out, r) < tol


def test_fisp_inversion_efficiency(schedules):
    seq = schedules["t1ff"]
    t1, t2, b1, df = random_tissues(6, seed=5)
    for eff in (0.0, 0.93):
        out = epg_fisp(seq, *tens(t1, t2, b1, df), n_states=24, inversion_efficiency=eff)
        assert rel_err(out, ref_for(seq, t1, t2, b1, df, 24, inv_eff=eff)) < TOL64


def test_no_inversion_schedule():
    base = truncated(t1ff_sequence(), 80)
    seq = MRFSequence(name="noinv", flip_angles_deg=base.flip_angles_deg, tr_ms=base.tr_ms, te_ms=base.te_ms)
    t1, t2, b1, df = random_tissues(5, seed=8)
    out = epg_fisp(seq, *tens(t1, t2, b1, df), n_states=20)
    assert rel_err(out, ref_for(seq, t1, t2, b1, df, 20)) < TOL64


# ---------------------------------------------------------------------------------------------------------
# Water / fat
# ---------------------------------------------------------------------------------------------------------
def test_fat_constants():
    np.testing.assert_allclose(fat_peak_amplitudes(), REF_FAT_AMP, rtol=1e-12)
    for field in (1.5, 3.0):
        np.testing.assert_allclose(
            fat_peak_frequencies_hz(field), REF_FAT_PPM * 1e-6 * REF_GAMMA_BAR * field, rtol=1e-12
        )
    # main peak at 3 T: about -434 Hz
    assert abs(fat_peak_frequencies_hz(3.0)[1] + 434.3) < 0.1


@pytest.mark.parametrize("field_T", [1.5, 3.0])
@pytest.mark.parametrize("phase", [False, True], ids=["phase0", "rfphase"])
def test_water_fat_matches_reference(schedules, field_T, phase):
    seq = schedules["t1ff"]
    if phase:
        seq = with_phase(seq, seed=4)
    n, K = 20, 24
    rng = np.random.default_rng(int(field_T * 10) + 100 * phase)
    ff = rng.uniform(0, 1, n)
    ff[0], ff[1] = 0.0, 1.0
    t1w, t2w, b1, df = random_tissues(n, seed=int(field_T * 7) + phase, df_fraction=0.7)
    t2w = np.minimum(t2w, 200.0)
    t1f = rng.uniform(250, 400, n)
    t2f = rng.uniform(40, 120, n)
    ref = ref_water_fat(seq, ff, t1w, t2w, t1f, t2f, b1, df, field_T, K)
    out = epg_water_fat(seq, *tens(ff, t1w, t2w, t1f, t2f, b1, df), field_strength_T=field_T, n_states=K)
    assert out.dtype == torch.complex128
    assert rel_err(out, ref) < TOL64
    # without df (water on the real path, fat always complex)
    ref0 = ref_water_fat(seq, ff, t1w, t2w, t1f, t2f, b1, np.zeros(n), field_T, K)
    out0 = epg_water_fat(seq, *tens(ff, t1w, t2w, t1f, t2f, b1), field_strength_T=field_T, n_states=K)
    assert rel_err(out0, ref0) < TOL64


def test_water_fat_limits(schedules):
    seq = schedules["t1ff"]
    n = 6
    rng = np.random.default_rng(9)
    t1w, t2w, b1, df = random_tissues(n, seed=9)
    t1f, t2f = rng.uniform(250, 400, n), rng.uniform(40, 120, n)
    args = tens(t1w, t2w, t1f, t2f, b1, df)
    for field in (1.5, 3.0):
        w = epg_water_fat(seq, torch.zeros(n, dtype=torch.float64), *args, field_strength_T=field, n_states=24)
        water = epg_fisp(seq, *tens(t1w, t2w, b1, df), n_states=24)
        assert (w - water).abs().max() < 1e-6
        f = epg_water_fat(seq, torch.ones(n, dtype=torch.float64), *args, field_strength_T=field, n_states=24)
        fat = epg_fat(seq, *tens(t1f, t2f, b1, df), field_strength_T=field, n_states=24)
        assert (f - fat).abs().max() < 1e-6
        # and the water/fat split really differs (the test would be vacuous otherwise)
        assert (water - fat).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Analytic checks
# ---------------------------------------------------------------------------------------------------------
def fisp_steady_state(alpha_rad, tr, t1, t2):
    """|S| of unbalanced SSFP (FISP, FID just after the pulse), Haenicke / Zur."""
    e1, e2 = math.exp(-tr / t1), math.exp(-tr / t2)
    ca = math.cos(alpha_rad)
    p = 1 - e1 * ca - e2**2 * (e1 - ca)
    q = e2 * (1 - e1) * (1 + ca)
    return math.tan(alpha_rad / 2) * (1 - (e1 - ca) * (1 - e2**2) / math.sqrt(p * p - q * q))


@pytest.mark.parametrize(
    "alpha,tr,t1,t2", [(30.0, 10.0, 800.0, 100.0), (60.0, 8.0, 1200.0, 50.0), (15.0, 12.0, 500.0, 200.0)]
)
def test_constant_schedule_steady_state(alpha, tr, t1, t2):
    n = 3000
    seq = MRFSequence(name="const", flip_angles_deg=np.full(n, alpha), tr_ms=np.full(n, tr), te_ms=np.zeros(n))
    s = epg_fisp(seq, torch.tensor([t1], dtype=torch.float64), torch.tensor([t2], dtype=torch.float64),
                 n_states=200)
    expected = fisp_steady_state(math.radians(alpha), tr, t1, t2)
    got = float(s[0, -1].abs())
    assert abs(got - expected) / expected < 1e-4
    # the last readouts are steady
    assert float((s[0, -10:].abs() - got).abs().max()) < 1e-8


def test_first_readout_phase_convention():
    seq = MRFSequence(name="90", flip_angles_deg=[90.0, 10.0], tr_ms=[10.0, 10.0], te_ms=[0.0, 0.0])
    one = torch.tensor([1000.0], dtype=torch.float64)
    hundred = torch.tensor([100.0], dtype=torch.float64)
    for df in (None, torch.tensor([0.0], dtype=torch.float64)):
        s = epg_fisp(seq, one, hundred, df_hz=df, n_states=4)
        assert abs(complex(s[0, 0]) - (-1j)) < 1e-12
    # inversion then TI: Mz = 1 - 2 E1 < 0, so the signal flips to +i|Mz|
    ti = 10.0
    inv = MRFSequence(name="90inv", flip_angles_deg=[90.0, 10.0], tr_ms=[10.0, 10.0], te_ms=[0.0, 0.0], ti_ms=ti)
    s = epg_fisp(inv, one, hundred, n_states=4)
    mz = 1 - 2 * math.exp(-ti / 1000.0)
    assert mz < 0
    assert abs(complex(s[0, 0]) - (-1j * mz)) < 1e-12
    # RF phase 90 deg (pulse about y): first signal is real, +1
    ph = MRFSequence(name="90y", flip_angles_deg=[90.0], tr_ms=[10.0], te_ms=[0.0], rf_phase_deg=[90.0])
    s = epg_fisp(ph, one, hundred, n_states=4)
    assert abs(complex(s[0, 0]) - 1.0) < 1e-12
    # off-resonance: F+ gains phase +2 pi df TE
    te = MRFSequence(name="90te", flip_angles_deg=[90.0], tr_ms=[10.0], te_ms=[2.0])
    s = epg_fisp(te, one, hundred, df_hz=torch.tensor([50.0], dtype=torch.float64), n_states=4)
    expected = -1j * math.exp(-2.0 / 100.0) * np.exp(1j * 2 * math.pi * 50.0 * 2e-3)
    assert abs(complex(s[0, 0]) - expected) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Paths agree
# ---------------------------------------------------------------------------------------------------------
def test_real_fast_path_equals_complex_path(schedules):
    for seq in schedules.values():
        t1, t2, b1, _ = random_tissues(16, seed=21)
        p = tens(t1, t2, b1)
        fast = epg_fisp(seq, *p, n_states=40)
        slow = epg_fisp(seq, *p, df_hz=torch.zeros(16, dtype=torch.float64), n_states=40)
        also_fast = epg_fisp(seq, *p, df_hz=0.0, n_states=40)
        assert (fast - slow).abs().max() < 1e-6
        assert torch.equal(fast, also_fast)
        assert fast.real.abs().max() == 0  # real path: purely imaginary F+ by construction


@pytest.mark.parametrize("with_df", [False, True])
def test_inplace_and_autograd_paths_agree(schedules, with_df):
    seq = schedules["t1ff"]
    t1, t2, b1, df = random_tissues(8, seed=31)
    p = tens(t1, t2, b1, df)
    if not with_df:
        p[3] = None
    with torch.no_grad():
        a = epg_fisp(seq, *p, n_states=32)
    q = [None if x is None else x.clone().requires_grad_(True) for x in p]
    b = epg_fisp(seq, *q, n_states=32)
    assert b.requires_grad
    assert (a - b.detach()).abs().max() < 1e-6
    # and a plain call (grad enabled, no input requiring grad) takes the in-place path with the same result
    c = epg_fisp(seq, *p, n_states=32)
    assert not c.requires_grad
    assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------
def _small_seq(n=40, phase=False):
    seq = truncated(fisp_sequence(), n)
    return with_phase(seq, seed=2) if phase else seq


def test_gradcheck_tissue_parameters():
    torch.manual_seed(0)
    t1 = torch.tensor([400.0, 1100.0, 2500.0], dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([40.0, 90.0, 300.0], dtype=torch.float64, requires_grad=True)
    b1 = torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64, requires_grad=True)
    df = torch.tensor([-30.0, 0.0, 55.0], dtype=torch.float64, requires_grad=True)
    for phase in (False, True):
        seq = _small_seq(phase=phase)

        def f_complex(t1, t2, b1, df):
            return torch.view_as_real(epg_fisp(seq, t1, t2, b1, df, n_states=16))

        assert torch.autograd.gradcheck(
            f_complex, (t1, t2, b1, df), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
        )

    seq = _small_seq()

    def f_real(t1, t2, b1):  # the real fast path
        return torch.view_as_real(epg_fisp(seq, t1, t2, b1, n_states=16))

    assert torch.autograd.gradcheck(
        f_real, (t1, t2, b1), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True
    )


def test_gradcheck_full_jacobian_small():
    """Every entry of the Jacobian (not fast_mode's random projection) on a small problem."""
    seq = with_phase(truncated(fisp_sequence(), 12), seed=5)
    p = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for v in ([500.0, 1500.0], [50.0, 200.0], [0.9, 1.1], [-40.0, 25.0])]

    def f(t1, t2, b1, df):
        return torch.view_as_real(epg_fisp(seq, t1, t2, b1, df, n_states=8))

    assert torch.autograd.gradcheck(f, tuple(p), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_wrt_rf_phase():
    base = SequenceTensors.from_sequence(_small_seq(20), dtype=torch.float64)
    phase = torch.linspace(0.0, 3.0, 20, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor([800.0, 1500.0], dtype=torch.float64)
    t2 = torch.tensor([60.0, 150.0], dtype=torch.float64)

    def f(phase):
        st = SequenceTensors(flip_rad=base.flip_rad, tr_ms=base.tr_ms, te_ms=base.te_ms, ti_ms=base.ti_ms,
                             rf_phase_rad=phase)
        return torch.view_as_real(epg_fisp(st, t1, t2, n_states=12))

    assert torch.autograd.gradcheck(f, (phase,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_flip_angles():
    base = SequenceTensors.from_sequence(_small_seq(), dtype=torch.float64)
    t1 = torch.tensor([400.0, 1100.0, 2500.0], dtype=torch.float64)
    t2 = torch.tensor([40.0, 90.0, 300.0], dtype=torch.float64)
    df = torch.tensor([-30.0, 0.0, 55.0], dtype=torch.float64)
    flip = base.flip_rad.clone().requires_grad_(True)

    for dfx in (None, df):

        def f(flip):
            st = SequenceTensors(flip_rad=flip, tr_ms=base.tr_ms, te_ms=base.te_ms, ti_ms=base.ti_ms,
                                 rf_phase_rad=None)
            return torch.view_as_real(epg_fisp(st, t1, t2, None, dfx, n_states=16))

        assert torch.autograd.gradcheck(f, (flip,), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_water_fat_gradient_ff_finite_difference():
    seq = _small_seq()
    ff = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    t1w = torch.tensor([900.0, 1200.0, 1500.0], dtype=torch.float64, requires_grad=True)
    t2w = torch.tensor([40.0, 60.0, 80.0], dtype=torch.float64)
    t1f = torch.tensor([300.0, 350.0, 380.0], dtype=torch.float64)
    t2f = torch.tensor([60.0, 80.0, 100.0], dtype=torch.float64)
    df = torch.tensor([-20.0, 0.0, 15.0], dtype=torch.float64)

    def f(ff, t1w):
        return torch.view_as_real(epg_water_fat(seq, ff, t1w, t2w, t1f, t2f, None, df, n_states=16))

    assert torch.autograd.gradcheck(f, (ff, t1w), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # explicit central difference of a scalar loss w.r.t. ff
    w = torch.randn(3, seq.n_frames, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = (f(ff, t1w) * w).sum()
    (g,) = torch.autograd.grad(loss, ff)
    h = 1e-5
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = h
        with torch.no_grad():
            fd = ((f(ff + e, t1w) * w).sum() - (f(ff - e, t1w) * w).sum()) / (2 * h)
        assert abs(float(fd) - float(g[i])) < 1e-7 * max(1.0, abs(float(fd)))


# ---------------------------------------------------------------------------------------------------------
# Default truncation
# ---------------------------------------------------------------------------------------------------------
def test_default_states_accuracy():
    worst = {}
    for seq in (fisp_sequence(), t1ff_sequence()):
        full_k = seq.n_frames // 2 + 2
        for t2 in (20.0, 100.0, 500.0, 1000.0, 2000.0):
            t1 = torch.tensor([max(t2, 300.0), 1500.0, 5000.0], dtype=torch.float64)
            t2s = torch.full_like(t1, t2)
            k_default = default_n_states(seq.n_frames, t2, float(seq.tr_ms.min()))
            default = epg_fisp(seq, t1, t2s)
            full = epg_fisp(seq, t1, t2s, n_states=full_k)
            # the default used by epg_fisp is the documented rule
            assert torch.equal(default, epg_fisp(seq, t1, t2s, n_states=k_default))
            worst[(seq.name, t2, k_default)] = rel_err(default, full.numpy())
    assert max(worst.values()) < 1e-3, worst


def test_default_n_states_rule():
    assert default_n_states(1000, 2000.0, 11.0) % 16 == 0
    assert default_n_states(10, 2000.0, 11.0) == 10 // 2 + 2
    assert default_n_states(1000, 2000.0, 11.0) >= default_n_states(1000, 100.0, 11.0)


# ---------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
def test_cuda_matches_reference(schedules):
    seq = schedules["fisp300"]
    t1, t2, b1, df = random_tissues(16, seed=41)
    ref = ref_for(seq, t1, t2, b1, df, 32)
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
        p = [x.cuda() for x in tens(t1, t2, b1, df, dtype=dtype)]
        out = epg_fisp(seq, *p, n_states=32)
        assert out.is_cuda
        r = ref if dtype == torch.float64 else ref_for(seq, *(x.double().cpu().numpy() for x in p), 32)
        assert rel_err(out, r) < tol
        zero = df == 0
        fast = epg_fisp(seq, *(x[torch.as_tensor(zero).cuda()] for x in p[:3]), n_states=32)
        rz = ref_for(seq, t1[zero], t2[zero], b1[zero], 0.0, 32) if dtype == torch.float64 else \
            ref_for(seq, *(x[torch.as_tensor(zero).cuda()].double().cpu().numpy() for x in p[:3]), 0.0, 32)
        assert rel_err(fast, rz) < tol
