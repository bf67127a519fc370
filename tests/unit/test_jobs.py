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
