"""Job store: atomic claims, recovery after a kill, one job per unit, bounded attempts."""

from __future__ import annotations

import threading

from node.jobs import JobStore


def test_create_is_idempotent_per_unit(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    a, created_a = s.create("/spool/units/u1.h5", "mrd", "scanner", route="r", pipeline="p", params={"x": 1},
                            send_to=["pacs"], attributes={"protocolName": "MRF"})
    b, created_b = s.create("/spool/units/u1.h5", "mrd", "scanner", route="r", pipeline="p")
    assert created_a and not created_b and a.id == b.id
    assert a.id.startswith("j-") and a.state == "queued" and a.params == {"x": 1} and a.send_to == ["pacs"]
    c, _ = s.create("/spool/units/u2.h5", "mrd", "scanner", state="unrouted", error="no route")
    assert c.id != a.id and s.counts()["unrouted"] == 1 and len(s.list()) == 2


def test_claim_is_atomic_across_threads(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    for i in range(40):
        s.create(f"/u/{i}", "mrd")
    claimed: list[str] = []
    lock = threading.Lock()

    def grab() -> None:
        other = JobStore(tmp_path / "jobs.sqlite")  # a second connection, as another process would have
        while (job := other.claim()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab) for _ in range(4)] + [threading.Thread(target=lambda: [
        claimed.append(j.id) for j in iter(s.claim, None)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 40 and len(set(claimed)) == 40
    assert all(j.state == "running" and j.attempts == 1 for j in s.list())


def test_fail_requeues_until_max_attempts(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite", max_attempts=2)
    job, _ = s.create("/u/1", "mrd")
    assert s.claim().id == job.id
    assert s.fail(job.id, "ValueError: bad data") == "queued"
    assert s.claim().attempts == 2
    assert s.fail(job.id, "ValueError: bad data") == "failed"
    j = s.get(job.id)
    assert j.state == "failed" and j.error.startswith("ValueError: bad data") and j.finished is not None
    assert "node.max_attempts is 2" in j.error  # the error names the limit that stopped it
    assert s.claim() is None


def test_recover_and_finish_and_log(tmp_path):
    path = tmp_path / "jobs.sqlite"
    s = JobStore(path, max_attempts=3)
    j1, _ = s.create("/u/1", "mrd")
    j2, _ = s.create("/u/2", "mrd")
    s.claim(), s.claim()
    s.append_log(j1.id, "line one")
    s.append_log(j1.id, "line two")
    s.finish(j2.id, "/spool/results/x")
    s.close()
    s = JobStore(path, max_attempts=3, max_node_deaths=3)  # "restart"
    assert s.recover() == [j1.id]
    j = s.get(j1.id)
    assert j.state == "queued" and "line one" in j.log and "line two" in j.log
    assert s.get(j2.id).state == "done" and s.get(j2.id).result_dir == "/spool/results/x"
    # a job that was running through max_node_deaths kills becomes failed, with a reason naming that limit
    s.claim()
    s.recover()
    s.claim()
    assert s.recover() == []
    j = s.get(j1.id)
    assert j.state == "failed" and "stopped during this job 3 times" in j.error
    assert "node.max_node_deaths is 3" in j.error and j.node_deaths == 3 and j.attempts == 3


def test_claim_flag_creates_running(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    j, _ = s.create("/u/sync", "mrd", claim=True)
    assert j.state == "running" and j.attempts == 1 and s.claim() is None


STUDY = "1.2.826.0.1.3680043.8.498.77"


def _mrf_job(s, path, study=STUDY, arrive_s=60.0, pending_s=300.0, note=None):
    import time

    now = time.time()
    wait = {"study": study, "pending_until": now + pending_s, "arrive_until": now + arrive_s}
    return s.create(path, "mrd", "scanner", route="raw", pipeline="mrf",
                    attributes={"studyInstanceUID": study, "b1_wait": wait}, error=note)[0]


def _b1_job(s, path, study=STUDY):
    return s.create(path, "dicom", "scanner", route="b1", pipeline="b1_map",
                    attributes={"StudyInstanceUID": study})[0]


def test_a_raw_job_waits_for_its_study_b1_map_then_runs(tmp_path):
    """The B1 series arrives after the raw MRF data (a scanner that sends its DICOM at the end of the exam): the
    raw job stays queued until the study's b1_map job has come and finished, and other jobs pass it meanwhile."""
    s = JobStore(tmp_path / "jobs.sqlite")
    mrf = _mrf_job(s, "/u/mrf", note="waiting for the study's B1 series until 10:00:00 UTC at the latest")
    assert s.claim() is None  # nothing of the study has come: it waits
    other = s.create("/u/other", "dicom", "scanner", route="x", pipeline="mrf_maps_from_images",
                     attributes={"StudyInstanceUID": STUDY})[0]
    assert s.claim().id == other.id  # jobs without a wait are not held behind it
    _b1_job(s, "/u/b1-other-study", study=STUDY + ".9")
    assert s.claim().pipeline == "b1_map" and s.claim() is None  # another study's B1 map does not release it
    b1 = _b1_job(s, "/u/b1")
    assert s.study_b1_job(STUDY).id == b1.id
    assert s.claim().id == b1.id  # the B1 job passes the older raw job
    assert s.claim() is None  # ... which waits while the B1 job runs
    s.finish(b1.id, tmp_path)
    assert s.study_b1_job(STUDY) is None and s.study_b1_job(STUDY, ("done",)).id == b1.id
    got = s.claim()
    assert got.id == mrf.id and got.error is None  # the waiting note is cleared when it runs


def test_the_b1_wait_is_bounded(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    # no B1 series comes: runs once its arrival wait is over
    late = _mrf_job(s, "/u/late", arrive_s=-1.0)
    assert s.claim().id == late.id
    # a B1 job that stays queued past the pending limit does not hold it for ever
    b1 = _b1_job(s, "/u/b1")
    stuck = _mrf_job(s, "/u/stuck", arrive_s=-1.0, pending_s=-1.0)
    assert s.claim().id == b1.id and s.claim().id == stuck.id
    # a failed B1 job ends the wait for arrival (the job runs on the field)
    s2 = JobStore(tmp_path / "jobs2.sqlite", max_attempts=1)
    b1 = _b1_job(s2, "/u/b1")
    mrf = _mrf_job(s2, "/u/mrf", arrive_s=3600.0)
    assert s2.claim().id == b1.id and s2.claim() is None
    assert s2.fail(b1.id, "ValueError: not a B1 map") == "failed"
    assert s2.claim().id == mrf.id
    # after a restart the wait goes on: it is in the job's attributes, with absolute times
    s3 = JobStore(tmp_path / "jobs3.sqlite")
    _mrf_job(s3, "/u/mrf")
    assert JobStore(tmp_path / "jobs3.sqlite").claim() is None


def test_which_new_jobs_wait_for_a_b1_map(tmp_path):
    from node.config import Route
    from node.study_b1 import wait_attributes

    s = JobStore(tmp_path / "jobs.sqlite")
    attrs = {"studyInstanceUID": STUDY}
    waiting = Route(name="raw", pipeline="mrf", wait_for_b1_seconds=600)
    plain = Route(name="raw", pipeline="mrf")
    off = Route(name="raw", pipeline="mrf", params={"b1_measured": "off"})
    add, note = wait_attributes(s, waiting, "mrd", attrs, inline=False)
    assert add["b1_wait"]["study"] == STUDY and note.startswith("waiting for the study's B1 series until ")
    assert add["b1_wait"]["arrive_until"] - add["b1_wait"]["pending_until"] == 0  # 600 s > the pending limit
    add, note = wait_attributes(s, plain, "mrd", attrs, inline=False)
    assert add["b1_wait"]["arrive_until"] < add["b1_wait"]["pending_until"] and note is None  # waits for none
    assert wait_attributes(s, off, "mrd", attrs, inline=False) == ({}, None)
    assert wait_attributes(s, waiting, "mrd", attrs, inline=True) == ({}, None)  # the scanner waits on the line
    assert wait_attributes(s, waiting, "mrd", {}, inline=False) == ({}, None)  # no study to match
    assert wait_attributes(s, Route(name="i", pipeline="mrf_maps_from_images"), "dicom",
                           {"StudyInstanceUID": STUDY}, inline=False) == ({}, None)
    b1 = _b1_job(s, "/u/b1")
    _, note = wait_attributes(s, plain, "mrd", attrs, inline=False)
    assert note.startswith(f"waiting for the study's B1 map (job {b1.id}, queued) until ")
    s.finish(s.claim().id, tmp_path)
    assert wait_attributes(s, waiting, "mrd", attrs, inline=False)[1] is None  # it has come and finished
