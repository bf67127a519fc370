"""What the console shows, as plain dicts: one source for the HTML pages and the JSON API.

``jobs_view`` has the shape of ``recon-node status --json`` (``counts``, ``node``, ``destinations``, ``jobs``), so
``recon-node status --url`` prints the same table from it as ``recon-node status`` does from the database.
Nothing here needs the ``web`` extra.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.egress.egress import summarise
from node.jobs import STATES, Job

# how much of the audit log's end a job page reads for the job's timeline
AUDIT_TAIL_BYTES = 16 * 2**20


@dataclass
class JobFilter:
    """The jobs list's filters (page and API): state, source, route, created on or after ``since`` and on or
    before ``until`` (dates, the node's local time), newest ``limit``."""

    state: str | None = None
    source: str | None = None
    route: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None
    limit: int = 200
    log: bool = False

    @classmethod
    def parse(cls, q: dict[str, str]) -> JobFilter:
        """From query parameters; ``ValueError`` with a sentence for a bad one."""
        f = cls()
        state = (q.get("state") or "").strip()
        if state:
            if state not in STATES:
                raise ValueError(f"state {state!r}: use one of {', '.join(STATES)}")
            f.state = state
        f.source = (q.get("source") or "").strip() or None
        f.route = (q.get("route") or "").strip() or None
        for key in ("since", "until"):
            text = (q.get(key) or "").strip()
            if text:
                try:
                    setattr(f, key, dt.date.fromisoformat(text))
                except ValueError:
                    raise ValueError(f"{key} {text!r}: a date as YYYY-MM-DD") from None
        limit = (q.get("limit") or "").strip()
        if limit:
            if not limit.isdigit() or not 1 <= int(limit) <= 100000:
                raise ValueError(f"limit {limit!r}: a number from 1 to 100000")
            f.limit = int(limit)
        f.log = (q.get("log") or "") in ("1", "true", "yes")
        return f

    def matches(self, job: Job) -> bool:
        if self.source is not None and job.source != self.source:
            return False
        if self.route is not None and (job.route or "") != self.route:
            return False
        day = dt.datetime.fromtimestamp(job.created).date()
        if self.since is not None and day < self.since:
            return False
        return self.until is None or day <= self.until

    def query(self) -> dict[str, str]:
        """The filters as query parameters (for links), empty ones left out."""
        out = {"state": self.state, "source": self.source, "route": self.route}
        out |= {"since": self.since.isoformat() if self.since else None}
        out |= {"until": self.until.isoformat() if self.until else None}
        return {k: v for k, v in out.items() if v}


# ---- words for people ------------------------------------------------------------------------------------------
_ERROR_WORDS = {
    "MemoryError": "out of memory",
    "OutOfMemoryError": "out of memory",
    "FileNotFoundError": "a file is missing",
    "PermissionError": "no permission",
    "TimeoutError": "timed out",
    "ConnectionError": "connection problem",
    "ConnectionRefusedError": "connection refused",
    "ConnectionResetError": "connection lost",
    "OSError": "system error",
    "KeyError": "missing entry",
    "IndexError": "index out of range",
    "HeaderError": "bad raw-data header",
    "TemplateError": "DICOM template problem",
}
_EXC = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Z]\w*(?:Error|Exception|Exit))(?::\s*(.*))?$", re.S)


def plain_error(text: str | None) -> str | None:
    """A job's stored error (``Type: message``) as a sentence for people: the Python exception's name goes, a
    few kinds become words ("out of memory: ..."); the message itself is already written for people."""
    if not text:
        return None
    m = _EXC.match(text.strip())
    if not m:
        return text.strip()
    words, rest = _ERROR_WORDS.get(m.group(1)), (m.group(2) or "").strip()
    if words and rest:
        out = f"{words}: {rest}"
    else:
        out = rest or words or m.group(1)
    return out[:1].upper() + out[1:]


def age_text(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    s = max(0.0, (now or time.time()) - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


def local_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# ---- jobs ------------------------------------------------------------------------------------------------------
def _egress(counts: dict[str, dict[str, int]] | None) -> dict[str, Any] | None:
    if not counts:
        return None
    return {**summarise(counts), "destinations": counts}


def job_dict(job: Job, egress: dict[str, Any] | None, *, log: bool = False) -> dict[str, Any]:
    """The job as the API gives it: the store's fields (``log`` only when asked), ``ran_on`` when the job store
    keeps it, ``egress`` (sent / pending / failed, per destination), ``error_plain``."""
    d = {k: v for k, v in job.to_dict().items() if log or k != "log"}
    d["ran_on"] = getattr(job, "ran_on", None)
    d["egress"] = egress
    d["error_plain"] = plain_error(job.error)
    return d


def run_info(service: Any) -> dict[str, Any] | None:
    path = service.cfg.node.spool_dir / "run" / "node.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info


def jobs_view(service: Any, f: JobFilter) -> dict[str, Any]:
    """Counts per state, the node's run info, destinations, and the newest ``f.limit`` jobs that match ``f``
    (oldest first, as ``recon-node status`` lists them)."""
    store = service.store
    counts_by_state = store.counts()
    if f.source is None and f.route is None and f.since is None and f.until is None:
        jobs = store.list(state=f.state, limit=f.limit or None)  # the newest, straight from SQLite
        total = counts_by_state.get(f.state, 0) if f.state else sum(counts_by_state.values())
    else:  # filters the job store has no query for: read the state's jobs once, newest kept
        jobs = [j for j in store.list(state=f.state) if f.matches(j)]
        total = len(jobs)
        jobs = jobs[-f.limit :] if f.limit else jobs
    counts = service.egress.outbox.job_counts([j.id for j in jobs])
    from node.executors import cluster_status

    cluster, cluster_line = cluster_status(service.cfg.node.spool_dir)
    return {
        "counts": counts_by_state,
        "node": run_info(service),
        "cluster": cluster,
        "cluster_line": cluster_line,
        "destinations": service.egress.destination_status(),
        "matching": total,
        "jobs": [job_dict(j, _egress(counts.get(j.id)), log=f.log) for j in jobs],
    }


def _audit_entries(path: Path | None, job_id: str) -> list[dict[str, Any]]:
    """The audit log's lines about ``job_id`` (from its last :data:`AUDIT_TAIL_BYTES`)."""
    if path is None or not path.is_file():
        return []
    needle = json.dumps(job_id)
    out = []
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - AUDIT_TAIL_BYTES))
            if size > AUDIT_TAIL_BYTES:
                fh.readline()  # a partial first line
            for raw in fh:
                line = raw.decode("utf-8", "replace")
                if needle not in line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("job_id") == job_id:
                    out.append(rec)
    except OSError:
        return []
    return out


def timeline(job: Job, audit_path: Path | None) -> list[dict[str, Any]]:
    """The job's states in order: from the audit log when the node keeps one, else from the job's timestamps."""
    out: list[dict[str, Any]] = []
    delivered: dict[str, dict[str, Any]] = {}  # destination -> one entry for all its instances (the last time)
    for rec in _audit_entries(audit_path, job.id):
        kind = str(rec.get("kind", ""))
        if kind == "egress.delivered":
            dest = str(rec.get("destination", "?"))
            d = delivered.setdefault(dest, {"event": f"delivered to {dest}", "n": 0})
            d["n"] += 1
            d["time"] = str(rec.get("time", ""))
            d["detail"] = f"{d['n']} instance(s) accepted by {rec.get('target', dest)}"
            continue
        if kind == "job.state":
            what = str(rec.get("state", ""))
        elif kind in ("job.retry", "job.resend"):
            what = kind.split(".")[1] + " by " + str(rec.get("actor", "?"))
        elif kind == "egress.failed":
            what = f"not delivered to {rec.get('destination', '?')}"
        else:
            continue
        detail = plain_error(str(rec.get("reason") or "")) or ""
        if rec.get("attempts"):
            detail = f"attempt {rec['attempts']}" + (f"; {detail}" if detail else "")
        out.append({"time": str(rec.get("time", "")), "event": what, "detail": str(detail)})
    out = sorted(
        out + [{k: d[k] for k in ("time", "event", "detail")} for d in delivered.values()], key=lambda e: e["time"]
    )  # ISO-8601 UTC, one format: sorts as text
    if out:
        for e in out:  # audit times are UTC ISO-8601; show them like the rest of the page
            try:
                e["time"] = local_time(dt.datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp())
            except ValueError:
                pass
        return out
    for ts, what in (
        (job.created, "created"),
        (job.started, "started (last attempt)"),
        (job.finished, job.state if job.state in ("done", "sent", "failed") else "finished"),
    ):
        if ts is not None:
            out.append({"time": local_time(ts), "event": what, "detail": ""})
    if job.state not in ("done", "failed") and job.updated:
        out.append({"time": local_time(job.updated), "event": f"now {job.state}", "detail": ""})
    return out


def _summary(result_dir: Path | None) -> dict[str, Any]:
    if result_dir is None:
        return {}
    try:
        data: dict[str, Any] = json.loads((result_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data


def preview_kinds(result_dir: Path | None) -> dict[str, str]:
    """{output kind: unit} of the arrays a preview can be drawn from (``maps.npz``, ``images.npz``)."""
    import numpy as np

    out: dict[str, str] = {}
    if result_dir is None:
        return out
    for name in ("maps.npz", "images.npz"):
        path = result_dir / name
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                for k in sorted(keys):
                    if k.endswith("_unit") and k[: -len("_unit")] in keys:
                        continue
                    unit = str(z[f"{k}_unit"]) if f"{k}_unit" in keys else ""
                    out[k] = unit
        except (OSError, ValueError):
            continue
    return out


def job_view(service: Any, job: Job) -> dict[str, Any]:
    """Everything the job page shows: the job, its timeline, input, outputs (with preview kinds), deliveries."""
    cfg = service.cfg
    outbox = service.egress.outbox
    counts = outbox.job_counts([job.id]).get(job.id)
    result_dir = Path(job.result_dir) if job.result_dir else None
    summary = _summary(result_dir)
    previews = preview_kinds(result_dir)
    items = outbox.items(job_id=job.id)
    per_output: dict[str, dict[str, int]] = {}
    deliveries: dict[str, dict[str, Any]] = {}
    for it in items:
        kind = Path(it.path).parent.name
        per_output.setdefault(kind, {})
        per_output[kind][it.state] = per_output[kind].get(it.state, 0) + 1
        d = deliveries.setdefault(
            it.destination, {"destination": it.destination, "states": {}, "answers": {}, "attempts": 0}
        )
        d["states"][it.state] = d["states"].get(it.state, 0) + 1
        d["attempts"] = max(d["attempts"], it.attempts)
        if it.last_error:
            d["answers"][it.last_error] = d["answers"].get(it.last_error, 0) + 1
    dest_rows = {d["name"]: d for d in service.egress.destination_status()}
    for name, d in deliveries.items():
        dest = cfg.destination(name)
        d["target"] = dest.target if dest else "(not in the site config)"
        d["kind"] = dest.kind if dest else "unknown"
        d["answers"] = [{"answer": a, "instances": n} for a, n in d["answers"].items()]
        row = dest_rows.get(name, {})
        d["last_success_at"] = row.get("last_success_at")
    for name in job.send_to:
        if name not in deliveries:
            deliveries[name] = {"destination": name, "states": {}, "answers": [], "attempts": 0, "not_queued": True}
    outputs = []
    for o in summary.get("outputs", []) or [{"kind": k, "unit": u} for k, u in previews.items()]:
        kind = str(o.get("kind", ""))
        outputs.append(
            {
                "kind": kind,
                "description": o.get("description") or kind,
                "unit": o.get("unit") or previews.get(kind, ""),
                "shape": o.get("shape"),
                "notes": o.get("notes") or [],
                "preview": kind in previews,
                "instances": per_output.get(kind, {}),
            }
        )
    attrs = dict(job.attributes)
    attrs.pop("json", None)
    return {
        "job": job_dict(job, _egress(counts), log=True),
        "timeline": timeline(job, cfg.node.audit_log),
        "input": {
            "kind": job.kind,
            "source": job.source,
            "unit": Path(job.unit_path).name,
            "unit_present": Path(job.unit_path).exists(),
            "attributes": attrs,
        },
        "result": {k: v for k, v in summary.items() if k != "outputs"},
        "outputs": outputs,
        "deliveries": list(deliveries.values()),
    }


def peers_view(service: Any) -> dict[str, Any]:
    """Sources (last study received, jobs waiting / failed) and destinations (check, last delivery, counts)."""
    cfg = service.cfg
    jobs = service.store.list()
    by_source: dict[str, dict[str, Any]] = {}
    for j in jobs:
        s = by_source.setdefault(j.source or "", {"last": None, "waiting": 0, "failed": 0, "total": 0})
        s["last"] = max(s["last"] or 0.0, j.created)
        s["total"] += 1
        s["waiting"] += j.state in ("queued", "running")
        s["failed"] += j.state == "failed"
    sources = []
    for src in cfg.sources:
        s = by_source.get(src.name, {"last": None, "waiting": 0, "failed": 0, "total": 0})
        sources.append(
            {
                "name": src.name,
                "ae_title": src.ae_title,
                "hosts": list(src.hosts),
                "protocols": list(src.protocols),
                "last_study_at": s["last"],
                "jobs": s["total"],
                "waiting": s["waiting"],
                "failed": s["failed"],
            }
        )
    rows = service.egress.outbox.destination_rows()
    destinations = []
    for d in service.egress.destination_status():
        r = rows.get(d["name"], {})
        destinations.append({**d, "echo_at": r.get("echo_at"), "last_error_at": r.get("last_error_at")})
    return {"sources": sources, "destinations": destinations}


class PreviewCache:
    """Rendered previews, newest kept (a job page reloads them while it refreshes)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str, float], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, float]) -> bytes | None:
        with self._lock:
            png = self._items.get(key)
            if png is not None:
                self._items.move_to_end(key)
            return png

    def put(self, key: tuple[str, str, float], png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def render_preview(service: Any, job: Job, kind: str, cache: PreviewCache) -> bytes | None:
    """The PNG preview of output ``kind`` of ``job`` (None: no such array)."""
    import numpy as np

    from node.previews import preview_png

    if not job.result_dir or not re.fullmatch(r"[A-Za-z0-9_]{1,64}", kind):
        return None
    result_dir = Path(job.result_dir)
    for name in ("maps.npz", "images.npz"):
        path = result_dir / name
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        key = (job.id, kind, mtime)
        png = cache.get(key)
        if png is not None:
            return png
        try:
            with np.load(path, allow_pickle=False) as z:
                if kind not in z.files:
                    continue
                data = z[kind]
                unit = str(z[f"{kind}_unit"]) if f"{kind}_unit" in z.files else ""
        except (OSError, ValueError):
            continue
        png = preview_png(data, kind, unit, f"{kind.upper()} ({job.id})", service.cfg.node.templates_dir)
        cache.put(key, png)
        return png
    return None
