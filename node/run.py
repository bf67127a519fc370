"""Load a unit, run a pipeline on it, write the results atomically: the one path of ``recon-node process`` and the
node's worker.

Results are ``maps.npz`` and/or ``images.npz``, one DICOM series per output under ``dicom/`` (unless ``dicom`` is
off) and ``summary.json``. They are written to a temp folder first and renamed into place, so a result folder is
either complete or absent: the node's temp folder (``<spool>/tmp``, cleaned at start-up) for a job, a hidden
folder beside ``--out`` for the CLI. The instance records the DICOM writer returns are handed back, with their
paths moved to the final folder, for egress and the CLI's summary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from node.durable import fsync_dir
from pipelines.io.disk_rows import DiskRows
from pipelines.io.ismrmrd_dicom import HDF5_SIGNATURE

_MRD_SUFFIXES = (".h5", ".hdf5", ".mrd", ".ismrmrd")


def load_study(
    path: Path,
    kind: str | None = None,
    *,
    allow_partial: bool = False,
    log: logging.Logger | None = None,
    spill_dir: Path | None = None,
) -> Any:
    """The input as a RawStudy (``kind`` mrd: an ISMRMRD file) or an ImageStudy (``kind`` dicom: a DICOM file or
    folder); ``kind`` None tells them apart by suffix and HDF5 signature. ``allow_partial``: a DICOM series with
    fewer frames than its instances declare is read anyway (the reader refuses it otherwise -- issue 15 item 4).
    ``spill_dir``: where a large raw study's samples wait on disk while the pipeline takes one slice at a time.
    """
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if kind is None:
        kind = "dicom"
        if path.is_file():
            if path.suffix.lower() in _MRD_SUFFIXES:
                kind = "mrd"
            else:
                with open(path, "rb") as fh:
                    kind = "mrd" if fh.read(8).startswith(HDF5_SIGNATURE) else "dicom"
    if kind == "mrd":
        from pipelines.io.mrd_reader import raw_study_from_hdf5

        return raw_study_from_hdf5(path, spill_dir=spill_dir)
    from pipelines.io.dicom_reader import image_study_from_dicom

    return image_study_from_dicom(path, allow_partial=allow_partial, logger=log)


def source_references(study: Any) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of the instances an ImageStudy came from (none for raw data)."""
    cls = str(getattr(study, "sop_class_uid", "") or "")
    uids = list(getattr(study, "sop_instance_uids", None) or [])
    return [(cls, str(u)) for u in uids if u] if cls else []


def run_pipeline(
    spec: Any,
    study: Any,
    params: dict[str, Any],
    device: Any,
    *,
    cache_dir: Path | None,
    log: logging.Logger,
    progress: bool = False,
    gpu_lock: threading.Lock | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> tuple[list[Any], str]:
    """Run ``spec`` on ``device``; on CUDA one run at a time (``gpu_lock``), and on the CPU again when CUDA runs out
    of memory. Returns the outputs and the device they were computed on (``cuda`` / ``cpu``). ``on_phase``: the
    pipeline's ``ctx.phase`` (reconstruction, mapping)."""
    import torch

    from pipelines.registry import RunContext

    phase = on_phase or (lambda _name: None)
    if device.type == "cuda":
        with gpu_lock if gpu_lock is not None else nullcontext():
            try:
                ctx = RunContext(device=device, cache_dir=cache_dir, progress=progress, log=log, phase=phase)
                return spec(study, params, ctx), "cuda"
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory, ran on CPU")
    ctx = RunContext(device=torch.device("cpu"), cache_dir=cache_dir, progress=progress, log=log, phase=phase)
    return spec(study, params, ctx), "cpu"


def _publish(tmp: Path, final: Path, replace: bool) -> None:
    """Move the finished temp folder to ``final``. ``replace``: ``final`` belongs to this run (a job's results
    folder) and is replaced whole; otherwise (a user's ``--out``) only the entries this run wrote are."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and replace:  # an earlier attempt got this far before the node stopped; results are
        shutil.rmtree(final)  # deterministic
    if not final.exists():
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    for entry in sorted(tmp.iterdir()):
        target = final / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    fsync_dir(final)


def _moved(records: list[Any], old: Path, new: Path) -> list[Any]:
    """The writer's records (dataclasses with a ``path``) pointing into ``new`` instead of the temp folder."""
    return [dataclasses.replace(r, path=new / Path(r.path).relative_to(old)) for r in records]


@dataclass
class RunRequest:
    """One run: which input, which pipeline with which parameters, where the results go and how."""

    input: Path
    pipeline: str
    params: dict[str, Any]
    out_dir: Path
    job_id: str  # names the outputs' UIDs (same job id, same UIDs)
    kind: str | None = None  # mrd | dicom; None: told from the file
    tmp_root: Path | None = None  # where the temp folder goes (same file system as out_dir); None: beside it
    replace: bool = True  # see _publish
    device: str = "auto"
    device_fallback: bool = False  # CUDA configured but absent: run on the CPU with a warning (the node)
    cache_dir: Path | None = None
    progress: bool = False
    allow_partial: bool = False
    dicom: bool = True
    templates_dir: Path | None = None
    parametric_map: bool = False
    summary: dict[str, Any] = field(default_factory=dict)  # more fields for summary.json (job, source, route)
    # maps.npz of the study's ``b1_map`` job: attached to raw input as ``RawStudy.b1_measured``
    b1_reference: Path | None = None


@dataclass
class RunOutcome:
    outputs: list[Any]
    out_dir: Path
    instances: list[Any]  # what the DICOM writer returned, paths in out_dir; empty without DICOM
    device: str  # where the pipeline ran: cuda | cpu
    params: dict[str, Any]
    seconds: float  # loading + checking + running, not writing
    written: list[str]  # what out_dir holds, for people: maps.npz, images.npz, dicom/ (N files), summary.json
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, reconstruction, mapping, write


@dataclass
class Computed:
    """What :func:`compute_unit` hands to :func:`write_results`: everything the writer needs, nothing that points
    at the machine it was computed on (an executor may compute on another machine and write here)."""

    outputs: list[Any]
    study_info: Any  # the input's StudyInfo (patient / study attributes the DICOM series go into)
    references: list[tuple[str, str]]  # source instances (ImageStudy input)
    pipeline: str
    params: dict[str, Any]
    device: str  # cuda | cpu
    seconds: float  # loading + checking + running
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, reconstruction, mapping (metrics)


def compute_unit(
    req: RunRequest,
    *,
    log: logging.Logger | None = None,
    check: Callable[[Any], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    gpu_lock: threading.Lock | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Computed:
    """Load ``req.input`` and run the pipeline (stages ``setup``, ``load``, ``check``, ``run``); writes nothing.
    ``on_phase(name)``: told each phase the pipeline begins (``ctx.phase``), on the thread that runs it."""
    from pipelines.compute import select_device
    from pipelines.definitions import get_pipeline
    from pipelines.types import RawStudy

    stage = on_stage or (lambda _name: None)
    t0 = time.perf_counter()
    stage("setup")
    spec = get_pipeline(req.pipeline)
    params = spec.resolve_params(req.params)
    plog = log or logging.getLogger(f"pipelines.{spec.name}")
    device = select_device(req.device, fallback_log=plog if req.device_fallback else None)
    stage("load")
    t_load = time.perf_counter()
    study = load_study(
        req.input, req.kind, allow_partial=req.allow_partial, log=log, spill_dir=req.tmp_root or req.out_dir.parent
    )
    timings = {"load": time.perf_counter() - t_load}
    if isinstance(getattr(study, "data", None), DiskRows):
        plog.info(
            "%.2f GB of raw samples wait on disk (an unnamed file in %s); the pipeline reads one slice at a time",
            study.data.nbytes / 1e9,
            req.tmp_root or req.out_dir.parent,
        )
    if req.b1_reference is not None and isinstance(study, RawStudy):
        try:
            study.b1_measured = load_map(req.b1_reference, "b1")
        except (ValueError, OSError, KeyError) as e:  # the MRF job goes on without it (b1_measured=required fails)
            plog.warning("the study's B1 map %s cannot be read (%s): not used", req.b1_reference, e)
    stage("check")
    if check is not None:
        check(study)
    stage("run")
    # the pipeline's phases (ctx.phase); before the first it is reconstructing (raw input) or mapping (images)
    marks = [("reconstruction" if spec.input_kind == "raw" else "mapping", time.perf_counter())]

    def phase(name: str) -> None:
        marks.append((name, time.perf_counter()))
        if on_phase is not None:
            on_phase(name)

    outputs, ran_on = run_pipeline(
        spec,
        study,
        params,
        device,
        cache_dir=req.cache_dir,
        log=plog,
        progress=req.progress,
        gpu_lock=gpu_lock,
        on_phase=phase,
    )
    marks.append(("", time.perf_counter()))
    for (name, t), (_, t_next) in pairwise(marks):
        timings[name] = timings.get(name, 0.0) + t_next - t
    return Computed(
        outputs=outputs,
        study_info=study.study,
        references=source_references(study),
        pipeline=spec.name,
        params=params,
        device=ran_on,
        seconds=time.perf_counter() - t0,
        timings=timings,
    )


def run_unit(
    req: RunRequest,
    *,
    log: logging.Logger | None = None,
    check: Callable[[Any], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    gpu_lock: threading.Lock | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> RunOutcome:
    """Load ``req.input``, run the pipeline, write the results atomically; exceptions pass through unchanged.

    ``log``: the job's log (input warnings, pipeline messages, UID notes); default the pipeline's own logger.
    ``check(study)``: called between loading and running (the worker's completeness check), may raise.
    ``on_stage(name)``: told ``setup``, ``load``, ``check``, ``run``, ``write`` as each begins, so the caller can
    classify a failure. ``gpu_lock``: serialises CUDA runs between the node's workers. ``on_phase``: as for
    :func:`compute_unit`.
    """
    computed = compute_unit(req, log=log, check=check, on_stage=on_stage, gpu_lock=gpu_lock, on_phase=on_phase)
    if on_stage is not None:
        on_stage("write")
    return write_results(req, computed, log=log)


def _map_meta(m: Any) -> str:
    """What maps.npz keeps of a map besides its values and unit (JSON): description, notes and geometry."""
    g = m.geometry
    return json.dumps(
        {
            "description": m.description,
            "notes": list(m.notes),
            "geometry": {
                "matrix": list(g.matrix),
                "pixel_spacing_mm": list(g.pixel_spacing_mm),
                "slice_thickness_mm": g.slice_thickness_mm,
                "orientation": list(g.orientation),
                "positions": [[float(v) for v in p] for p in g.positions],
                "frame_of_reference_uid": g.frame_of_reference_uid,
            },
        }
    )


def load_map(path: Path, kind: str) -> Any:
    """The ``kind`` map of a job's maps.npz as a QuantitativeMap with its geometry. ValueError naming the file when
    it has no such map (or one written before maps.npz kept geometry)."""
    import numpy as np

    from pipelines.types import Geometry, QuantitativeMap

    with np.load(path, allow_pickle=False) as f:
        if kind not in f or f"{kind}_meta" not in f:
            raise ValueError(f"{path} holds no {kind} map with its geometry")
        data, unit, meta = f[kind], str(f[f"{kind}_unit"]), json.loads(str(f[f"{kind}_meta"]))
    g = meta["geometry"]
    geometry = Geometry(
        matrix=(int(g["matrix"][0]), int(g["matrix"][1])),
        pixel_spacing_mm=(float(g["pixel_spacing_mm"][0]), float(g["pixel_spacing_mm"][1])),
        slice_thickness_mm=float(g["slice_thickness_mm"]),
        orientation=tuple(float(v) for v in g["orientation"]),  # type: ignore[arg-type]
        positions=np.asarray(g["positions"], dtype=np.float64).reshape(-1, 3),
        frame_of_reference_uid=g["frame_of_reference_uid"],
    )
    return QuantitativeMap(kind, data, unit, meta["description"], geometry, notes=list(meta["notes"]))


def write_results(req: RunRequest, computed: Computed, *, log: logging.Logger | None = None) -> RunOutcome:
    """Write ``computed`` to ``req.out_dir`` atomically (temp folder under ``req.tmp_root``, then a rename)."""
    import numpy as np

    from node.egress.dicom_writer import write_outputs
    from pipelines.types import QuantitativeMap, ReconImage

    t_write = time.perf_counter()
    outputs, params, ran_on, seconds = computed.outputs, computed.params, computed.device, computed.seconds
    out = req.out_dir
    if req.tmp_root is None:
        tmp_root, name = out.parent, f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    else:
        tmp_root, name = req.tmp_root, f"result-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_root / name
    tmp.mkdir()
    written: list[str] = []
    try:
        maps = {o.kind: o.data for o in outputs if isinstance(o, QuantitativeMap)}
        images = {o.kind: o.data for o in outputs if isinstance(o, ReconImage)}
        if maps:
            units = {f"{o.kind}_unit": np.array(o.unit) for o in outputs if isinstance(o, QuantitativeMap)}
            meta = {f"{o.kind}_meta": np.array(_map_meta(o)) for o in outputs if isinstance(o, QuantitativeMap)}
            # allow_pickle is numpy's default, spelt out so that mypy does not match the ``**`` arrays against it.
            np.savez(tmp / "maps.npz", allow_pickle=True, **maps, **units, **meta)
            written.append("maps.npz")
        if images:
            np.savez(tmp / "images.npz", allow_pickle=True, **images)
            written.append("images.npz")
        instances: list[Any] = []
        if req.dicom:
            instances = list(
                write_outputs(
                    outputs,
                    computed.study_info,
                    tmp / "dicom",
                    job_id=req.job_id,
                    references=computed.references,
                    templates_dir=req.templates_dir,
                    parametric_map=req.parametric_map,
                    logger=log,
                )
            )
            written.append(f"dicom/ ({len(instances)} files)")
        summary = {
            "pipeline": computed.pipeline,
            "input": str(req.input),
            "device": ran_on,
            "params": params,
            "seconds": round(seconds, 3),
            **req.summary,
            **({"dicom_files": len(instances)} if req.dicom else {}),
            "outputs": [
                {
                    "kind": o.kind,
                    "shape": list(o.data.shape),
                    "unit": getattr(o, "unit", ""),
                    "description": o.description,
                    "notes": list(o.notes),
                }
                for o in outputs
            ],
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        written.append("summary.json")
        _publish(tmp, out, req.replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return RunOutcome(
        outputs=outputs,
        out_dir=out,
        instances=_moved(instances, tmp, out),
        device=ran_on,
        params=params,
        seconds=seconds,
        written=written,
        timings={**computed.timings, "write": time.perf_counter() - t_write},
    )
