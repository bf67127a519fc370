"""RawStudy -> arrays for the reconstructions, after checking that the header and the readouts agree.

Checks raise ValueError naming the field and what to do: an empty acquisition list, a coil count that differs
from ``acquisitionSystemInformation.receiverChannels``, a trajectory kind the pipeline cannot use, non-Cartesian
readouts without ``trajectory`` coordinates, coordinates in the wrong units, lines outside the encoded matrix.

Readout oversampling: scanners often sample the readout with twice the field of view (``encodedSpace`` x
matrix and FOV twice those of ``reconSpace``, e.g. ``ismrmrd_generate_cartesian_shepp_logan``) or store twice
the encoded matrix's samples. Each readout is inverse-FFT'd, cropped to the reconstructed field of view and
FFT'd back, so every operator downstream sees k-space on the grid of the image it produces.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipelines.io.disk_rows import ROW_CHUNK
from pipelines.types import RawStudy

log = logging.getLogger(__name__)

NONCARTESIAN_KINDS = ("radial", "goldenangle", "spiral", "other")


def _where(raw: RawStudy) -> str:
    return raw.source_path or "raw data"


def _header(raw: RawStudy) -> Any:  # an ismrmrd.xsd.ismrmrdHeader or None; ismrmrd ships no type information
    """The parsed ISMRMRD header, or None when the study carries none (arrays built in a notebook)."""
    if not raw.header_xml.strip():
        return None
    import ismrmrd.xsd as x

    try:
        return x.CreateFromDocument(raw.header_xml.encode("utf-8"))
    except Exception as e:  # xsdata parser errors
        raise ValueError(f"{_where(raw)}: the ISMRMRD header does not parse ({e})") from e


def validate_raw(raw: RawStudy, kind: str) -> None:
    """Common checks; ``kind`` 'cartesian' or 'noncartesian' is what the calling pipeline reconstructs."""
    where = _where(raw)
    if raw.data.ndim != 3 or raw.data.shape[0] == 0:
        raise ValueError(
            f"{where}: the acquisition list is empty (RawStudy.data has shape {raw.data.shape}); nothing to reconstruct"
        )
    if kind == "cartesian" and raw.trajectory_kind != "cartesian":
        raise ValueError(
            f"{where}: encoding.trajectory is {raw.trajectory_kind!r} but this pipeline reconstructs "
            "Cartesian data; use the noncartesian_recon pipeline"
        )
    if kind == "noncartesian":
        if raw.trajectory_kind == "cartesian":
            raise ValueError(
                f"{where}: encoding.trajectory is 'cartesian' but this pipeline reconstructs "
                "radial / spiral data; use the cartesian_recon pipeline"
            )
        if raw.trajectory is None or raw.trajectory.shape[-1] < 2:
            raise ValueError(
                f"{where}: {raw.trajectory_kind} data without k-space coordinates: the acquisitions "
                "carry no 'trajectory' (trajectory_dimensions = 0); ask the scanner to send them"
            )
        _check_trajectory(raw, where)
    header = _header(raw)
    sysinfo = None if header is None else header.acquisitionSystemInformation
    expected = None if sysinfo is None else sysinfo.receiverChannels
    if expected is not None and int(expected) != raw.data.shape[1]:
        raise ValueError(
            f"{where}: the acquisitions hold {raw.data.shape[1]} coils but the header's "
            f"acquisitionSystemInformation.receiverChannels says {int(expected)}"
        )


def _check_trajectory(raw: RawStudy, where: str) -> None:
    """Coordinates finite and in cycles/FOV within the encoded matrix (every later step trusts them)."""
    traj = raw.trajectory[..., :2]  # type: ignore[index]
    bad = int((~np.isfinite(traj)).sum())
    if bad:
        raise ValueError(f"{where}: {bad} trajectory coordinates are NaN or infinite")
    n = max(raw.matrix)
    kmax = float(np.abs(traj).max()) if traj.size else 0.0
    if kmax <= 0.5 + 1e-6 and n > 2:
        raise ValueError(
            f"{where}: trajectory coordinates reach only {kmax:.3g}: they look normalised to "
            f"[-0.5, 0.5); ISMRMRD expects cycles/FOV in [-N/2, N/2) (multiply by {n})"
        )
    if kmax > n / 2 * 1.01:
        raise ValueError(
            f"{where}: trajectory coordinates reach {kmax:.4g} cycles/FOV, beyond the encoded "
            f"matrix's N/2 = {n / 2:g}; check encodedSpace.matrixSize or the trajectory units"
        )


def _slices(raw: RawStudy) -> np.ndarray:
    return np.unique(raw.slice)


def _crop_readout(data: np.ndarray, keep: int) -> np.ndarray:
    """Readouts [..., n] -> [..., keep]: centred IFFT, crop the central ``keep`` pixels, FFT back."""
    n = data.shape[-1]
    if keep == n:
        return data
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(data, axes=-1), axis=-1, norm="ortho"), axes=-1)
    start = n // 2 - keep // 2
    img = img[..., start : start + keep]
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img, axes=-1), axis=-1, norm="ortho"), axes=-1)


def readout_keep(raw: RawStudy) -> int:
    """Samples per readout after removing readout oversampling (see module docstring)."""
    n = raw.data.shape[-1]
    enc_x = raw.matrix[1]
    if n not in (enc_x, 2 * enc_x):
        raise ValueError(
            f"{_where(raw)}: readouts have {n} samples but encodedSpace.matrixSize.x is {enc_x} "
            "(expected equal, or twice for readout oversampling)"
        )
    spacing = raw.fov_mm[1] / enc_x  # mm per pixel of the readout image, whatever the oversampling
    recon_fov = raw.geometry.pixel_spacing_mm[1] * raw.geometry.matrix[1]
    keep = int(round(recon_fov / spacing)) if recon_fov > 0 else enc_x
    return min(n, keep if 0 < keep <= n else enc_x)


def _centre_line(raw: RawStudy) -> int:
    header = _header(raw)
    try:
        c = header.encoding[0].encodingLimits.kspace_encoding_step_1.center
        return int(c) if c is not None else raw.matrix[0] // 2
    except AttributeError:
        return raw.matrix[0] // 2


def cartesian_kspace(raw: RawStudy, frame: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kspace [S, C, ny, nx] complex64, mask [S, ny, nx] bool) with slices in ``raw.slice`` order.

    ``frame`` None averages every repetition line by line (each sampled line is the mean of its repetitions,
    so interleaved repetitions fill k-space); an int keeps that repetition only.
    """
    validate_raw(raw, "cartesian")
    where = _where(raw)
    ny = raw.matrix[0]
    rows = np.arange(raw.data.shape[0])
    if frame is not None:
        rows = rows[raw.frame == int(frame)]
        if rows.size == 0:
            raise ValueError(
                f"{where}: no acquisitions with repetition {frame} (repetitions present: "
                f"{', '.join(map(str, np.unique(raw.frame)[:10]))})"
            )
    line = raw.line[rows] - _centre_line(raw) + ny // 2
    if line.min() < 0 or line.max() >= ny:
        raise ValueError(
            f"{where}: idx.kspace_encode_step_1 up to {int(raw.line.max())} falls outside the "
            f"encoded matrix ({ny} lines, centre {_centre_line(raw)})"
        )
    keep = readout_keep(raw)
    slices = _slices(raw)
    s_index = np.searchsorted(slices, raw.slice[rows])
    k = np.zeros((slices.size, raw.data.shape[1], ny, keep), dtype=np.complex128)
    count = np.zeros((slices.size, ny), dtype=np.int64)
    for lo in range(0, rows.size, ROW_CHUNK):  # a chunk of readouts at a time: the study may be on disk (DiskRows)
        part = slice(lo, lo + ROW_CHUNK)
        np.add.at(k.transpose(0, 2, 1, 3), (s_index[part], line[part]), _crop_readout(raw.data[rows[part]], keep))
    np.add.at(count, (s_index, line), 1)
    k /= np.maximum(count, 1)[:, None, :, None]
    mask = np.broadcast_to((count > 0)[:, :, None], (slices.size, ny, keep)).copy()
    return k.astype(np.complex64), mask


def noncartesian_samples(raw: RawStudy) -> tuple[np.ndarray, np.ndarray]:
    """(data [S, C, M] complex64, k [M, 2] float32 cycles/FOV): all readouts of all frames of each slice.

    Every slice must carry the same readouts (the same trajectory), as stacks of stars / spirals do.
    """
    validate_raw(raw, "noncartesian")
    where = _where(raw)
    traj = raw.trajectory[..., :2]  # type: ignore[index]
    slices = _slices(raw)
    rows0 = np.flatnonzero(raw.slice == slices[0])
    k = traj[rows0].reshape(-1, 2).astype(np.float32)
    data = []
    for s in slices:
        rows = np.flatnonzero(raw.slice == s)
        if rows.size != rows0.size or not np.allclose(traj[rows], traj[rows0], atol=1e-3):
            raise ValueError(
                f"{where}: slice {int(s)} has different readouts than slice {int(slices[0])}; "
                "every slice must share one trajectory"
            )
        data.append(raw.data[rows].transpose(1, 0, 2).reshape(raw.data.shape[1], -1))
    return np.stack(data).astype(np.complex64), k


def te_cycle_aliasing(raw: RawStudy, te_ms: np.ndarray) -> str | None:
    """Why water/fat separation from these raw data is unreliable, or None.

    A schedule that cycles TE every p frames (t1ff: 4) encodes fat in that cycle. When the readouts repeat with a
    period that is a multiple of p (spiral arm f mod 24, say), each TE of the cycle is only ever sampled by the
    same subset of readouts: the water/fat information is then aliased coherently with the undersampling (measured:
    10-49 percentage points of fat fraction error on the thigh phantom, against 3-8 with a golden-angle order; see
    BENCHMARKS.md, "Fat fraction from raw t1ff data"). Readouts are compared by their k-space positions.
    """
    te = np.asarray(te_ms, dtype=np.float64)
    period = next((p for p in range(1, min(17, te.size)) if np.allclose(te[p:], te[:-p], rtol=0, atol=1e-6)), None)
    if raw.trajectory is None or period is None or period == 1:
        return None
    first = np.flatnonzero(raw.slice == raw.slice.min())
    keys: dict[int, set[bytes]] = {}
    for row in first:
        keys.setdefault(int(raw.frame[row]), set()).add(np.round(raw.trajectory[row], 2).tobytes())
    per_frame = {f: b"".join(sorted(k)) for f, k in keys.items()}
    distinct = set(per_frame.values())
    if len(distinct) >= len(per_frame):  # no readout repeats (golden angle): every TE sees new ones
        return None
    by_te = [{k for f, k in per_frame.items() if f % period == r} for r in range(period)]
    seen = max(len(s) for s in by_te)
    if seen > len(distinct) // 2:
        return None
    return (
        f"fat fraction unreliable: the schedule cycles TE every {period} frames and the {len(distinct)} distinct "
        f"readouts repeat in step with it, so each TE is sampled by at most {seen} of them (water/fat aliased with "
        "the undersampling); acquire with a readout order not commensurate with the TE cycle (e.g. golden angle)"
    )


# Below this fraction of one image's Nyquist grid reached by the readouts of all frames, thin structures lose their
# own signal to their neighbours (radial t1ff thigh: 95 % at 128² with one spoke per frame, worst muscle FF error
# 3.9 pp; 71 % at 256², 5.7 pp; 100 % with 2-4 spokes per frame, <= 2.0 pp; BENCHMARKS.md).
MIN_COVERAGE = 0.99


def kspace_coverage(raw: RawStudy) -> float:
    """Fraction of the Nyquist grid cells of one image (inside the inscribed ellipse) that the readouts of all
    frames of the first slice reach, to the nearest cell; Cartesian: the fraction of phase-encode lines sampled."""
    ny, nx = raw.matrix
    first = np.flatnonzero(raw.slice == raw.slice.min())
    if raw.trajectory_kind == "cartesian" or raw.trajectory is None:
        return float(np.unique(raw.line[first]).size / max(ny, 1))
    k = raw.trajectory[first][..., :2].reshape(-1, 2)
    ix = np.rint(k[:, 0]).astype(np.int64) + nx // 2
    iy = np.rint(k[:, 1]).astype(np.int64) + ny // 2
    ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    hit = np.zeros((ny, nx), dtype=bool)
    hit[iy[ok], ix[ok]] = True
    yy, xx = np.mgrid[:ny, :nx]
    inside = ((yy - ny // 2) / (ny / 2)) ** 2 + ((xx - nx // 2) / (nx / 2)) ** 2 <= 1
    return float(hit[inside].mean())


def coverage_note(raw: RawStudy) -> str | None:
    """Why small structures' fat fraction is biased in these raw data, or None (see :data:`MIN_COVERAGE`).

    Non-Cartesian only: that is where it was measured. A Cartesian scheme that never samples its outermost lines
    (equidistant masks drop a few) loses resolution, not a known number of FF points."""
    if raw.trajectory_kind == "cartesian" or raw.trajectory is None:
        return None
    c = kspace_coverage(raw)
    if c >= MIN_COVERAGE:
        return None
    ny, nx = raw.matrix
    return (
        f"k-space under-covered: all readouts together reach {100 * c:.0f} % of one {ny}x{nx} image's Nyquist grid, "
        "so structures a few voxels thin take signal from their neighbours (fat fraction of thin muscles biased by "
        "several points); acquire more readouts per frame, or reconstruct a smaller matrix"
    )
