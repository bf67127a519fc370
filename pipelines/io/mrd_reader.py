"""Read ISMRMRD raw data -- an HDF5 file or the objects of an MRD stream -- into a :class:`RawStudy`.

What ends up in the RawStudy:

* Every imaging acquisition, in file / stream order, as arrays (``data`` [acq, coils, samples] complex64,
  ``trajectory`` [acq, samples, dims] float32 or None for Cartesian data, ``line`` = ``idx.kspace_encode_step_1``,
  ``frame`` = ``idx.repetition``, ``slice`` = ``idx.slice``, ``flags``).
* Noise-adjust scans (``ACQ_IS_NOISE_MEASUREMENT``) are left out: RawStudy has no field for them and no pipeline
  uses them yet (the simulator's noise is white and uncorrelated). A count is logged.
* All imaging acquisitions must share one coil count and one sample count (MRF readouts do); anything else is a
  ValueError that names the problem rather than a ragged array.

Geometry convention (inverse of ``pipelines.sim.mrd_writer``): the acquisition ``position`` is the encoding centre of
the slice and ``read_dir`` / ``phase_dir`` are direction cosines, all in the DICOM patient system (LPS,
mm). ImageOrientationPatient = read_dir + phase_dir; ImagePositionPatient (centre of the first pixel) =
position - (Nx//2) dx * read_dir - (Ny//2) dy * phase_dir, with matrix and pixel size from ``reconSpace``
(``position`` is where the k-space phase is zero: pixel N//2 of the centred FFT, which for even N is half a pixel
past the middle of the FOV).
One position per distinct ``idx.slice`` (from its first acquisition), in slice-index order.

HDF5 reads are bulk reads of the compound ``data`` dataset (headers in one read, sample arrays in one read), not
one ``ismrmrd.Dataset.read_acquisition`` call per readout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import ismrmrd.xsd as x
import numpy as np
from ismrmrd.hdf5 import acquisition_header_dtype

from pipelines.io.disk_rows import SPILL_BYTES, DiskRows, RowWriter
from pipelines.physics.sequences import sequence_from_ismrmrd
from pipelines.types import Geometry, RawStudy, StudyInfo

log = logging.getLogger(__name__)

_NOISE_BIT = np.uint64(1) << np.uint64(ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1)
# Read HDF5 acquisitions in blocks of about this many bytes of samples. HDF5 converts a block's variable-length
# samples whole (even when only the headers are asked for), so a block must stay small against a study: 4096 rows of
# 16 coils x 512 samples were 268 MB.
_BLOCK_BYTES = 16 * 1024**2
_SIZE_FIELDS = ("active_channels", "number_of_samples", "trajectory_dimensions")


def header_xml(header: x.ismrmrdHeader) -> str:
    """The header as an XML document declared as UTF-8 (the one rendering used for files, streams and RawStudy).

    ismrmrd 1.15's ``header.toXML()`` declares ``encoding="ascii"`` but writes non-ASCII characters (e.g. a patient
    called Müller) unescaped, and its own parser then rejects the document. Declaring UTF-8 -- what the bytes on
    the wire and in the HDF5 file actually are -- makes the document self-consistent for every parser.
    """
    return x.ToXML(header, encoding="UTF-8")


# ---- HDF5 access -------------------------------------------------------------------------------------------------
def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not an ISMRMRD file (not readable as HDF5: {e})") from e


def _group(f: h5py.File, path: Path, dataset: str) -> h5py.Group:
    if dataset not in f or not isinstance(f[dataset], h5py.Group):
        groups = ", ".join(sorted(f.keys())) or "none"
        raise ValueError(f"{path}: not an ISMRMRD file: no group /{dataset} (groups present: {groups})")
    return f[dataset]


def _xml_of(grp: h5py.Group, path: Path) -> str:
    if "xml" not in grp:
        raise ValueError(f"{path}: ISMRMRD group /{grp.name.strip('/')} has no header (no 'xml' dataset)")
    try:
        raw = grp["xml"][0]
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: cannot read the ISMRMRD header ({e}); the file may be truncated") from e
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def _acq_dataset(grp: h5py.Group, path: Path) -> h5py.Dataset:
    if "data" not in grp or grp["data"].shape[0] == 0:
        raise ValueError(f"{path}: the ISMRMRD file holds no acquisitions ('data' missing or empty)")
    ds = grp["data"]
    names = ds.dtype.names or ()
    if not {"head", "data", "traj"} <= set(names):
        raise ValueError(f"{path}: /{grp.name.strip('/')}/data is not an ISMRMRD acquisition table (fields {names})")
    return ds


def _block_rows(ds: h5py.Dataset, path: Path) -> int:
    """Rows per block: about :data:`_BLOCK_BYTES` of samples, sized from the first 16 rows' headers."""
    probe = _read_block(ds, 0, min(int(ds.shape[0]), 16), path)[0]
    row_bytes = int(
        (probe["active_channels"].astype(np.int64) * probe["number_of_samples"] * 8).max(initial=0)
        + (probe["number_of_samples"].astype(np.int64) * probe["trajectory_dimensions"] * 4).max(initial=0)
    )
    return max(1, _BLOCK_BYTES // (row_bytes + acquisition_header_dtype.itemsize))


def _read_block(ds: h5py.Dataset, start: int, stop: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Headers (structured), data and trajectory (object arrays of float32 vectors) of rows [start, stop)."""
    try:
        rows = ds[start:stop]
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path}: cannot read acquisitions {start}-{stop - 1} ({e}); the file may be truncated or corrupt"
        ) from e
    heads = np.ascontiguousarray(rows["head"]).astype(acquisition_header_dtype, copy=False)
    return heads, rows["data"], rows["traj"]


def read_hdf5_header(path: str | Path, dataset: str = "dataset") -> str:
    """The ISMRMRD header XML of an HDF5 file."""
    path = Path(path)
    with _open(path) as f:
        return _xml_of(_group(f, path, dataset), path)


def iter_hdf5_acquisitions(path: str | Path, dataset: str = "dataset") -> Iterator[ismrmrd.Acquisition]:
    """Every acquisition of an ISMRMRD HDF5 file as ``ismrmrd.Acquisition`` (noise scans included), read in blocks."""
    path = Path(path)
    with _open(path) as f:
        ds = _acq_dataset(_group(f, path, dataset), path)
        block = _block_rows(ds, path)
        for start in range(0, ds.shape[0], block):
            heads, data, traj = _read_block(ds, start, min(start + block, ds.shape[0]), path)
            for h, d, t in zip(heads, data, traj, strict=True):
                n_s, n_c, n_d = int(h["number_of_samples"]), int(h["active_channels"]), int(h["trajectory_dimensions"])
                yield ismrmrd.Acquisition(
                    h.tobytes(),
                    data=np.asarray(d, dtype=np.float32).view(np.complex64).reshape(n_c, n_s).copy(),
                    trajectory=np.asarray(t, dtype=np.float32).reshape(n_s, n_d).copy(),
                )


# ---- assembling a RawStudy ---------------------------------------------------------------------------------------
def _str_param(header: x.ismrmrdHeader, name: str) -> str | None:
    up = header.userParameters
    if up is None:
        return None
    for p in up.userParameterString:
        if p.name == name:
            return p.value
    return None


def _dicom_date(d: Any) -> str:
    return "" if d is None else f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _dicom_time(t: Any) -> str:
    return "" if t is None else f"{t.hour:02d}{t.minute:02d}{t.second:02d}"


def study_info_from_header(header: x.ismrmrdHeader) -> StudyInfo:
    """Patient / study / series identifiers of an ISMRMRD header (empty strings where it says nothing)."""
    subj = header.subjectInformation
    st = header.studyInformation
    meas = header.measurementInformation
    sysinfo = header.acquisitionSystemInformation
    accession = _str_param(header, "accession_number")
    if accession is None and st is not None and st.accessionNumber is not None:
        accession = str(st.accessionNumber)
    info = StudyInfo(
        patient_id=(subj and subj.patientID) or "",
        patient_name=(subj and subj.patientName) or "",
        patient_birth_date=_dicom_date(subj and subj.patientBirthdate),
        patient_sex=(subj and subj.patientGender) or "",
        study_instance_uid=(st and st.studyInstanceUID) or "",
        study_id=(st and st.studyID) or "",
        study_date=_dicom_date(st and st.studyDate),
        study_time=_dicom_time(st and st.studyTime),
        accession_number=accession or "",
        study_description=(st and st.studyDescription) or "",
        referring_physician=(st and st.referringPhysicianName) or "",
        series_instance_uid=_str_param(header, "series_instance_uid") or "",
        series_number=int(meas.initialSeriesNumber) if meas is not None and meas.initialSeriesNumber is not None else 1,
        series_description=(meas and meas.seriesDescription) or "",
        protocol_name=(meas and meas.protocolName) or "",
        frame_of_reference_uid=(meas and meas.frameOfReferenceUID) or "",
        institution_name=(sysinfo and sysinfo.institutionName) or "",
        station_name=(sysinfo and sysinfo.stationName) or "",
    )
    if sysinfo is not None and sysinfo.systemFieldStrength_T is not None:
        info.field_strength_T = float(sysinfo.systemFieldStrength_T)
    elif header.experimentalConditions is not None:
        info.field_strength_T = round(header.experimentalConditions.H1resonanceFrequency_Hz / 42.577478e6, 3)
    if sysinfo is not None and sysinfo.systemVendor:
        info.manufacturer = sysinfo.systemVendor
    return info


def _geometry(header: x.ismrmrdHeader, heads: np.ndarray, where: str) -> Geometry:
    recon = header.encoding[0].reconSpace
    mx, my = int(recon.matrixSize.x), int(recon.matrixSize.y)
    fov_x, fov_y, fov_z = float(recon.fieldOfView_mm.x), float(recon.fieldOfView_mm.y), float(recon.fieldOfView_mm.z)
    dx, dy = fov_x / mx, fov_y / my
    row = heads["read_dir"][0].astype(np.float64)
    col = heads["phase_dir"][0].astype(np.float64)
    valid_dirs = bool(np.isclose(np.linalg.norm(row), 1, atol=1e-3) and np.isclose(np.linalg.norm(col), 1, atol=1e-3))
    if not valid_dirs:
        log.warning("%s: acquisitions carry no valid read/phase directions; assuming an axial slice", where)
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    slices = heads["idx"]["slice"]
    positions = []
    for s in np.unique(slices):
        first = int(np.argmax(slices == s))
        # Geometry has one orientation for the stack; a slice tilted against slice 0 would be mispositioned.
        if valid_dirs and not (
            np.allclose(heads["read_dir"][first], row, atol=1e-3)
            and np.allclose(heads["phase_dir"][first], col, atol=1e-3)
        ):
            log.warning(
                "%s: slice %d is not parallel to slice %d (read/phase directions differ); "
                "its images get slice %d's orientation",
                where,
                int(s),
                int(slices[0]),
                int(slices[0]),
            )
        centre = heads["position"][first].astype(np.float64)
        # The encoding centre (k-space phase origin) is pixel (N//2) of the centred FFT, not the middle of the FOV.
        positions.append(centre - row * ((mx // 2) * dx) - col * ((my // 2) * dy))
    meas = header.measurementInformation
    return Geometry(
        matrix=(my, mx),
        pixel_spacing_mm=(dy, dx),
        slice_thickness_mm=fov_z,
        orientation=(float(row[0]), float(row[1]), float(row[2]), float(col[0]), float(col[1]), float(col[2])),
        positions=np.asarray(positions, dtype=np.float64),
        frame_of_reference_uid=(meas and meas.frameOfReferenceUID) or None,
    )


def _imaging_rows(heads: np.ndarray, where: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The rows of ``heads`` that are not noise scans, and their one (coils, samples, trajectory dimensions)."""
    keep = (heads["flags"] & _NOISE_BIT) == 0
    n_noise = int((~keep).sum())
    if n_noise:
        log.info("%s: left out %d noise-adjust acquisitions", where, n_noise)
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise ValueError(f"{where}: no imaging acquisitions (only {n_noise} noise scans)")
    kept = heads[idx]
    for field, what in zip(_SIZE_FIELDS, ("coil", "sample", "trajectory dimension"), strict=True):
        values = np.unique(kept[field])
        if values.size != 1:
            raise ValueError(
                f"{where}: acquisitions differ in {what} count ({', '.join(map(str, values[:8]))}); "
                "a RawStudy needs one value for every imaging readout"
            )
    sizes = (int(kept["active_channels"][0]), int(kept["number_of_samples"][0]), int(kept["trajectory_dimensions"][0]))
    return idx, sizes


def _assemble(
    header_xml: str,
    header: x.ismrmrdHeader,
    heads: np.ndarray,
    flat: np.ndarray | DiskRows,
    trajectory: np.ndarray | None,
    where: str,
    source_path: str,
) -> RawStudy:
    """RawStudy from the imaging rows' headers (structured array; :func:`_imaging_rows`), their samples as float32
    [rows, 2 x coils x samples] (or on disk, already [rows, coils, samples]) and trajectories as float32
    [rows, samples x dimensions] (None: none sent)."""
    if not header.encoding:
        raise ValueError(f"{where}: the ISMRMRD header has no encoding")
    n_c, n_s, n_d = (
        int(heads["active_channels"][0]),
        int(heads["number_of_samples"][0]),
        int(heads["trajectory_dimensions"][0]),
    )
    kspace = flat if isinstance(flat, DiskRows) else flat.view(np.complex64).reshape(heads.size, n_c, n_s)
    kind = header.encoding[0].trajectory.value
    if trajectory is not None:
        trajectory = trajectory.reshape(heads.size, n_s, n_d)
    elif kind != "cartesian":
        # Scanners often send radial / spiral data without coordinates (the recon computes them from the
        # trajectory description); the pipeline decides whether it can, so this is not an error here.
        log.warning("%s: %s trajectory without k-space coordinates in the acquisitions", where, kind)
    enc = header.encoding[0].encodedSpace
    return RawStudy(
        header_xml=header_xml,
        data=kspace,
        trajectory=trajectory,
        line=heads["idx"]["kspace_encode_step_1"].astype(np.int32),
        frame=heads["idx"]["repetition"].astype(np.int32),
        slice=heads["idx"]["slice"].astype(np.int32),
        flags=heads["flags"].astype(np.uint64),
        matrix=(int(enc.matrixSize.y), int(enc.matrixSize.x)),
        fov_mm=(float(enc.fieldOfView_mm.y), float(enc.fieldOfView_mm.x)),
        trajectory_kind=kind,
        study=study_info_from_header(header),
        geometry=_geometry(header, heads, where),
        sequence=sequence_from_ismrmrd(header),
        source_path=source_path,
    )


def _parse_header(xml: str | bytes, where: str) -> x.ismrmrdHeader:
    try:
        return x.CreateFromDocument(xml.encode("utf-8") if isinstance(xml, str) else xml)
    except Exception as e:  # xsdata raises ParserError and friends
        raise ValueError(f"{where}: the ISMRMRD header is not valid XML for the ISMRMRD schema ({e})") from e


# ---- public entry points -----------------------------------------------------------------------------------------
def raw_study_from_hdf5(path: str | Path, dataset: str = "dataset", spill_dir: Path | None = None) -> RawStudy:
    """Read an ISMRMRD HDF5 file (group ``dataset``) into a RawStudy. Errors name the file and the problem.

    One pass in blocks of ~:data:`_BLOCK_BYTES`, each block's samples copied straight into one array, so the study
    is held once: per-acquisition vectors and their stacked copy held it twice (10 slices of 256² Cartesian FISP at
    R 5, 16 coils, are 16 GB of samples). There is no cheap headers-first pass to size the array from: HDF5 reads
    the samples for the headers too.

    ``spill_dir``: a study of more than :data:`~pipelines.io.disk_rows.SPILL_BYTES` of samples is not held at all:
    its blocks go to an unnamed file there, and ``data`` is a :class:`~pipelines.io.disk_rows.DiskRows` that reads
    the rows a pipeline asks for (one slice at a time)."""
    path = Path(path)
    where = str(path)
    with _open(path) as f:
        grp = _group(f, path, dataset)
        xml = _xml_of(grp, path)
        header = _parse_header(xml, where)
        ds = _acq_dataset(grp, path)
        n = int(ds.shape[0])
        block = _block_rows(ds, path)
        parts: list[np.ndarray] = []
        flat = traj = np.empty((0, 0), np.float32)
        sizes: tuple[int, int, int] | None = None
        writer: RowWriter | None = None
        filled = 0
        for s in range(0, n, block):
            heads, data, tr = _read_block(ds, s, min(s + block, n), path)
            parts.append(heads)
            rows = np.flatnonzero((heads["flags"] & _NOISE_BIT) == 0)
            if rows.size == 0:
                continue
            h = heads[rows]
            if sizes is None:
                sizes = (
                    int(h["active_channels"][0]),
                    int(h["number_of_samples"][0]),
                    int(h["trajectory_dimensions"][0]),
                )
                _check_first(data[rows[0]], s + int(rows[0]), sizes[0], sizes[1], where)
                width = 2 * sizes[0] * sizes[1]
                if spill_dir is not None and n * width * 4 > SPILL_BYTES:
                    try:
                        writer = RowWriter(spill_dir, width)
                    except OSError as e:  # a read-only or missing folder: held in memory, as before
                        log.warning(
                            "%s: cannot keep the samples on disk in %s (%s); reading them into memory",
                            where,
                            spill_dir,
                            e,
                        )
                flat, traj = _allocate(n, 0 if writer else width, sizes[1] * sizes[2], where)
            if any(np.any(h[k] != v) for k, v in zip(_SIZE_FIELDS, sizes, strict=True)):
                _imaging_rows(np.concatenate(parts), where)  # raises, naming the count that differs
            at = filled + np.arange(rows.size)
            expected = f"{sizes[0]} coils x {sizes[1]} complex samples"
            if writer is not None:
                buf = np.empty((rows.size, writer.width), np.float32)
                _fill(buf, np.arange(rows.size), data[rows], where, expected)
                writer.append(buf)
            else:
                _fill(flat, at, data[rows], where, expected)
            if sizes[2] > 0:
                _fill(traj, at, tr[rows], where, f"{sizes[1]} x {sizes[2]} trajectory values")
            filled += rows.size
            del data, tr
    heads = np.concatenate(parts) if parts else np.empty(0, acquisition_header_dtype)
    idx, (n_c, n_s, n_d) = _imaging_rows(heads, where)
    samples = writer.finish(n_c, n_s) if writer is not None else flat[:filled]
    return _assemble(xml, header, heads[idx], samples, traj[:filled] if n_d > 0 else None, where, source_path=str(path))


def _check_first(vector: Any, row: int, n_c: int, n_s: int, where: str) -> None:
    """The headers' sizes are claims: the first imaging row's samples must match them before anything is sized
    from them (every other row is checked as it is copied)."""
    size = np.asarray(vector).size
    if size != 2 * n_c * n_s:
        raise ValueError(
            f"{where}: acquisition {row} holds {size // 2} complex samples, the headers say {n_c} coils x {n_s}"
        )


def _allocate(rows: int, width: int, traj_width: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 arrays [rows, width] for the samples and [rows, traj_width] for the trajectories."""
    try:
        return np.empty((rows, width), np.float32), np.empty((rows, traj_width), np.float32)
    except MemoryError as e:
        need = rows * (width + traj_width) * 4 / 1024**3
        raise ValueError(f"{where}: {rows} acquisitions need {need:.1f} GB, more memory than this machine has") from e


def _fill(out: np.ndarray, at: np.ndarray, vectors: Sequence[Any] | np.ndarray, where: str, expected: str) -> None:
    """``out[at[i]] = vectors[i]`` for per-acquisition float32 vectors, each checked against ``out``'s row length."""
    for i, v in zip(at, vectors, strict=True):
        v = np.asarray(v, dtype=np.float32)
        if v.size != out.shape[1]:
            raise ValueError(f"{where}: an acquisition holds {v.size} float32 values, the headers say {expected}")
        out[i] = v


def raw_study_from_stream(objects: Iterable[Any]) -> RawStudy:
    """A RawStudy from deserialized MRD stream objects (``ProtocolDeserializer.deserialize()`` output).

    Uses the first ``ismrmrdHeader`` and every ``ismrmrd.Acquisition``; config messages, texts, waveforms and
    images are ignored. ``header_xml`` is the header re-rendered by :func:`header_xml`, which is also what
    ``pipelines.sim.mrd_writer`` stores in HDF5 files, so a stream and its file give equal RawStudies.
    """
    header: x.ismrmrdHeader | None = None
    heads: list[bytes] = []
    data: list[np.ndarray] = []
    traj: list[np.ndarray] = []
    for obj in objects:
        if isinstance(obj, x.ismrmrdHeader):
            if header is None:
                header = obj
            else:
                log.warning("MRD stream: ignoring a second ISMRMRD header")
        elif isinstance(obj, ismrmrd.Acquisition):
            heads.append(bytes(obj.getHead()))
            data.append(obj.data.view(np.float32).reshape(-1))
            traj.append(obj.traj.reshape(-1))
    if header is None:
        raise ValueError("MRD stream: no ISMRMRD header was received")
    if not heads:
        raise ValueError("MRD stream: the stream holds no acquisitions")
    head_arr = np.frombuffer(b"".join(heads), dtype=acquisition_header_dtype)
    where = "MRD stream"
    idx, (n_c, n_s, n_d) = _imaging_rows(head_arr, where)
    _check_first(data[idx[0]], int(idx[0]), n_c, n_s, where)
    flat, t = _allocate(idx.size, 2 * n_c * n_s, n_s * n_d, where)
    _fill(flat, np.arange(idx.size), [data[i] for i in idx], where, f"{n_c} coils x {n_s} complex samples")
    if n_d > 0:
        _fill(t, np.arange(idx.size), [traj[i] for i in idx], where, f"{n_s} x {n_d} trajectory values")
    return _assemble(header_xml(header), header, head_arr[idx], flat, t if n_d > 0 else None, where, source_path="")
