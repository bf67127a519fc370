"""``recon-node``: the command line of the reconstruction node.

Every subcommand prints errors as one readable line (``error: ...``) and exits 2 on bad input, never with a
bare traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("recon-node")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recon-node")
    except PackageNotFoundError:
        return "0+unknown"


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

    from pipelines.compute import select_device

    print(f"recon-node {_version()}")
    cuda = torch.cuda.get_device_name(0) if select_device("auto").type == "cuda" else "none"
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA device: {cuda}")
    return 0


# ---- simulate --------------------------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from node.ingest.mrd_client import send_study
    from pipelines.compute import set_threads
    from pipelines.physics.sequences import get_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import write_ismrmrd

    set_threads(args.threads)
    seq = get_sequence(args.sequence)
    if args.slices < 1:
        raise ValueError(f"--slices must be >= 1, got {args.slices}")
    settings = AcquisitionSettings(
        trajectory=args.trajectory,
        coils=args.coils,
        snr=args.snr,
        acceleration=args.acceleration,
        cartesian_mask=args.mask,
        fov_mm=args.fov,
        seed=args.seed,
        slice_thickness_mm=args.slice_thickness,
        slice_gap_mm=args.slice_gap,
    )
    t0 = time.perf_counter()
    stack = f", {args.slices} slices {args.slice_thickness:g} mm + {args.slice_gap:g} mm gap" if args.slices > 1 else ""
    print(
        f"simulating {args.phantom} phantom {args.matrix}x{args.matrix}{stack}, sequence {seq.name} "
        f"({seq.n_frames} frames), {args.trajectory}, {args.coils} coils, SNR {args.snr:g}",
        file=sys.stderr,
    )
    if args.slices > 1:
        return _simulate_multislice(args, seq, settings, t0)
    study = simulate_study(
        args.phantom, seq, settings, matrix=args.matrix, field_strength_T=args.field, progress=not args.quiet
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_ismrmrd(study, out)
    truth_path = out.with_name(out.stem + "_truth.npz")
    # allow_pickle is numpy's default, spelt out so that mypy does not match the ``**`` arrays against it.
    np.savez_compressed(
        truth_path,
        allow_pickle=True,
        **study.truth,
        label_names=json.dumps({int(k): v for k, v in study.label_names.items()}),
    )
    written = [str(out), str(truth_path)]
    if args.dicom_out:
        from pipelines.sim.dicom_frames import write_dicom_frames

        files = write_dicom_frames(study, Path(args.dicom_out))
        written.append(f"{args.dicom_out} ({len(files)} DICOM frames)")
    if args.send:
        host, _, port = args.send.rpartition(":")
        replies = send_study(study, host or "127.0.0.1", int(port))
        written.append(f"sent to {args.send} ({len(replies)} replies)")
    print(
        f"wrote {', '.join(written)} in {time.perf_counter() - t0:.1f} s "
        f"(R = {study.acceleration:.2f}, noise std {study.noise_std:.3g})"
    )
    return 0


def _simulate_multislice(args: argparse.Namespace, seq: Any, settings: Any, t0: float) -> int:
    """``simulate --slices N``: one pass over the slices, each simulated, written (ISMRMRD, DICOM) and dropped."""
    import numpy as np

    from node.ingest.mrd_client import send_study
    from pipelines.sim.acquisition import simulate_multislice
    from pipelines.sim.dicom_frames import MAX_STORED_VALUE, write_dicom_frames
    from pipelines.sim.mrd_writer import IsmrmrdFileWriter, build_header

    ms = simulate_multislice(
        args.phantom,
        seq,
        settings,
        n_slices=args.slices,
        matrix=args.matrix,
        field_strength_T=args.field,
        progress=not args.quiet,
    )
    out = Path(args.out)
    n_dicom = 0
    scale = MAX_STORED_VALUE / ms.frame_peak if ms.frame_peak > 0 else 1.0
    n_per_slice = ms.n_frames * ms.n_readouts
    with IsmrmrdFileWriter(out, build_header(ms), chunk_rows=min(n_per_slice, 1024)) as writer:
        for s in range(ms.n_slices):
            st = ms.slice(s)
            writer.append(st)
            if args.dicom_out:
                n_dicom += len(write_dicom_frames(st, Path(args.dicom_out), scale=scale))
            if not args.quiet:
                z = float(ms.geometry.slice_locations_mm[s])
                print(
                    f"  slice {s + 1}/{ms.n_slices} at z = {z:+.1f} mm done ({time.perf_counter() - t0:.1f} s)",
                    file=sys.stderr,
                )
            del st  # before the next slice is simulated: one slice in memory at a time
    truth_path = out.with_name(out.stem + "_truth.npz")
    # allow_pickle is numpy's default, spelt out so that mypy does not match the ``**`` arrays against it.
    np.savez_compressed(
        truth_path,
        allow_pickle=True,
        **ms.truth,
        slice_positions_mm=ms.geometry.positions,
        label_names=json.dumps({int(k): v for k, v in ms.label_names.items()}),
    )
    written = [str(out), f"{truth_path} (maps [slices, y, x])"]
    if args.dicom_out:
        written.append(f"{args.dicom_out} ({n_dicom} DICOM frames, {ms.n_slices} slices in one series)")
    if args.send:
        host, _, port = args.send.rpartition(":")
        replies = send_study(out, host or "127.0.0.1", int(port))  # from the file: no second simulation
        written.append(f"sent to {args.send} ({len(replies)} replies)")
    print(
        f"wrote {', '.join(written)} in {time.perf_counter() - t0:.1f} s "
        f"(R = {ms.acceleration:.2f}, noise std {ms.noise_std:.3g})"
    )
    return 0


# ---- process ---------------------------------------------------------------------------------------------
def cmd_process(args: argparse.Namespace) -> int:
    from node.run import RunRequest, run_unit
    from pipelines.compute import set_threads

    set_threads(args.threads)
    out = Path(args.out)
    res = run_unit(
        RunRequest(
            input=Path(args.input),
            pipeline=args.pipeline,
            params=_parse_sets(args.set),
            out_dir=out,
            job_id=f"process-{out.resolve()}",
            replace=False,
            device=args.device,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            progress=not args.quiet,
            dicom=not args.no_dicom,
            b1_reference=Path(args.b1) if args.b1 else None,
        )
    )
    # Notes every output carries (the reconstruction's) once; the rest against their map.
    shared = [n for n in (res.outputs[0].notes if res.outputs else []) if all(n in o.notes for o in res.outputs)]
    for note in shared:
        print(f"note: {note}", file=sys.stderr)
    for o in res.outputs:
        for note in o.notes:
            if note not in shared:
                print(f"note ({o.kind}): {note}", file=sys.stderr)
    print(
        f"{args.pipeline}: {len(res.outputs)} output(s) in {res.seconds:.1f} s on {res.device} -> {out}/ "
        f"({', '.join(res.written)})"
    )
    return 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    from pipelines.definitions import list_pipelines

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
        raise ValueError(
            f"{e.path}: the site config has {len(e.problems)} problem(s) "
            f"(run `recon-node check-config {e.path}`):\n" + "\n".join(lines)
        ) from None


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


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        # The last column is left unpadded, so it has no width; every row has the same number of columns.
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


def cmd_status(args: argparse.Namespace) -> int:
    if args.url:
        from node.http.client import fetch_status

        out = fetch_status(
            args.url, state=args.state, limit=args.limit, log=args.log, user=args.user, token=args.token, ca=args.ca
        )
    elif args.config:
        out = _local_status(args)
    else:
        raise ValueError("give --config (this machine's node) or --url (a node's console)")
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    _print_status(out, args.log)
    return 0


def _local_status(args: argparse.Namespace) -> dict[str, Any]:
    """What ``status`` shows, read from the node's databases and run file (as ``/api/jobs`` serves it)."""
    from node.egress.egress import read_status
    from node.executors import cluster_status
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
    cluster, cluster_line = cluster_status(cfg.node.spool_dir) if node else (None, None)
    return {
        "counts": counts,
        "node": node,
        "cluster": cluster,
        "cluster_line": cluster_line,
        "destinations": destinations,
        "jobs": [
            {**{k: v for k, v in j.to_dict().items() if args.log or k != "log"}, "egress": egress.get(j.id)}
            for j in jobs
        ],
    }


def _print_status(out: dict[str, Any], show_log: bool) -> None:
    """The status table from :func:`_local_status`'s dict or a console's ``/api/jobs`` (the same shape)."""
    node, counts, destinations, jobs = out.get("node"), out["counts"], out["destinations"], out["jobs"]
    if node:
        print(
            f"node pid {node['pid']}: MRD port {node['mrd_port']}"
            + (f", MRD TLS port {node['mrd_tls_port']}" if node.get("mrd_tls_port") else "")
            + f", DICOM port {node.get('dicom_port')}"
            + (f", console port {node['http_port']}" if node.get("http_port") else "")
        )
    else:
        print("node: not running (no run file)")
    if out.get("cluster_line"):
        print(out["cluster_line"])
    print("jobs: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if destinations:
        print("destinations:")
        rows: list[tuple[str, ...]] = [("  NAME", "KIND", "TARGET", "CHECK", "PENDING", "SENT", "FAILED", "LAST ERROR")]
        for d in destinations:
            echo = {None: "-", True: "ok", False: "FAILED"}[d["echo_ok"]]
            rows.append(
                (
                    "  " + d["name"],
                    d["kind"],
                    d["target"],
                    echo,
                    str(d["pending"]),
                    str(d["sent"]),
                    str(d["failed"]),
                    (d["last_error"] or "")[:100],
                )
            )
        _table(rows)
    if jobs:
        rows = [("ID", "SOURCE", "ROUTE", "PIPELINE", "STATE", "TRIES", "AGE", "RAN ON", "EGRESS", "ERROR")]
        for j in jobs:
            tries = str(j["attempts"]) + (f" ({j['node_deaths']} node stop)" if j.get("node_deaths") else "")
            rows.append(
                (
                    j["id"],
                    j["source"] or "-",
                    j["route"] or "-",
                    j["pipeline"] or "-",
                    j["state"],
                    tries,
                    _age(j["created"]),
                    j.get("ran_on") or "-",
                    _egress_text(j.get("egress"), j["send_to"]),
                    (j["error"] or "")[:100],
                )
            )
        _table(rows)
    if show_log:
        for j in jobs:
            print(f"\n--- log of {j['id']} ---\n{j.get('log', '')}", end="")


def _open_store(cfg: Any) -> Any:
    from node.jobs import JobStore

    db = cfg.node.database_path
    if not db.exists():
        raise ValueError(f"no job database at {db}: the node has not run with this config yet")
    return JobStore(db, max_attempts=cfg.node.max_attempts, max_node_deaths=cfg.node.max_node_deaths)


def cmd_retry(args: argparse.Namespace) -> int:
    """Queue a failed / unrouted job again, routed with the current site config (a running node picks it up)."""
    from node import audit
    from node.operations import retry_job

    cfg = _load_site(args.config)
    if cfg.node.audit_log is not None:
        audit.configure(cfg.node.audit_log)
    store = _open_store(cfg)
    try:
        res = retry_job(cfg, store, args.job, force=args.force, actor="operator")
    finally:
        store.close()
    print(res.message() + "; a running node picks it up within a second")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    """Queue a done / sent job's DICOM outputs again for its destinations (delivered ones too)."""
    from node import audit
    from node.egress.outbox import Outbox
    from node.operations import resend_job

    cfg = _load_site(args.config, check_pipelines=False)
    if cfg.node.audit_log is not None:
        audit.configure(cfg.node.audit_log)
    store = _open_store(cfg)
    try:
        outbox = Outbox(cfg.node.outbox_path, recover=False)  # beside a running sender: leave rows in flight alone
        try:
            res = resend_job(cfg, store, outbox, args.job, to=args.to, actor="operator")
        finally:
            outbox.close()
    finally:
        store.close()
    print(res.message() + "; a running node sends them now, a stopped one when it starts")
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print the argon2 hash of a console password (from a prompt, or the first line of stdin when piped)."""
    import getpass

    try:
        from node.http.auth import hash_password
    except ImportError:
        raise ValueError('the console\'s password hashing needs the web extra: pip install "recon-node[web]"') from None
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            raise ValueError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        raise ValueError("use a password of at least 8 characters")
    print(hash_password(password))
    return 0


def cmd_new_token(args: argparse.Namespace) -> int:
    """Print a new bearer token (for the script or scraper) and the YAML entry (its SHA-256) for node.http.tokens."""
    from node.http.auth import new_token, token_digest

    token = new_token()
    print("the token (give it to the client; only its hash goes in the config):", file=sys.stderr, flush=True)
    print(token)
    print("add under node.http.tokens:", file=sys.stderr)
    print(f"  - {{name: {args.name}, role: {args.role}, sha256: {token_digest(token)}}}", file=sys.stderr)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from node.ingest.mrd_client import submit_file

    try:
        res = submit_file(args.file, args.host, args.port, config_name=args.config_name or None, timeout=args.timeout)
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
    from pipelines.compute import set_threads

    set_threads(None)
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
    ap = argparse.ArgumentParser(
        prog="recon-node",
        description=("Clinical reconstruction node for quantitative MRI: MRD/DICOM in, quantitative maps out."),
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    ap.add_argument("--version", action="version", version=f"recon-node {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("version", help="print versions and the compute device")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser(
        "demo",
        help="the whole loop on embedded defaults: scanner -> node -> maps in a PACS",
        description="Start a node in this process, send it a simulated brain MRF study over MRD "
        "and over DICOM, wait for both jobs, and show where the maps went, ROI values against the "
        "phantom's truth, and PNG previews. The first run builds the FISP dictionary (about 2.5 "
        "minutes on 2 cores) and caches it.",
    )
    p.add_argument("--matrix", type=int, default=64, help="image matrix of the simulated scan (default 64)")
    p.add_argument(
        "--workdir",
        default=None,
        help="keep everything here (default: ./recon-node-demo for the "
        "PACS folder and previews, a temporary folder for the spool)",
    )
    p.add_argument(
        "--pacs",
        choices=["folder", "orthanc"],
        default="folder",
        help="folder (default) or a throwaway local Orthanc when /usr/sbin/Orthanc exists",
    )
    p.add_argument("--quiet", action="store_true", help="only the results")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "simulate",
        help="simulate an MRF scan: ISMRMRD file, ground truth, optional DICOM",
        description="Simulate an MRF acquisition of a numerical phantom and write it as an "
        "ISMRMRD file (plus <out>_truth.npz with the ground-truth maps).",
    )
    p.add_argument("--phantom", choices=["brain", "thigh"], default="brain")
    p.add_argument("--sequence", default="fisp", help="fisp, t1ff, or a JSON schedule (default fisp)")
    p.add_argument("--trajectory", choices=["cartesian", "radial", "spiral"], default="cartesian")
    p.add_argument("--matrix", type=int, default=128)
    p.add_argument("--coils", type=int, default=8)
    p.add_argument("--snr", type=float, default=30.0, help="mean object signal / noise std per coil (inf: none)")
    p.add_argument(
        "--acceleration",
        type=float,
        default=None,
        help="undersampling per frame (default: Cartesian full, non-Cartesian one readout/frame)",
    )
    p.add_argument("--mask", choices=["equidistant", "random"], default="equidistant", help="Cartesian mask")
    p.add_argument("--field", type=float, default=3.0, help="field strength in tesla (1.5 or 3)")
    p.add_argument("--fov", type=float, default=240.0, help="field of view in mm")
    p.add_argument(
        "--slices",
        type=int,
        default=1,
        help="number of parallel axial slices, each through its own part of the anatomy (default 1)",
    )
    p.add_argument("--slice-thickness", type=float, default=5.0, help="slice thickness in mm (default 5)")
    p.add_argument(
        "--slice-gap",
        type=float,
        default=0.0,
        help="gap between neighbouring slices in mm (centre spacing = thickness + gap; default 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="ISMRMRD HDF5 file to write")
    p.add_argument("--dicom-out", help="also write the fingerprint frames as a DICOM MR series here")
    p.add_argument("--send", metavar="HOST:PORT", help="also stream the data to an MRD server")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "process",
        help="run a pipeline on an ISMRMRD file or DICOM folder, no server",
        description="Run a registered pipeline offline and write maps.npz / images.npz, "
        "DICOM series and summary.json to --out.",
    )
    p.add_argument("input", help="ISMRMRD .h5 file, DICOM file or DICOM folder")
    p.add_argument("--pipeline", required=True, help="pipeline name (see `recon-node pipelines`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline parameter")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", default=None, help="where pipelines may cache dictionaries")
    p.add_argument("--no-dicom", action="store_true", help="skip the DICOM series")
    p.add_argument(
        "--b1",
        default=None,
        metavar="MAPS_NPZ",
        help="raw input: the study's measured B1 map, the maps.npz of a b1_map run on its B1 series "
        "(`process B1_DICOM_DIR --pipeline b1_map --set nominal=800 --out B1_OUT`)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("pipelines", help="list the registered pipelines and their parameters")
    p.set_defaults(func=cmd_pipelines)
    p = sub.add_parser(
        "serve",
        help="run the node: MRD server, DICOM SCP and workers",
        description="Run the reconstruction node with a site config until SIGTERM / Ctrl-C. "
        "Jobs left by a stopped node are resumed.",
    )
    p.add_argument("--config", required=True, help="site config YAML (see deploy/site.example.yaml)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "status",
        help="list the node's jobs and their states",
        description="Read the node's job database: one line per job plus counts per state.",
    )
    p.add_argument("--config", help="site config YAML (the node on this machine)")
    p.add_argument(
        "--url",
        help="a node's console instead, e.g. https://recon-node:8443 (user: --user + RECON_NODE_PASSWORD or a "
        "prompt; token: --token or RECON_NODE_TOKEN)",
    )
    p.add_argument("--user", default=None, help="console user for --url (default: $RECON_NODE_USER)")
    p.add_argument("--token", default=None, help="console bearer token for --url (default: $RECON_NODE_TOKEN)")
    p.add_argument("--ca", default=None, help="CA certificate (PEM) that signed the console's certificate")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--state", choices=["queued", "running", "done", "sent", "failed", "unrouted"], help="only this state"
    )
    p.add_argument("--limit", type=int, default=None, help="only the newest N jobs")
    p.add_argument("--log", action="store_true", help="include each job's log")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "retry",
        help="queue a failed or unrouted job again, routed with the current config",
        description="Put a failed (or unrouted) job back in the queue with fresh attempt counts, "
        "re-routed with the current site config (fix the route or config first). A running node "
        "picks it up at once. Done / sent jobs need --force.",
    )
    p.add_argument("job", help="job id (see `recon-node status`)")
    p.add_argument("--config", required=True, help="site config YAML")
    p.add_argument("--force", action="store_true", help="also run a done or sent job again")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "resend",
        help="send a job's DICOM outputs to its destinations again",
        description="Queue every DICOM output of a done or sent job again in the egress outbox "
        "(instances delivered before too); the node's sender delivers them.",
    )
    p.add_argument("job", help="job id (see `recon-node status`)")
    p.add_argument("--config", required=True, help="site config YAML")
    p.add_argument(
        "--to",
        action="append",
        default=None,
        metavar="DESTINATION",
        help="only this destination (repeatable; default: the destinations of the job's route)",
    )
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser(
        "submit",
        help="send an ISMRMRD file to an MRD server, as a scanner would",
        description="Stream an ISMRMRD .h5 file to an MRD server and print its replies. Exit 0 "
        "when a job was queued (or done), 3 when the data was kept but no route matched, 1 on ERR.",
    )
    p.add_argument("file", help="ISMRMRD HDF5 file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9002)
    p.add_argument("--config-name", default="default", help="MRD config name sent first ('' for none)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds of server silence before giving up")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "train",
        help="train a network on simulated data (xpdnet, ncpdnet, estimator)",
        description="Train XPDNet, NC-PDNet or a fingerprint-to-map estimator on data from the "
        "built-in simulator; checkpoints, resume, seed, CUDA when present. "
        "`recon-node train MODEL --help` lists the model's options.",
        add_help=True,
    )
    p.add_argument("model", choices=sorted(TRAINERS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the model's own options")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "check-config",
        help="validate a site config and summarise it",
        description="Print every problem of a site config with its key and a hint (exit 1), "
        "or a summary of sources, routes and destinations (exit 0).",
    )
    p.add_argument("file", help="site config YAML")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "hash-password",
        help="hash a console password for node.http.users (argon2)",
        description="Read a password (a prompt, or the first line of stdin) and print its argon2 hash to paste "
        "as password_hash under node.http.users.",
    )
    p.set_defaults(func=cmd_hash_password)

    p = sub.add_parser(
        "new-token",
        help="make a console bearer token and its node.http.tokens entry",
        description="Print a new random bearer token on stdout and, on stderr, the YAML entry (name, role, "
        "SHA-256 of the token) for node.http.tokens. Only the hash goes in the config.",
    )
    p.add_argument("--name", default="scraper", help="name of the token in the config and audit log")
    p.add_argument("--role", choices=["viewer", "operator"], default="viewer")
    p.set_defaults(func=cmd_new_token)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
