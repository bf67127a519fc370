"""A study's measured B1 map for its raw MRF jobs: which ``b1_map`` result a job uses, and how long it waits for one.

A site's B1+ map series (DICOM, routed to ``b1_map``) and its raw MRF stream (MRD) arrive separately; they meet by
StudyInstanceUID. A raw job whose pipeline takes a measured B1 map (a ``b1_measured`` parameter that is not
``off``) gets a ``b1_wait`` attribute when it is created (:func:`node.jobs.b1_wait`): the claim leaves it queued
while a ``b1_map`` job of its study is queued or running (at most :data:`node.jobs.B1_PENDING_WAIT_S`), and, with
the route's ``wait_for_b1_seconds``, while none has come yet. Jobs the MRD server runs in-line (``reply_over_mrd``)
never wait: the scanner is waiting on the connection.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.config import Route
from node.jobs import Job, JobStore, b1_wait


def _takes_b1(pipeline: str, params: dict[str, Any]) -> bool:
    from pipelines.definitions import get_pipeline

    try:
        spec = get_pipeline(pipeline)
        return "b1_measured" in spec.params and spec.resolve_params(params).get("b1_measured") != "off"
    except ValueError:  # an unknown pipeline or a bad parameter: the run fails on it with its own message
        return False


def wait_attributes(
    store: JobStore, route: Route, kind: str, attributes: dict[str, Any], inline: bool
) -> tuple[dict[str, Any], str | None]:
    """Attributes to add to a new job of ``route`` (``b1_wait``, or none) and the note ``recon-node status`` shows
    while it waits (None when it need not wait now)."""
    uid = attributes.get("studyInstanceUID")
    if kind != "mrd" or inline or not uid or not _takes_b1(route.pipeline, route.params):
        return {}, None
    now = time.time()
    wait = b1_wait(str(uid), route.wait_for_b1_seconds, now)
    pending = store.study_b1_job(str(uid))
    if pending is not None:
        until = wait["pending_until"]
        note = f"waiting for the study's B1 map (job {pending.id}, {pending.state})"
    elif route.wait_for_b1_seconds > 0 and store.study_b1_job(str(uid), ("done", "sent", "failed")) is None:
        until = wait["arrive_until"]
        note = "waiting for the study's B1 series"
    else:
        return {"b1_wait": wait}, None
    return {"b1_wait": wait}, f"{note} until {datetime.fromtimestamp(until, UTC):%H:%M:%S} UTC at the latest"


def study_b1_reference(store: JobStore, job: Job, jlog: logging.Logger) -> Path | None:
    """maps.npz of the latest finished ``b1_map`` job of a raw job's study (its measured B1 series), or None; only
    for pipelines that take one (a ``b1_measured`` parameter)."""
    uid = job.attributes.get("studyInstanceUID") if job.kind == "mrd" else None
    if not uid or not _takes_b1(job.pipeline or "", job.params):
        return None
    waited = job.attributes.get("b1_wait")
    held = (job.started or job.created) - job.created
    pending = store.study_b1_job(str(uid))
    if pending is not None:
        jlog.warning(
            "the study's B1 series (job %s) is still %s; this job does not wait for it (%s)",
            pending.id,
            pending.state,
            "waited as long as allowed" if isinstance(waited, dict) else "the route replies over MRD",
        )
    ref = store.study_result("b1_map", str(uid))
    if isinstance(waited, dict) and job.attempts == 1:
        if ref is not None and (ref.finished or 0.0) > job.created:
            jlog.info("waited %.0f s for the study's B1 map (job %s)", held, ref.id)
        elif ref is None and float(waited.get("arrive_until", 0.0)) > job.created:
            jlog.info("waited %.0f s for the study's B1 series; none came, so B1 comes from the fingerprints", held)
    if ref is None or ref.result_dir is None:
        return None
    path = Path(ref.result_dir) / "maps.npz"
    if not path.is_file():
        jlog.warning("the study's B1 map (job %s) has no results any more (%s): not used", ref.id, path)
        return None
    jlog.info("the study's measured B1 map: job %s (route %s)", ref.id, ref.route)
    return path
