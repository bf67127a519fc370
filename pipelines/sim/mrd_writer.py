"""Write a :class:`SimulatedStudy` the way a scanner would send it: ISMRMRD header + one Acquisition per readout.

Its outputs share one header builder and one acquisition-header builder, so a study looks the same whether it
goes to an ISMRMRD HDF5 file, to an in-memory MRD stream or (through the node's client,
``node.ingest.mrd_client.send_study``, which uses :func:`stream_objects`) over TCP to an MRD server:

* :func:`build_header` -- the ``ismrmrdHeader`` (validates against the ISMRMRD 1.8 schema
  shipped by Debian, ``/usr/share/ismrmrd/schema/ismrmrd.xsd``: we emit no element that only newer schemas know,
  such as ``patientHeight_m``, ``sequenceName`` or ``trajectoryDescription/userParameterString``), and it
  round-trips through the C++ library (no ``version`` element: see the comment in :func:`build_header`).
* :func:`iter_acquisitions` -- ``ismrmrd.Acquisition`` objects, frame-major (frame 0 readout 0, frame 0 readout 1, ...).
* :func:`write_ismrmrd`, :func:`serialize_study`.

Conventions (the readers in ``pipelines.io.mrd_reader`` invert them):

* MRF frame ``f`` -> ``idx.repetition = f``; readout ``r`` of that frame has ``idx.kspace_encode_step_1 =
  lines[f, r]`` (Cartesian phase-encode row, or spoke / spiral interleaf number); ``idx.slice`` is the slice
  index (0 for a single slice).
* Multi-slice studies (:class:`~pipelines.sim.study.MultiSliceStudy`) are sent slice after slice (all frames of
  slice 0, then slice 1 ...), as a sequential multi-slice MRF scan acquires them: every slice's acquisitions carry
  that slice's own ``position`` (and the stack's directions), ACQ_FIRST/LAST_IN_SLICE mark each slice's first
  and last readout, ACQ_LAST_IN_MEASUREMENT only the very last one, ``scan_counter`` runs on across slices, and
  time stamps advance by one whole schedule (TI + all TRs) per slice. ``encodingLimits.slice`` spans the slices.
  Files are written and streams sent one slice at a time, so only one slice is ever simulated and in memory.
* Geometry: ISMRMRD ``position`` is the centre of the slice's field of view and ``read_dir`` / ``phase_dir`` /
  ``slice_dir`` are direction cosines, all in the DICOM patient coordinate system (LPS, mm) -- the convention of the
  Siemens converter and of Gadgetron's DICOM writer. ``read_dir`` is the DICOM row direction (first triplet of
  ImageOrientationPatient, increasing column index = x), ``phase_dir`` the column direction (increasing row
  index = y), ``slice_dir = read_dir x phase_dir``. The centre (the acquisition ``position``) is the encoding centre,
  pixel (N//2) of the centred FFT: ImagePositionPatient (centre of the first pixel) plus (N//2) pixels along each
  in-plane direction, which is how :meth:`Geometry.centred` places the first pixel.
* Non-Cartesian trajectories are stored as given by the simulator: ISMRMRD units (cycles/FOV, in [-N/2, N/2)),
  ``trajectory_dimensions = 2`` as (kx, ky).
* Header XML is rendered with a UTF-8 declaration (see ``pipelines.io.mrd_reader.header_xml`` for why).
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import h5py
import ismrmrd
import ismrmrd.xsd as x
import numpy as np
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolSerializer
from xsdata.models.datatype import XmlDate, XmlTime

from pipelines.io.mrd_reader import header_xml, iter_hdf5_acquisitions, read_hdf5_header
from pipelines.physics.sequences import sequence_to_ismrmrd
from pipelines.sim.study import MultiSliceStudy, SimulatedStudy

GAMMA_BAR_HZ_PER_T = 42.577478e6
SYSTEM_VENDOR = "recon-node simulator"
SYSTEM_MODEL = "MRF simulator"
# The simulator has no receiver model; a 2 us dwell (500 kHz bandwidth) is typical of spiral MRF readouts and only
# matters to code that converts samples to time (e.g. off-resonance correction).
DWELL_TIME_US = 2.0
# ISMRMRD / Siemens convention: acquisition_time_stamp counts 2.5 ms ticks since midnight.
_TICK_MS = 2.5

# User parameters the readers look for.
UP_NOISE_STD = "noise_std"
UP_SNR = "snr"
UP_ACCELERATION = "acceleration"
UP_PHANTOM = "phantom"
UP_SEED = "seed"
# accessionNumber is xs:long in the schema, but DICOM accession numbers are strings (SH, often alphanumeric or
# with leading zeros); the exact text travels here and the numeric element is only written when it is a number.
UP_ACCESSION = "accession_number"
UP_SERIES_INSTANCE_UID = "series_instance_uid"

_TRAJECTORY_TYPES = {
    "cartesian": x.trajectoryType.CARTESIAN,
    "radial": x.trajectoryType.RADIAL,
    "goldenangle": x.trajectoryType.GOLDENANGLE,
    "spiral": x.trajectoryType.SPIRAL,
    "epi": x.trajectoryType.EPI,
    "other": x.trajectoryType.OTHER,
}
_TRAJECTORY_IDS = {"radial": "golden_angle_radial", "spiral": "mrf_spiral_vd"}


# ---- small converters --------------------------------------------------------------------------------------------
def _xml_date(dicom_date: str) -> XmlDate | None:
    """DICOM DA (YYYYMMDD) -> xs:date; None for empty or malformed values (the element is optional)."""
    d = (dicom_date or "").strip()
    if len(d) != 8 or not d.isdigit():
        return None
    return XmlDate(int(d[:4]), int(d[4:6]), int(d[6:8]))


def _xml_time(dicom_time: str) -> XmlTime | None:
    """DICOM TM (HHMMSS[.frac]) -> xs:time; fractions are dropped (nothing downstream needs them)."""
    t = (dicom_time or "").strip().split(".")[0]
    if len(t) < 2 or not t.isdigit():
        return None
    t = t.ljust(6, "0")
    return XmlTime(int(t[:2]), int(t[2:4]), int(t[4:6]))


def _or_none(s: str) -> str | None:
    return s if s else None


def measurement_uid(study: SimulatedStudy | MultiSliceStudy) -> int:
    """A stable 32-bit measurement id (the acquisition header field is uint32)."""
    key = f"{study.study.study_instance_uid}|{study.study.series_number}|{study.seed}"
    return zlib.crc32(key.encode()) & 0xFFFFFFFF


def slice_centre(study: SimulatedStudy) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(centre, read_dir, phase_dir, slice_dir) of the study's slice (``slice_index``) in LPS mm, from the
    DICOM-style geometry."""
    g = study.geometry
    row = np.asarray(g.orientation[:3], dtype=np.float64)
    col = np.asarray(g.orientation[3:], dtype=np.float64)
    normal = np.cross(row, col)
    dy, dx = g.pixel_spacing_mm
    ny, nx = g.matrix
    first = np.asarray(g.positions[study.slice_index], dtype=np.float64)
    centre = first + row * ((nx // 2) * dx) + col * ((ny // 2) * dy)
    return centre, row, col, normal


def _shape(study: SimulatedStudy | MultiSliceStudy) -> tuple[int, int, int, int]:
    """(frames, readouts, coils, samples) per slice."""
    if isinstance(study, MultiSliceStudy):
        return study.n_frames, study.n_readouts, study.n_coils, study.n_samples
    n_f, n_r, n_c, n_s = study.kspace.shape
    return int(n_f), int(n_r), int(n_c), int(n_s)


def _check_study(study: SimulatedStudy | MultiSliceStudy) -> None:
    if isinstance(study, SimulatedStudy):
        if study.kspace.ndim != 4:
            raise ValueError(f"kspace must be [frames, readouts, coils, samples], got shape {study.kspace.shape}")
        if not 0 <= study.slice_index < study.geometry.n_slices:
            raise ValueError(
                f"slice_index {study.slice_index} is outside the geometry's {study.geometry.n_slices} slice positions"
            )
    n_f, n_r, _, n_s = _shape(study)
    if study.lines.shape != (n_f, n_r):
        raise ValueError(f"lines must be [frames, readouts] = {(n_f, n_r)}, got {study.lines.shape}")
    if study.trajectory_kind not in _TRAJECTORY_TYPES:
        raise ValueError(
            f"unknown trajectory kind {study.trajectory_kind!r}: use one of {', '.join(_TRAJECTORY_TYPES)}"
        )
    if study.trajectory_kind != "cartesian":
        if study.trajectory is None or study.trajectory.shape[:3] != (n_f, n_r, n_s):
            raise ValueError(
                f"a {study.trajectory_kind} study needs trajectory [frames, readouts, samples, dims] = "
                f"{(n_f, n_r, n_s)} + (dims,), got {None if study.trajectory is None else study.trajectory.shape}"
            )
    if study.sequence.n_frames != n_f:
        raise ValueError(
            f"the sequence {study.sequence.name!r} has {study.sequence.n_frames} frames but the k-space has {n_f}: "
            "the header schedule must describe the data"
        )
    if n_f > 65536 or int(study.lines.max(initial=0)) > 65535 or study.geometry.n_slices > 65536:
        raise ValueError("frames, line numbers and slices must fit the uint16 ISMRMRD encoding counters")


# ---- header ------------------------------------------------------------------------------------------------------
def build_header(study: SimulatedStudy | MultiSliceStudy) -> x.ismrmrdHeader:
    """The complete ISMRMRD header of ``study`` (schedule in sequenceParameters, simulation facts in userParameters).

    A slice of a multi-slice study and the multi-slice study itself give the same header (the whole study's).
    """
    _check_study(study)
    info = study.study
    n_f, n_r, n_c, n_s = _shape(study)
    my, mx = study.geometry.matrix
    fov_y, fov_x = study.geometry.fov_mm
    thickness = float(study.geometry.slice_thickness_mm)
    b0 = float(study.field_strength_T)

    subject = x.subjectInformationType(
        patientName=_or_none(info.patient_name),
        patientID=_or_none(info.patient_id),
        patientBirthdate=_xml_date(info.patient_birth_date),
        patientGender=info.patient_sex if info.patient_sex in ("M", "F", "O") else None,
    )
    accession = info.accession_number.strip()
    study_info = x.studyInformationType(
        studyDate=_xml_date(info.study_date),
        studyTime=_xml_time(info.study_time),
        studyID=_or_none(info.study_id),
        # Numeric only, and without leading zeros that an integer would lose; the text goes to userParameters.
        accessionNumber=int(accession) if accession.isdigit() and str(int(accession)) == accession else None,
        referringPhysicianName=_or_none(info.referring_physician),
        studyDescription=_or_none(info.study_description),
        studyInstanceUID=_or_none(info.study_instance_uid),
    )
    muid = measurement_uid(study)
    frame_of_ref = info.frame_of_reference_uid or study.geometry.frame_of_reference_uid or None
    measurement = x.measurementInformationType(
        # Siemens-style "<device>_<patient>_<study>_<measurement>" id; only needs to be unique per measurement.
        measurementID="_".join(s for s in (info.station_name or "SIM", info.patient_id, info.study_id, str(muid)) if s),
        seriesDate=_xml_date(info.study_date),
        seriesTime=_xml_time(info.study_time),
        patientPosition=x.patientPositionType.HFS,
        initialSeriesNumber=int(info.series_number),
        protocolName=_or_none(info.protocol_name or study.sequence.name),
        seriesDescription=_or_none(info.series_description),
        frameOfReferenceUID=frame_of_ref,
    )
    system = x.acquisitionSystemInformationType(
        systemVendor=SYSTEM_VENDOR,
        systemModel=SYSTEM_MODEL,
        systemFieldStrength_T=b0,
        relativeReceiverNoiseBandwidth=1.0,
        receiverChannels=n_c,
        institutionName=_or_none(info.institution_name),
        stationName=_or_none(info.station_name),
    )

    cartesian = study.trajectory_kind == "cartesian"
    # Cartesian readouts may be oversampled: the encoded x matrix is the sample count and its FOV grows with it.
    enc_x = n_s if cartesian else mx
    enc_fov_x = fov_x * enc_x / mx
    encoded = x.encodingSpaceType(
        matrixSize=x.matrixSizeType(x=enc_x, y=my, z=1),
        fieldOfView_mm=x.fieldOfViewMm(x=enc_fov_x, y=fov_y, z=thickness),
    )
    recon = x.encodingSpaceType(
        matrixSize=x.matrixSizeType(x=mx, y=my, z=1),
        fieldOfView_mm=x.fieldOfViewMm(x=fov_x, y=fov_y, z=thickness),
    )
    max_line = int(study.lines.max(initial=0))
    limits = x.encodingLimitsType(
        kspace_encoding_step_0=x.limitType(minimum=0, maximum=n_s - 1, center=n_s // 2 if cartesian else 0),
        kspace_encoding_step_1=(
            x.limitType(minimum=0, maximum=max(my - 1, max_line), center=my // 2)
            if cartesian
            else x.limitType(minimum=0, maximum=max_line, center=0)
        ),
        kspace_encoding_step_2=x.limitType(minimum=0, maximum=0, center=0),
        slice=x.limitType(minimum=0, maximum=study.geometry.n_slices - 1, center=0),
        repetition=x.limitType(minimum=0, maximum=n_f - 1, center=0),
    )
    traj_desc = None
    if not cartesian:
        # The 1.8 schema allows only Long/Double parameters and a comment here (no userParameterString).
        traj_desc = x.trajectoryDescriptionType(
            identifier=_TRAJECTORY_IDS.get(study.trajectory_kind, study.trajectory_kind),
            userParameterLong=[
                x.userParameterLongType(name="n_interleaves", value=max_line + 1),
                x.userParameterLongType(name="readouts_per_frame", value=n_r),
                x.userParameterLongType(name="samples_per_readout", value=n_s),
            ],
            userParameterDouble=[
                x.userParameterDoubleType(name="dwell_time_us", value=DWELL_TIME_US),
                x.userParameterDoubleType(name="acceleration", value=float(study.acceleration)),
            ],
            comment="k-space coordinates are stored with every acquisition (ISMRMRD units, cycles/FOV)",
        )
    encoding = x.encodingType(
        encodedSpace=encoded,
        reconSpace=recon,
        encodingLimits=limits,
        trajectory=_TRAJECTORY_TYPES[study.trajectory_kind],
        trajectoryDescription=traj_desc,
    )

    strings = [x.userParameterStringType(name=UP_PHANTOM, value=study.phantom_name or "unknown")]
    if accession:
        strings.append(x.userParameterStringType(name=UP_ACCESSION, value=accession))
    if info.series_instance_uid:
        strings.append(x.userParameterStringType(name=UP_SERIES_INSTANCE_UID, value=info.series_instance_uid))
    user = x.userParametersType(
        userParameterLong=[x.userParameterLongType(name=UP_SEED, value=int(study.seed))],
        userParameterDouble=[
            x.userParameterDoubleType(name=UP_NOISE_STD, value=float(study.noise_std)),
            x.userParameterDoubleType(name=UP_SNR, value=float(study.snr)),
            x.userParameterDoubleType(name=UP_ACCELERATION, value=float(study.acceleration)),
        ],
        userParameterString=strings,
    )
    header = x.ismrmrdHeader(
        # No <version>: libismrmrd (C++, every 1.x) defines the header version as its own minor version (8 for
        # Debian's 1.8, 14 for 1.14 ...) and refuses to re-serialize a header carrying any other number, which
        # breaks C++ consumers such as Gadgetron. The element is optional, and absent it every version accepts.
        subjectInformation=subject,
        studyInformation=study_info,
        measurementInformation=measurement,
        acquisitionSystemInformation=system,
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=round(GAMMA_BAR_HZ_PER_T * b0)),
        encoding=[encoding],
        userParameters=user,
    )
    sequence_to_ismrmrd(study.sequence, header)
    return header


def utf8_header(header: x.ismrmrdHeader) -> x.ismrmrdHeader:
    """A copy of ``header`` whose ``toXML()`` renders ``header_xml`` (UTF-8), for ``ProtocolSerializer.serialize``."""
    h = copy.copy(header)
    # ProtocolSerializer calls obj.toXML(); an instance attribute takes precedence over the class method.
    h.toXML = functools.partial(header_xml, h)
    return h


# ---- acquisitions ------------------------------------------------------------------------------------------------
def acquisition_headers(study: SimulatedStudy) -> np.ndarray:
    """All acquisition headers as one structured array (``ismrmrd.hdf5.acquisition_header_dtype``), frame-major.

    Built vectorised so that the HDF5 writer needs no per-readout Python objects; :func:`iter_acquisitions` uses
    the same rows, so files and streams carry identical headers.
    """
    _check_study(study)
    n_f, n_r, n_c, n_s = study.kspace.shape
    n = n_f * n_r
    s_idx, n_slices = study.slice_index, study.geometry.n_slices
    heads = np.zeros(n, dtype=acquisition_header_dtype)
    heads["version"] = 1
    heads["measurement_uid"] = measurement_uid(study)
    # Slices are acquired one after the other: the counter runs on from the previous slices' readouts.
    heads["scan_counter"] = np.arange(s_idx * n, (s_idx + 1) * n, dtype=np.uint32)
    heads["number_of_samples"] = n_s
    heads["available_channels"] = n_c
    heads["active_channels"] = n_c
    for c in range(n_c):
        heads["channel_mask"][:, c // 64] |= np.uint64(1) << np.uint64(c % 64)
    heads["center_sample"] = n_s // 2 if study.trajectory_kind in ("cartesian", "radial") else 0
    if study.trajectory_kind == "cartesian":
        heads["trajectory_dimensions"] = 0
    else:
        assert study.trajectory is not None  # _check_study: a non-Cartesian study carries its trajectory
        heads["trajectory_dimensions"] = study.trajectory.shape[-1]
    heads["sample_time_us"] = DWELL_TIME_US
    centre, row, col, normal = slice_centre(study)
    heads["position"] = centre.astype(np.float32)
    heads["read_dir"] = row.astype(np.float32)
    heads["phase_dir"] = col.astype(np.float32)
    heads["slice_dir"] = normal.astype(np.float32)

    frames = np.repeat(np.arange(n_f), n_r)
    readouts = np.tile(np.arange(n_r), n_f)
    heads["idx"]["kspace_encode_step_1"] = study.lines.reshape(-1).astype(np.uint16)
    heads["idx"]["repetition"] = frames.astype(np.uint16)
    heads["idx"]["slice"] = s_idx

    # Time stamps: study time + inversion + the TRs of the frames before (all readouts of a frame share its TR).
    t = study.study.study_time.split(".")[0]
    midnight_ms = (int(t[:2]) * 3600 + int(t[2:4]) * 60 + int(t[4:6])) * 1e3 if len(t) >= 6 and t.isdigit() else 0.0
    start_ms = np.concatenate([[0.0], np.cumsum(study.sequence.tr_ms)[:-1]])
    t_ms = midnight_ms + (study.sequence.ti_ms or 0.0) + start_ms[frames]
    if s_idx:  # each earlier slice took one whole schedule (its inversion delay and all its TRs)
        t_ms = t_ms + s_idx * ((study.sequence.ti_ms or 0.0) + float(np.sum(study.sequence.tr_ms)))
    heads["acquisition_time_stamp"] = np.round(t_ms / _TICK_MS).astype(np.uint32)

    flags = np.zeros(n, dtype=np.uint64)

    def bit(flag: int) -> np.uint64:
        return np.uint64(1) << np.uint64(flag - 1)

    flags[readouts == 0] |= bit(ismrmrd.ACQ_FIRST_IN_REPETITION)
    flags[readouts == n_r - 1] |= bit(ismrmrd.ACQ_LAST_IN_REPETITION)
    flags[0] |= bit(ismrmrd.ACQ_FIRST_IN_SLICE)
    flags[-1] |= bit(ismrmrd.ACQ_LAST_IN_SLICE)
    if s_idx == n_slices - 1:
        flags[-1] |= bit(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    heads["flags"] = flags
    return heads


def _readout_arrays(study: SimulatedStudy) -> tuple[np.ndarray, np.ndarray | None]:
    """k-space as complex64 [acq, coils, samples] and trajectory float32 [acq, samples, dims] (C-contiguous)."""
    n_f, n_r, n_c, n_s = study.kspace.shape
    data = np.ascontiguousarray(study.kspace, dtype=np.complex64).reshape(n_f * n_r, n_c, n_s)
    traj = None
    if study.trajectory_kind != "cartesian":
        traj = np.ascontiguousarray(study.trajectory, dtype=np.float32).reshape(n_f * n_r, n_s, -1)
    return data, traj


def iter_acquisitions(study: SimulatedStudy | MultiSliceStudy) -> Iterator[ismrmrd.Acquisition]:
    """One ``ismrmrd.Acquisition`` per readout, frame-major, with the headers of :func:`acquisition_headers`.

    A multi-slice study yields slice 0's readouts, then slice 1's ...; each slice is simulated when reached and
    released before the next one is.
    """
    if isinstance(study, MultiSliceStudy):
        for s in range(study.n_slices):
            yield from iter_acquisitions(study.slice(s))
        return
    heads = acquisition_headers(study)
    data, traj = _readout_arrays(study)
    n_s = data.shape[-1]
    empty_traj = np.zeros((n_s, 0), dtype=np.float32)
    for i in range(heads.shape[0]):
        # Acquisition keeps the arrays it is given (no copy): copy so a consumer may modify one readout safely.
        yield ismrmrd.Acquisition(
            heads[i].tobytes(), data=data[i].copy(), trajectory=empty_traj if traj is None else traj[i].copy()
        )


# ---- HDF5 --------------------------------------------------------------------------------------------------------
def _acquisition_rows(study: SimulatedStudy) -> np.ndarray:
    """The study's readouts as rows of ``ismrmrd.hdf5.acquisition_dtype`` (what the HDF5 ``data`` table holds)."""
    heads = acquisition_headers(study)
    data, traj = _readout_arrays(study)
    n = heads.shape[0]
    rows = np.empty(n, dtype=acquisition_dtype)
    rows["head"] = heads
    # Variable-length fields: ISMRMRD stores data as interleaved float32 (re, im) and trajectories as float32.
    flat_data = data.view(np.float32).reshape(n, -1)
    no_traj = np.zeros(0, dtype=np.float32)
    for i in range(n):
        rows[i]["data"] = flat_data[i]
        rows[i]["traj"] = no_traj if traj is None else traj[i].reshape(-1)
    return rows


class IsmrmrdFileWriter:
    """Write an ISMRMRD HDF5 file slice by slice: the header once, then each slice's acquisitions appended.

    Use as a context manager; the file appears under its final name only when the block ends without an error
    (written as ``<name>.partial`` and renamed), so a crash never leaves a half-written study behind. Each
    :meth:`append` extends the ``data`` table by one slice's readouts, so memory holds one slice at a time.
    """

    def __init__(
        self, path: str | Path, header: x.ismrmrdHeader, dataset: str = "dataset", chunk_rows: int = 1024
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = h5py.File(self._tmp, "w")
        grp = self._file.create_group(dataset)
        xml_ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xml_ds[0] = header_xml(header).encode("utf-8")
        self._data = grp.create_dataset(
            "data", shape=(0,), dtype=acquisition_dtype, maxshape=(None,), chunks=(max(1, chunk_rows),)
        )
        self.n_written = 0

    def append(self, study: SimulatedStudy) -> int:
        """Append the acquisitions of one slice (or a single-slice study); returns how many were written."""
        rows = _acquisition_rows(study)
        start = self.n_written
        self._data.resize((start + rows.shape[0],))
        self._data[start:] = rows
        self.n_written += rows.shape[0]
        return int(rows.shape[0])

    def close(self, ok: bool = True) -> Path:
        self._file.close()
        if ok:
            self._tmp.replace(self.path)
        else:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def __enter__(self) -> IsmrmrdFileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(ok=exc_type is None)


def write_ismrmrd(study: SimulatedStudy | MultiSliceStudy, path: str | Path, dataset: str = "dataset") -> Path:
    """Write ``study`` as an ISMRMRD HDF5 file (group ``dataset``: ``xml`` header + ``data`` acquisitions).

    The acquisitions go in with one bulk write of the compound dtype that ``ismrmrd.Dataset`` uses
    (``ismrmrd.hdf5.acquisition_dtype``): ``Dataset.append_acquisition`` resizes the dataset for every readout and
    took 4.8 s against 0.27 s for 1000 frames x 2 readouts x 8 coils x 1024 samples (150 MB) on the 2-core CI box.
    The result reads back with ``ismrmrd.Dataset`` and with the C library (e.g. Debian's
    ``ismrmrd_recon_cartesian_2d``), and stays appendable (unlimited max shape).
    An existing file at ``path`` is replaced. A multi-slice study is simulated and appended one slice at a time
    (:class:`IsmrmrdFileWriter`).
    """
    if isinstance(study, MultiSliceStudy):
        n_r = study.n_frames * study.n_readouts
        with IsmrmrdFileWriter(path, build_header(study), dataset, chunk_rows=min(n_r, 1024)) as writer:
            for s in range(study.n_slices):
                writer.append(study.slice(s))  # the slice is released before the next one is simulated
        return Path(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = _acquisition_rows(study)
    n = rows.shape[0]
    xml = header_xml(build_header(study)).encode("utf-8")
    # Write to a temporary name and rename, so a crash never leaves a half-written file under the final name.
    tmp = path.with_name(path.name + ".partial")
    try:
        with h5py.File(tmp, "w") as f:
            grp = f.create_group(dataset)
            xml_ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
            xml_ds[0] = xml
            grp.create_dataset("data", data=rows, maxshape=(None,), chunks=(min(n, 1024),))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- MRD stream --------------------------------------------------------------------------------------------------
def config_message(config: str) -> ConfigFile | ConfigText:
    """A config name (e.g. "default") becomes CONFIG_FILE; an XML/JSON document becomes CONFIG_TEXT."""
    text = config.strip()
    return ConfigText(config) if text.startswith(("<", "{")) else ConfigFile(config)


def stream_objects(
    study_or_path: SimulatedStudy | MultiSliceStudy | str | Path,
) -> tuple[x.ismrmrdHeader, Iterable[ismrmrd.Acquisition]]:
    """The header and the acquisitions (lazily) of a study in memory or of an ISMRMRD .h5 file."""
    if isinstance(study_or_path, (SimulatedStudy, MultiSliceStudy)):
        return build_header(study_or_path), iter_acquisitions(study_or_path)
    path = Path(study_or_path)
    xml = read_hdf5_header(path)  # ValueError naming the file when it is not ISMRMRD
    try:
        header = x.CreateFromDocument(xml.encode("utf-8"))
    except Exception as e:  # xsdata ParserError and friends
        raise ValueError(f"{path}: the ISMRMRD header does not parse ({e})") from e
    return header, iter_hdf5_acquisitions(path)


def serialize_study(
    study: SimulatedStudy | MultiSliceStudy | str | Path, stream: BinaryIO, config: str | None = None
) -> int:
    """Write ``study`` (or an ISMRMRD .h5 file) as an MRD stream: [config], header, acquisitions, CLOSE.

    Returns the number of acquisitions written.
    """
    header, acqs = stream_objects(study)
    ser = ProtocolSerializer(stream)
    if config is not None:
        ser.serialize(config_message(config))
    ser.serialize(utf8_header(header))
    n = 0
    for acq in acqs:
        ser.serialize(acq)
        n += 1
    ser.close()
    return n
