"""``recon-node``: the command line of the reconstruction node.

Every subcommand prints errors as one readable line (``error: ...``) and exits 2 on bad input, never with a
bare traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("recon-node")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recon-node")
    except PackageNotFoundError:
        return "0+unknown"


def _set_threads(n: int | None) -> None:
    import torch

    n = n or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))


def _parse_sets(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


# ---- version ---------------------------------------------------------------------------------------------
def cmd_version(args: argparse.Namespace) -> int:
    import torch

    print(f"recon-node {_version()}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA device: {cuda}")
    return 0


# ---- simulate --------------------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from pipelines.physics.sequences import get_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import send_study, write_ismrmrd

    _set_threads(args.threads)
    seq = get_sequence(args.sequence)
    settings = AcquisitionSettings(
        trajectory=args.trajectory, coils=args.coils, snr=args.snr, acceleration=args.acceleration,
        cartesian_mask=args.mask, fov_mm=args.fov, seed=args.seed,
    )
    t0 = time.perf_counter()
    print(f"simulating {args.phantom} phantom {args.matrix}x{args.matrix}, sequence {seq.name} "
          f"({seq.n_frames} frames), {args.trajectory}, {args.coils} coils, SNR {args.snr:g}", file=sys.stderr)
    study = simulate_study(args.phantom, seq, settings, matrix=args.matrix, field_strength_T=args.field,
                           progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_ismrmrd(study, out)
    truth_path = out.with_name(out.stem + "_truth.npz")
    np.savez_compressed(truth_path, **study.truth,
                        label_names=json.dumps({int(k): v for k, v in study.label_names.items()}))
    written = [str(out), str(truth_path)]
    if args.dicom_out:
        from pipelines.sim.dicom_frames import write_dicom_frames

        files = write_dicom_frames(study, Path(args.dicom_out))
        written.append(f"{args.dicom_out} ({len(files)} DICOM frames)")
    if args.send:
        host, _, port = args.send.rpartition(":")
        replies = send_study(study, host or "127.0.0.1", int(port))
        written.append(f"sent to {args.send} ({len(replies)} replies)")
    print(f"wrote {', '.join(written)} in {time.perf_counter() - t0:.1f} s "
          f"(R = {study.acceleration:.2f}, noise std {study.noise_std:.3g})")
    return 0


# ---- process ---------------------------------------------------------------------------------------------
def load_study(path: Path) -> Any:
    """An ISMRMRD file (.h5/.mrd) as RawStudy, a DICOM file or folder as ImageStudy."""
    if not path.exists():
        raise ValueError(f"input {path} does not exist")
    if path.is_file() and path.suffix.lower() in (".h5", ".hdf5", ".mrd", ".ismrmrd"):
        from pipelines.io.mrd_reader import raw_study_from_hdf5

        return raw_study_from_hdf5(path)
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(8)
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            from pipelines.io.mrd_reader import raw_study_from_hdf5

            return raw_study_from_hdf5(path)
    from pipelines.io.dicom_reader import image_study_from_dicom

    return image_study_from_dicom(path)


def cmd_process(args: argparse.Namespace) -> int:
    import numpy as np

    from node.egress.dicom_writer import write_outputs
    from pipelines.registry import RunContext, get_pipeline, select_device
    from pipelines.types import QuantitativeMap, ReconImage

    _set_threads(args.threads)
    spec = get_pipeline(args.pipeline)
    params = spec.resolve_params(_parse_sets(args.set))
    device = select_device(args.device)
    study = load_study(Path(args.input))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(device=device, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                     progress=not args.quiet, log=logging.getLogger(f"pipelines.{spec.name}"))
    t0 = time.perf_counter()
    outputs = spec(study, params, ctx)
    elapsed = time.perf_counter() - t0
    maps = {o.kind: o.data for o in outputs if isinstance(o, QuantitativeMap)}
    images = {o.kind: o.data for o in outputs if isinstance(o, ReconImage)}
    written = []
    if maps:
        np.savez(out / "maps.npz", **maps, **{f"{k}_unit": np.array(o.unit) for o in outputs
                                            if isinstance(o, QuantitativeMap) for k in [o.kind]})
        written.append("maps.npz")
    if images:
        np.savez(out / "images.npz", **images)
        written.append("images.npz")
    if not args.no_dicom:
        files = write_outputs(outputs, study.study, out / "dicom", job_id=f"process-{out.resolve()}")
        written.append(f"dicom/ ({len(files)} files)")
    summary = {
        "pipeline": spec.name, "input": str(args.input), "device": str(device), "seconds": round(elapsed, 3),
        "params": params,
        "outputs": [{"kind": o.kind, "shape": list(o.data.shape), "unit": getattr(o, "unit", ""),
                     "description": o.description, "notes": o.notes} for o in outputs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for o in outputs:
        for note in o.notes:
            print(f"note ({o.kind}): {note}", file=sys.stderr)
    print(f"{spec.name}: {len(outputs)} output(s) in {elapsed:.1f} s on {device} -> {out}/ "
          f"({', '.join(written + ['summary.json'])})")
    return 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    from pipelines.registry import list_pipelines

    for spec in list_pipelines():
        print(f"{spec.name:24s} [{spec.input_kind}] {spec.summary}")
        for name, p in spec.params.items():
            print(f"    --set {name}=...  (default {p.default!r}) {p.help}")
    return 0


# ---- node service: serve, status, submit, check-config ----------------------------------------------------
def _load_site(path: str, check_pipelines: bool = True) -> Any:
    from node.config import ConfigError, load_config

    try:
        return load_config(path, check_pipelines=check_pipelines)
    except ConfigError as e:
        lines = [f"  {k}: {m}" + (f"\n      hint: {h}" if h else "") for k, m, h in e.problems]
        raise ValueError(f"{e.path}: the site config has {len(e.problems)} problem(s) "
                         f"(run `recon-node check-config {e.path}`):\n" + "\n".join(lines)) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_config, summary

    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(f"{e.path}: {len(e.problems)} problem(s)", file=sys.stderr)
        for key, msg, hint in e.problems:
            print(f"  {key}: {msg}", file=sys.stderr)
            if hint:
                print(f"      hint: {hint}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    print(summary(cfg))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import NodeService

    cfg = _load_site(args.config)
    NodeService(cfg).serve_forever()
    return 0


def _age(ts: float | None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, time.time() - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


def _egress_text(e: dict[str, Any] | None, send_to: list[str]) -> str:
    if not send_to:
        return "-"
    if not e:
        return "not queued"
    text = f"{e['sent']}/{e['total']} sent"
    if e["failed"]:
        text += f", {e['failed']} failed"
    return text


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def cmd_status(args: argparse.Namespace) -> int:
    from node.egress.egress import read_status
    from node.jobs import JobStore

    cfg = _load_site(args.config, check_pipelines=False)
    db = cfg.node.database_path
    if not db.exists():
        raise ValueError(f"no job database at {db}: the node has not run with this config yet")
    store = JobStore(db, max_attempts=cfg.node.max_attempts)
    try:
        jobs = store.list(state=args.state, limit=args.limit)
        counts = store.counts()
    finally:
        store.close()
    destinations, egress = read_status(cfg, [j.id for j in jobs])
    run_file = cfg.node.spool_dir / "run" / "node.json"
    node = json.loads(run_file.read_text()) if run_file.exists() else None
    if args.json:
        out = {"counts": counts, "node": node, "destinations": destinations, "jobs": [
            {**{k: v for k, v in j.to_dict().items() if args.log or k != "log"}, "egress": egress.get(j.id)}
            for j in jobs]}
        print(json.dumps(out, indent=1, default=str))
        return 0
    if node:
        print(f"node pid {node['pid']}: MRD port {node['mrd_port']}, DICOM port {node.get('dicom_port')}")
    else:
        print("node: not running (no run file)")
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if destinations:
        print("destinations:")
        rows = [("  NAME", "KIND", "TARGET", "CHECK", "PENDING", "SENT", "FAILED", "LAST ERROR")]
        for d in destinations:
            echo = {None: "-", True: "ok", False: "FAILED"}[d["echo_ok"]]
            rows.append(("  " + d["name"], d["kind"], d["target"], echo, str(d["pending"]), str(d["sent"]),
                         str(d["failed"]), (d["last_error"] or "")[:100]))
        _table(rows)
    if jobs:
        rows = [("ID", "SOURCE", "ROUTE", "PIPELINE", "STATE", "TRIES", "AGE", "EGRESS", "ERROR")]
        for j in jobs:
            rows.append((j.id, j.source or "-", j.route or "-", j.pipeline or "-", j.state, str(j.attempts),
                         _age(j.created), _egress_text(egress.get(j.id), j.send_to), (j.error or "")[:100]))
        _table(rows)
    if args.log:
        for j in jobs:
            print(f"\n--- log of {j.id} ---\n{j.log}", end="")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from node.ingest.mrd_client import submit_file

    try:
        res = submit_file(args.file, args.host, args.port, config_name=args.config_name or None,
                          timeout=args.timeout)
    except (ConnectionError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for t in res.texts:
        print(t)
    if res.n_images:
        print(f"received {res.n_images} images")
    return res.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import main as demo_main

    _set_threads(None)
    return demo_main(matrix=args.matrix, workdir=args.workdir, pacs=args.pacs, quiet=args.quiet)


TRAINERS = {
    "xpdnet": "pipelines.recon.train_xpdnet",
    "ncpdnet": "pipelines.recon.train_ncpdnet",
    "estimator": "pipelines.mapping.train_estimator",
}


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(TRAINERS[args.model]).main(list(args.args)) or 0)


# ---- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="recon-node", description=(
        "Clinical reconstruction node for quantitative MRI: MRD/DICOM in, quantitative maps out."))
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("version", help="print versions and the compute device")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("demo", help="the whole loop on embedded defaults: scanner -> node -> maps in a PACS",
                       description="Start a node in this process, send it a simulated brain MRF study over MRD "
                       "and over DICOM, wait for both jobs, and show where the maps went, ROI values against the "
                       "phantom's truth, and PNG previews. The first run builds the FISP dictionary (about 2.5 "
                       "minutes on 2 cores) and caches it.")
    p.add_argument("--matrix", type=int, default=64, help="image matrix of the simulated scan (default 64)")
    p.add_argument("--workdir", default=None, help="keep everything here (default: ./recon-node-demo for the "
                   "PACS folder and previews, a temporary folder for the spool)")
    p.add_argument("--pacs", choices=["folder", "orthanc"], default="folder",
                   help="folder (default) or a throwaway local Orthanc when /usr/sbin/Orthanc exists")
    p.add_argument("--quiet", action="store_true", help="only the results")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="simulate an MRF scan: ISMRMRD file, ground truth, optional DICOM",
                       description="Simulate an MRF acquisition of a numerical phantom and write it as an "
                       "ISMRMRD file (plus <out>_truth.npz with the ground-truth maps).")
    p.add_argument("--phantom", choices=["brain", "thigh"], default="brain")
    p.add_argument("--sequence", default="fisp", help="fisp, t1ff, or a JSON schedule (default fisp)")
    p.add_argument("--trajectory", choices=["cartesian", "radial", "spiral"], default="cartesian")
    p.add_argument("--matrix", type=int, default=128)
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--snr", type=float, default=30.0, help="mean object signal / noise std per coil (inf: none)")
    p.add_argument("--acceleration", type=float, default=None,
                   help="undersampling per frame (default: Cartesian full, non-Cartesian one readout/frame)")
    p.add_argument("--mask", choices=["equidistant", "random"], default="equidistant", help="Cartesian mask")
    p.add_argument("--field", type=float, default=3.0, help="field strength in tesla (1.5 or 3)")
    p.add_argument("--fov", type=float, default=240.0, help="field of view in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="ISMRMRD HDF5 file to write")
    p.add_argument("--dicom-out", help="also write the fingerprint frames as a DICOM MR series here")
    p.add_argument("--send", metavar="HOST:PORT", help="also stream the data to an MRD server")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("process", help="run a pipeline on an ISMRMRD file or DICOM folder, no server",
                       description="Run a registered pipeline offline and write maps.npz / images.npz, "
                       "DICOM series and summary.json to --out.")
    p.add_argument("input", help="ISMRMRD .h5 file, DICOM file or DICOM folder")
    p.add_argument("--pipeline", required=True, help="pipeline name (see `recon-node pipelines`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline parameter")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", default=None, help="where pipelines may cache dictionaries")
    p.add_argument("--no-dicom", action="store_true", help="skip the DICOM series")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("pipelines", help="list the registered pipelines and their parameters")
    p.set_defaults(func=cmd_pipelines)
    p = sub.add_parser("serve", help="run the node: MRD server, DICOM SCP and workers",
                       description="Run the reconstruction node with a site config until SIGTERM / Ctrl-C. "
                       "Jobs left by a stopped node are resumed.")
    p.add_argument("--config", required=True, help="site config YAML (see deploy/site.example.yaml)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="list the node's jobs and their states",
                       description="Read the node's job database: one line per job plus counts per state.")
    p.add_argument("--config", required=True, help="site config YAML")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--state", choices=["queued", "running", "done", "sent", "failed", "unrouted"],
                   help="only this state")
    p.add_argument("--limit", type=int, default=None, help="only the newest N jobs")
    p.add_argument("--log", action="store_true", help="include each job's log")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="send an ISMRMRD file to an MRD server, as a scanner would",
                       description="Stream an ISMRMRD .h5 file to an MRD server and print its replies. Exit 0 "
                       "when a job was queued (or done), 3 when the data was kept but no route matched, 1 on ERR.")
    p.add_argument("file", help="ISMRMRD HDF5 file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--config-name", default="default", help="MRD config name sent first ('' for none)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds of server silence before giving up")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("train", help="train a network on simulated data (xpdnet, ncpdnet, estimator)",
                       description="Train XPDNet, NC-PDNet or a fingerprint-to-map estimator on data from the "
                       "built-in simulator; checkpoints, resume, seed, CUDA when present. "
                       "`recon-node train MODEL --help` lists the model's options.", add_help=True)
    p.add_argument("model", choices=sorted(TRAINERS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the model's own options")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check-config", help="validate a site config and summarise it",
                       description="Print every problem of a site config with its key and a hint (exit 1), "
                       "or a summary of sources, routes and destinations (exit 0).")
    p.add_argument("file", help="site config YAML")
    p.set_defaults(func=cmd_check_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
