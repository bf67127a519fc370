"""``recon-node demo``: the whole loop on one machine, on embedded defaults, with no site config.

1. A PACS: a folder (``<workdir>/pacs``, files as ``<StudyUID>/<SeriesUID>/<SOPUID>.dcm``) or, with
   ``--pacs orthanc``, a throwaway Orthanc on free loopback ports with its own storage.
2. The node, in this process (:class:`node.service.NodeService` on free loopback ports, spool and job database in
   ``<workdir>/spool`` or a temporary folder).
3. A scanner: a simulated brain MRF study (FISP, 1000 frames, 8 coils) sent as raw data over MRD and as an
   image series (fingerprint frames) over DICOM C-STORE (pynetdicom; DCMTK is not needed).
4. Both jobs are followed until their maps reached the PACS; the delivered DICOM files are read back (through the
   Real World Value Mapping) and compared with the phantom's truth per tissue; PNG previews are written.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("recon-node.demo")

SCANNER_AE = "DEMO_SCANNER"
NODE_AE = "RECON_DEMO"
TISSUES = ("white_matter", "grey_matter", "csf", "lesion")
PREVIEW_KINDS = ("t1", "t2", "pd", "b1", "residual", "ff")


@dataclass
class DemoOptions:
    matrix: int = 64
    workdir: Path | None = None
    pacs: str = "folder"  # folder | orthanc
    quiet: bool = False
    snr: float = 40.0
    coils: int = 8
    timeout_s: float = 3600.0


@dataclass
class PathResult:
    """One scanner path (mrd or dicom) after the demo: its job and what arrived at the PACS."""

    name: str
    job_id: str = ""
    state: str = ""
    pipeline: str = ""
    error: str | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> [y, x] decoded from the delivered DICOM
    units: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)  # kind -> SeriesInstanceUID at the PACS
    instances: int = 0
    roi: dict[str, dict[str, float]] = field(default_factory=dict)  # tissue -> {t1, t1_truth, t2, t2_truth}
    lesion: dict[str, float] = field(default_factory=dict)  # see lesion_conspicuity
    previews: list[Path] = field(default_factory=list)


class _Printer:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, text: str, always: bool = False) -> None:
        if always or not self.quiet:
            print(text, flush=True)


# ---- the pieces ------------------------------------------------------------------------------------------------
def _raw_pipeline(matrix: int) -> tuple[str, dict[str, Any], str, str]:
    """The MRD route: raw spiral MRF -> pipeline, its parameters, the trajectory, and why that reconstruction.

    At the matrix the shipped MRF NC-PDNet weights were trained for (64², the demo's default) the route uses the
    learned reconstruction: on held-out band-limited brains there it beats the classical reconstructions in white
    matter, grey matter and CSF, and on the demo's brain it shows the lesion, which CG-SENSE + Hann blurs away
    (coupled TV, the default, shows it too; tests/unit/test_demo_lesion.py). At any other matrix the weights are
    not validated (at 128² they lose in grey matter and CSF), so the pipeline's default runs."""
    from pipelines.recon.ncpdnet import SHIPPED_MRF
    from pipelines.weights_io import shipped_weights, weights_metadata

    trained = int(weights_metadata(shipped_weights(SHIPPED_MRF)).get("matrix", 0))
    if matrix == trained:
        return (
            "mrf",
            {"recon": "ncpdnet"},
            "spiral",
            f"recon=ncpdnet, the learned reconstruction, at the {trained}x{trained} matrix its shipped weights were "
            "trained for (a site's default stays recon=auto: coupled TV)",
        )
    return (
        "mrf",
        {},
        "spiral",
        f"the default reconstruction (coupled TV); the shipped NC-PDNet weights are for {trained}x{trained}",
    )


def _config(spool: Path, pacs_dest: dict[str, Any], raw_pipeline: str, raw_params: dict[str, Any]) -> Any:
    from node.config import parse_config

    return parse_config(
        {
            "node": {
                "ae_title": NODE_AE,
                "bind": "127.0.0.1",
                "dicom_port": 0,
                "mrd_port": 0,
                "spool_dir": str(spool),
                "disk_reserve_mb": 0,
                "workers": 1,
                "shutdown_grace_s": 5,
            },
            "sources": [
                {"name": "demo-scanner", "ae_title": SCANNER_AE, "hosts": ["127.0.0.1"], "protocols": ["dicom", "mrd"]}
            ],
            "destinations": [pacs_dest],
            "egress": {"backoff_base_s": 0.5, "backoff_max_s": 5},
            "grouping": {"default": {"by": "series", "quiet_seconds": 2}},
            "routes": [
                {
                    "name": "raw-mrf",
                    "match": {"input": "mrd"},
                    "pipeline": raw_pipeline,
                    "params": raw_params,
                    "send_to": [pacs_dest["name"]],
                },
                {
                    "name": "mrf-images",
                    "match": {"input": "dicom", "modality": "MR"},
                    "pipeline": "mrf_maps_from_images",
                    "send_to": [pacs_dest["name"]],
                },
            ],
        },
        where="<demo config>",
    )


def _simulate(opts: DemoOptions, trajectory: str) -> Any:
    from pipelines.physics.sequences import fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study

    return simulate_study(
        "brain",
        fisp_sequence(),
        AcquisitionSettings(trajectory=trajectory, coils=opts.coils, snr=opts.snr, seed=7),
        matrix=opts.matrix,
    )


def _dicom_frames(study: Any, out_dir: Path, snr: float) -> list[Path]:
    """The scanner's own reconstruction: noisy magnitude fingerprint frames as an MR series."""
    from pipelines.sim.dicom_frames import write_dicom_frames

    x = study.fingerprints
    rng = np.random.default_rng(11)
    sigma = float(np.abs(x)[:, study.truth["mask"] > 0].mean()) / snr
    noisy = np.abs(x + sigma / np.sqrt(2) * (rng.standard_normal(x.shape) + 1j * rng.standard_normal(x.shape)))
    return write_dicom_frames(study, out_dir, images=noisy.astype(np.float32), series_number=2)


def store_files(files: list[Path], port: int, calling_ae: str = SCANNER_AE, called_ae: str = NODE_AE) -> int:
    """C-STORE every file to the node in one association (pynetdicom); returns how many were stored."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
    from pynetdicom import AE

    from node.tcp import no_delay

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"the node's DICOM SCP at 127.0.0.1:{port} refused the association")
    no_delay(assoc)
    stored = 0
    try:
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            if status is None or int(status.get("Status", -1)) != 0:
                raise RuntimeError(f"C-STORE of {f.name} failed: {status}")
            stored += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def decode(ds: Any) -> np.ndarray:
    """Stored pixels -> real values through the Real World Value Mapping (else the Modality LUT rescale)."""
    px = ds.pixel_array.astype(np.float64)
    if "RealWorldValueMappingSequence" in ds:
        rw = ds.RealWorldValueMappingSequence[0]
        return px * float(rw.RealWorldValueSlope) + float(rw.RealWorldValueIntercept)
    return px * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))


def roi_table(
    maps: dict[str, np.ndarray], truth: dict[str, np.ndarray], label_names: dict[int, str]
) -> dict[str, dict[str, float]]:
    """Median T1 / T2 per tissue (ms) against the phantom's truth (same ROI)."""
    out: dict[str, dict[str, float]] = {}
    labels = truth["labels"]
    for label, name in label_names.items():
        if name not in TISSUES:
            continue
        roi = labels == label
        if not roi.any():
            continue
        row = {"voxels": float(roi.sum())}
        for kind, key in (("t1", "t1_ms"), ("t2", "t2_ms")):
            if kind in maps and maps[kind].shape == roi.shape:
                row[kind] = float(np.median(maps[kind][roi]))
                row[f"{kind}_truth"] = float(np.median(truth[key][roi]))
        out[name] = row
    return out


def lesion_conspicuity(
    maps: dict[str, np.ndarray], truth: dict[str, np.ndarray], label_names: dict[int, str]
) -> dict[str, float]:
    """Whether the T2 map shows the lesion: its voxels against the white matter around it (a ring 2-4 voxels out).

    ``visible``: the fraction of lesion voxels whose T2 exceeds the ring's 95th percentile (what stands out of the
    surrounding tissue's spread to a reader); ``contrast``: median lesion T2 over median ring T2, minus 1, with the
    truth's contrast beside it. Empty when there is no lesion, no T2 map, or no white matter around it."""
    from scipy import ndimage

    labels = truth["labels"]
    ids = {name: label for label, name in label_names.items()}
    t2 = maps.get("t2")
    if "lesion" not in ids or "white_matter" not in ids or t2 is None or t2.shape != labels.shape:
        return {}
    lesion = labels == ids["lesion"]
    ring = (
        ndimage.binary_dilation(lesion, iterations=4)
        & ~ndimage.binary_dilation(lesion, iterations=1)
        & (labels == ids["white_matter"])
    )
    if not lesion.any() or ring.sum() < 8:
        return {}
    around = float(np.median(t2[ring]))
    true_around = float(np.median(truth["t2_ms"][ring]))
    return {
        "voxels": float(lesion.sum()),
        "visible": float(np.mean(t2[lesion] > np.percentile(t2[ring], 95))),
        "contrast": float(np.median(t2[lesion])) / around - 1 if around > 0 else float("nan"),
        "contrast_truth": float(np.median(truth["t2_ms"][lesion])) / true_around - 1,
    }


def write_previews(result: PathResult, out_dir: Path) -> list[Path]:
    """One PNG per map with a colour bar in the map's unit (:func:`node.previews.preview_png`)."""
    from node.previews import preview_png

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, data in sorted(result.maps.items()):
        path = out_dir / f"{result.name}_{kind}.png"
        path.write_bytes(preview_png(data, kind, result.units.get(kind, ""), f"{kind.upper()} ({result.name} path)"))
        paths.append(path)
    return paths


# ---- the run ---------------------------------------------------------------------------------------------------
def _wait_jobs(store: Any, egress: Any, expected: tuple[str, ...], say: _Printer, timeout_s: float) -> dict[str, Any]:
    """Follow the jobs (one per path) until each is sent, failed, or delivered with failures; print changes."""
    from node.egress.egress import summarise

    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        jobs = {("mrd" if j.kind == "mrd" else "dicom"): j for j in store.list()}
        counts = egress.outbox.job_counts(j.id for j in jobs.values())
        for path, j in jobs.items():
            e = summarise(counts.get(j.id, {}))
            line = f"{j.state}" + (f", {e['sent']}/{e['total']} instances at the PACS" if e["total"] else "")
            if seen.get(path) != line:
                seen[path] = line
                say(f"  [{time.monotonic() - t0:6.1f} s] {path} job {j.id} ({j.pipeline}): {line}")
        finished = {
            p: j
            for p, j in jobs.items()
            if j.state in ("sent", "failed")
            or (
                j.state == "done"
                and summarise(counts.get(j.id, {}))["pending"] == 0
                and summarise(counts.get(j.id, {}))["failed"] > 0
            )
        }
        if set(expected) <= set(finished):
            return jobs
        time.sleep(0.5)
    raise TimeoutError(f"the demo jobs did not finish within {timeout_s:.0f} s: {seen}")


def _delivered_files(pacs_kind: str, pacs_root: Path, orthanc: Any, study_uid: str, work: Path) -> list[Path]:
    if pacs_kind == "orthanc":
        return orthanc.download_study(study_uid, work / "orthanc-download")
    return sorted((pacs_root / study_uid).rglob("*.dcm"))


def _collect(result: PathResult, files: list[Path], outbox: Any) -> None:
    """Decode the delivered instances of this job (by SOP Instance UID, from the outbox) into maps."""
    import pydicom

    rows = {it.sop_instance_uid: Path(it.path).parent.name for it in outbox.items(job_id=result.job_id)}
    for f in files:
        ds = pydicom.dcmread(f)
        kind = rows.get(str(ds.SOPInstanceUID))
        if kind is None:
            continue
        result.instances += 1
        result.series[kind] = str(ds.SeriesInstanceUID)
        if kind.endswith("_pmap") or "RealWorldValueMappingSequence" not in ds:
            continue
        if int(ds.get("InstanceNumber", 1)) != 1:  # previews and ROI values from the first slice
            continue
        result.maps[kind] = decode(ds)
        rw = ds.RealWorldValueMappingSequence[0]
        units = rw.get("MeasurementUnitsCodeSequence")
        result.units[kind] = str(units[0].CodeValue) if units else ""


def run_demo(opts: DemoOptions) -> int:
    from node.service import NodeService
    from pipelines.mapping.dictionary import cached_path, default_cache_dir, fisp_spec
    from pipelines.physics.sequences import fisp_sequence

    say = _Printer(opts.quiet)
    root = (opts.workdir or Path("recon-node-demo")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tmp = None if opts.workdir else tempfile.TemporaryDirectory(prefix="recon-node-demo-")
    spool = root / "spool" if tmp is None else Path(tmp.name) / "spool"
    cache = default_cache_dir()
    say(
        "recon-node demo: a simulated scanner sends a brain MRF study to a node running in this process, "
        "which sends T1/T2/PD/B1 maps to a PACS.",
        always=True,
    )
    if not cached_path(fisp_sequence(), fisp_spec(), cache).exists():
        say(
            f"note: this first run builds the FISP dictionary (477k atoms, about a minute on 2 idle CPU cores) and "
            f"caches it in {cache}; later runs load it in under a second.",
            always=True,
        )

    orthanc = None
    if opts.pacs == "orthanc":
        from node.demo_pacs import start_local_orthanc

        orthanc = start_local_orthanc(root / "orthanc")
        dest = {
            "name": "pacs",
            "kind": "dicom",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
        say(
            f"PACS: Orthanc {orthanc.url} (DICOM {orthanc.aet}@127.0.0.1:{orthanc.dicom_port}, storage "
            f"{root / 'orthanc'})"
        )
    else:
        dest = {"name": "pacs", "kind": "folder", "path": str(root / "pacs")}
        say(f"PACS: folder {root / 'pacs'}")
    raw_pipeline, raw_params, trajectory, raw_why = _raw_pipeline(opts.matrix)
    cfg = _config(spool, dest, raw_pipeline, raw_params)
    cfg.node.cache_dir = cache
    service = NodeService(cfg)
    results = {"mrd": PathResult("mrd"), "dicom": PathResult("dicom")}
    try:
        service.start()
        # start() creates both listeners (or raises)
        assert service.mrd_server is not None and service.dicom_scp is not None
        mrd_port, dicom_port = service.mrd_server.port, service.dicom_scp.port
        say(f"node {NODE_AE}: MRD 127.0.0.1:{mrd_port}, DICOM 127.0.0.1:{dicom_port}, spool {spool}")
        t0 = time.monotonic()
        say(
            f"scanner: simulating a {opts.matrix}x{opts.matrix} brain, FISP 1000 frames, {trajectory}, "
            f"{opts.coils} coils, SNR {opts.snr:g} ..."
        )
        study = _simulate(opts, trajectory)
        say(f"scanner: simulated in {time.monotonic() - t0:.1f} s; study {study.study.study_instance_uid}")
        from node.ingest.mrd_client import send_study

        replies = [r for r in send_study(study, "127.0.0.1", mrd_port, timeout=120) if isinstance(r, str)]
        say(f"scanner -> node over MRD ({raw_pipeline} route, {raw_why}): {'; '.join(replies) or 'no reply'}")
        frames = _dicom_frames(study, root / "scanner-dicom" if tmp is None else Path(tmp.name) / "frames", opts.snr)
        n = store_files(frames, dicom_port)
        say(f"scanner -> node over DICOM: {n} fingerprint frames stored (mrf_maps_from_images route)")
        say("waiting for both jobs (reconstruction, maps, delivery):")
        jobs = _wait_jobs(service.store, service.egress, ("mrd", "dicom"), say, opts.timeout_s)
        files = _delivered_files(opts.pacs, root / "pacs", orthanc, study.study.study_instance_uid, root)
        for name, res in results.items():
            j = jobs[name]
            res.job_id, res.state, res.pipeline, res.error = j.id, j.state, j.pipeline or "", j.error
            _collect(res, files, service.egress.outbox)
            res.roi = roi_table(res.maps, study.truth, study.label_names)
            res.lesion = lesion_conspicuity(res.maps, study.truth, study.label_names)
            res.previews = write_previews(res, root / "previews") if res.maps else []
    finally:
        service.stop()
        if orthanc is not None:
            say(f"(Orthanc keeps its data in {root / 'orthanc'}; stopping it)")
            orthanc.stop()
        if tmp is not None:
            tmp.cleanup()
    return _report(results, study, opts, root, orthanc, raw_pipeline, say)


def _report(
    results: dict[str, PathResult],
    study: Any,
    opts: DemoOptions,
    root: Path,
    orthanc: Any,
    raw_pipeline: str,
    say: _Printer,
) -> int:
    from node.demo_pacs import ORTHANC_BINARY

    uid = study.study.study_instance_uid
    where = (
        f"Orthanc (study {uid}), stored in {root / 'orthanc'}; Orthanc stopped with the demo: to browse the maps run "
        f"`{ORTHANC_BINARY} {root / 'orthanc' / 'orthanc.json'}` and open {orthanc.url}/app/explorer.html"
        if orthanc is not None
        else f"{root / 'pacs' / uid}/<SeriesUID>/<SOPUID>.dcm"
    )
    say("", always=True)
    say(f"maps went to: {where}", always=True)
    for res in results.values():
        say(
            f"  {res.name} path: job {res.job_id} {res.state}, pipeline {res.pipeline}, {res.instances} instances "
            f"in {len(res.series)} series" + (f"; error: {res.error}" if res.error else ""),
            always=True,
        )
    if raw_pipeline != "mrf":
        say(
            "  note: this version has no raw MRF pipeline ('mrf'); the MRD path sends reconstructed frames only.",
            always=True,
        )
    say("", always=True)
    say(
        "ROI medians from the delivered DICOM maps (decoded through the Real World Value Mapping) vs. phantom truth:",
        always=True,
    )
    say(
        f"  {'path':6s} {'tissue':13s} {'T1 ms':>8s} {'truth':>8s} {'err':>7s}   {'T2 ms':>8s} {'truth':>8s} "
        f"{'err':>7s}",
        always=True,
    )
    table = {}
    for res in results.values():
        for tissue, r in res.roi.items():
            if "t1" not in r:
                continue
            e1 = r["t1"] / r["t1_truth"] - 1
            e2 = r["t2"] / r["t2_truth"] - 1
            say(
                f"  {res.name:6s} {tissue:13s} {r['t1']:8.0f} {r['t1_truth']:8.0f} {e1:+7.1%}   {r['t2']:8.1f} "
                f"{r['t2_truth']:8.1f} {e2:+7.1%}",
                always=True,
            )
        table[res.name] = {
            "job": res.job_id,
            "state": res.state,
            "pipeline": res.pipeline,
            "roi": res.roi,
            "series": res.series,
            "instances": res.instances,
            "previews": [str(p) for p in res.previews],
            "lesion": res.lesion,
        }
    for res in results.values():
        if res.lesion:
            les = res.lesion
            say(
                f"  {res.name:6s} lesion ({les['voxels']:.0f} voxels) in the T2 map: {les['visible']:.0%} of its "
                f"voxels above the surrounding white matter's 95th percentile; contrast {les['contrast']:+.0%} "
                f"(truth {les['contrast_truth']:+.0%})",
                always=True,
            )
    previews = [p for res in results.values() for p in res.previews]
    if previews:
        say("", always=True)
        say(f"previews ({len(previews)} PNG, colour bar in the map's unit):", always=True)
        for p in previews:
            say(f"  {p}", always=True)
    (root / "demo_results.json").write_text(json.dumps({"study_instance_uid": uid, "pacs": where, **table}, indent=1))
    say(f"summary: {root / 'demo_results.json'}", always=True)
    ok = all(r.state == "sent" for r in results.values()) and results["dicom"].roi
    return 0 if ok else 1


def main(matrix: int = 64, workdir: str | None = None, pacs: str = "folder", quiet: bool = False) -> int:
    if pacs == "orthanc":
        from node.demo_pacs import orthanc_binary

        if orthanc_binary() is None:
            print("Orthanc is not installed (/usr/sbin/Orthanc); using a folder as the PACS", file=sys.stderr)
            pacs = "folder"
    # The node's own INFO lines would drown the demo's progress; restored afterwards for in-process callers.
    names = [""] if quiet else ["pynetdicom", "recon-node", "node", "pipelines", "matplotlib", "highdicom"]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    # ... but the long steps (a first run builds the dictionary) say how far they are.
    jobs = logging.getLogger("recon-node.job")
    saved_jobs = (jobs.level, jobs.propagate)
    progress = _ProgressHandler()
    if not quiet:
        jobs.setLevel(logging.INFO)
        jobs.propagate = False
        jobs.addHandler(progress)
    try:
        return run_demo(DemoOptions(matrix=matrix, workdir=Path(workdir) if workdir else None, pacs=pacs, quiet=quiet))
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        jobs.removeHandler(progress)
        jobs.setLevel(saved_jobs[0])
        jobs.propagate = saved_jobs[1]


class _ProgressHandler(logging.Handler):
    """Prints the job-log lines of the slow stages (dictionary build, matching) on the demo's console."""

    _STAGES = ("dictionary", "matching:", "reconstruction of")

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(s in text for s in self._STAGES):
            print(f"    {record.name}: {text}", flush=True)


__all__ = ["DemoOptions", "PathResult", "run_demo", "main", "decode", "roi_table", "store_files"]
