"""Operator console (issue 18), in process: nothing without credentials, passwords (argon2) and tokens (SHA-256),
roles, login sessions with CSRF tokens, throttling, audit lines, the JSON API, previews, config checks."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("argon2")
pytest.importorskip("httpx")  # starlette's TestClient

with warnings.catch_warnings():  # starlette >= 1 prefers the httpx2 fork for its TestClient; httpx still works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from node import audit  # noqa: E402
from node.config import ConfigError, parse_config, summary  # noqa: E402
from node.http.auth import token_digest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {"vera": "viewer-secret-1", "otto": "operator-secret-2"}
TOKEN = "rn_test-token-for-the-scraper"


def basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    """Cheap argon2 parameters, so the many verifications here are quick (the node takes any argon2 hash;
    `recon-node hash-password` uses argon2-cffi's defaults)."""
    from argon2 import PasswordHasher

    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return {name: cheap.hash(pw) for name, pw in PASSWORDS.items()}


def site(tmp_path: Path, hashes: dict[str, str], **http: object) -> dict:
    return {
        "node": {
            "spool_dir": str(tmp_path / "spool"),
            "disk_reserve_mb": 1,
            "audit_log": str(tmp_path / "audit.jsonl"),
            "http": {
                "port": 0,
                "users": [
                    {"name": "vera", "role": "viewer", "password_hash": hashes["vera"]},
                    {"name": "otto", "role": "operator", "password_hash": hashes["otto"]},
                ],
                "tokens": [{"name": "prometheus", "role": "viewer", "sha256": token_digest(TOKEN)}],
                **http,
            },
        },
        "sources": [{"name": "scanner", "hosts": ["127.0.0.1"]}],
        "destinations": [{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}],
        "routes": [{"name": "frames", "match": {"input": "mrd"}, "pipeline": "cartesian_frames", "send_to": ["share"]}],
    }


@pytest.fixture
def console(tmp_path, hashes):
    """A NodeService (not started: no listeners) with a done job that has a T1 map and a failed job, and a
    TestClient on its console."""
    from node.http.app import create_app
    from node.service import NodeService

    cfg = parse_config(site(tmp_path, hashes), check_pipelines=False)
    audit.configure(cfg.node.audit_log)
    svc = NodeService(cfg)
    done, _ = svc.store.create(tmp_path / "spool/units/u1.h5", "mrd", "scanner", route="frames",
                               pipeline="cartesian_frames", send_to=["share"],
                               attributes={"protocolName": "MRF brain"})
    svc.store.claim()
    result = cfg.node.results_dir / done.id
    result.mkdir(parents=True)
    t1 = np.linspace(0, 3000, 32 * 32).reshape(32, 32)
    np.savez(result / "maps.npz", t1=t1, t1_unit=np.array("ms"))
    (result / "summary.json").write_text(json.dumps(
        {"pipeline": "cartesian_frames", "device": "cpu", "seconds": 1.5,
         "outputs": [{"kind": "t1", "shape": [32, 32], "unit": "ms", "description": "T1 map", "notes": []}]}))
    svc.store.finish(done.id, result)
    failed, _ = svc.store.create(tmp_path / "spool/units/u2.h5", "mrd", "scanner", route="frames",
                                 pipeline="cartesian_frames")
    svc.store.claim()
    svc.store.fail(failed.id, "ValueError: invalid literal for int() with base 10: 'x'", permanent=True)
    client = TestClient(create_app(svc), base_url="http://console.test")
    client.svc, client.done, client.failed = svc, done.id, failed.id
    client.audit = Path(cfg.node.audit_log)
    yield client
    client.close()
    svc.egress.outbox.close()
    svc.store.close()
    audit.configure(None)


def audit_lines(client) -> list[dict]:
    return [json.loads(line) for line in client.audit.read_text().splitlines()]


def test_nothing_but_health_and_ready_without_credentials(console):
    r = console.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    d, f = console.done, console.failed
    for path in ("/", "/jobs", f"/jobs/{d}", f"/jobs/{d}/preview/t1.png", "/peers", "/metrics", "/api/jobs",
                 f"/api/jobs/{d}", "/api/peers", "/jobs?state=failed", "/jobs/no-such-job"):
        r = console.get(path, follow_redirects=False)
        assert r.status_code == 401, path
        # the login form (pages) or an error (API): nothing about the jobs beyond the path that was asked for
        assert not any(w in r.text for w in ("MRF brain", "scanner", "cartesian_frames", "T1 map", f)), path
    assert console.get("/jobs").headers["content-type"].startswith("text/html")
    assert 'name="password"' in console.get("/jobs").text  # pages answer with the login form
    r = console.get("/api/jobs")
    assert r.headers["www-authenticate"].startswith("Basic") and r.json() == {"error": "sign in to see this page"}
    for path in (f"/jobs/{f}/retry", f"/api/jobs/{f}/retry", f"/api/jobs/{d}/resend", "/logout"):
        assert console.post(path, follow_redirects=False).status_code == 401, path
    assert console.get("/static/app.css").status_code == 200  # the stylesheet is the same for every node


def test_wrong_password_and_unknown_user_are_refused_alike_and_audited(console):
    wrong = console.get("/api/jobs", headers=basic("vera", "not-her-password"))
    nobody = console.get("/api/jobs", headers=basic("mallory", PASSWORDS["vera"]))
    assert wrong.status_code == nobody.status_code == 401
    assert wrong.json() == nobody.json() == {"error": "wrong user name or password"}
    r = console.post("/login", data={"user": "vera", "password": "nope", "next": "/jobs"})
    assert r.status_code == 401 and "Wrong user name or password." in r.text
    refused = [a for a in audit_lines(console) if a["kind"] == "http.login"]
    assert [a["outcome"] for a in refused] == ["refused"] * 3
    assert {a["user"] for a in refused} == {"vera", "mallory"} and all(a["actor_ip"] for a in refused)
    assert "not-her-password" not in console.audit.read_text() and "nope" not in console.audit.read_text()


def test_viewer_reads_but_cannot_act_operator_can(console):
    f = console.failed
    vera, otto = basic("vera", PASSWORDS["vera"]), basic("otto", PASSWORDS["otto"])
    jobs = console.get("/api/jobs", headers=vera).json()
    assert set(jobs) >= {"counts", "node", "destinations", "jobs"} and len(jobs["jobs"]) == 2
    failed = next(j for j in jobs["jobs"] if j["id"] == f)
    assert failed["error_plain"] == "Invalid literal for int() with base 10: 'x' (not retried: the same input " \
        f"fails the same way; fix the input, the route or the site config, then run `recon-node retry {f}`)"
    assert "log" not in failed and "ran_on" in failed
    r = console.post(f"/api/jobs/{f}/retry", headers=vera)
    assert r.status_code == 403 and "viewer" in r.json()["error"]
    assert console.post(f"/jobs/{f}/retry", headers=vera).status_code == 403
    assert "Retry" not in console.get(f"/jobs/{f}", headers=vera).text  # no buttons for a viewer
    assert "Retry</button>" in console.get(f"/jobs/{f}", headers=otto).text
    # the operator may: the action runs (its input is not in the spool, so it is refused with the reason)
    r = console.post(f"/api/jobs/{f}/retry", headers=otto)
    assert r.status_code == 409 and "no longer in the spool" in r.json()["message"]
    forbidden = [a for a in audit_lines(console) if a["kind"] == "http.forbidden"]
    assert forbidden and forbidden[0]["user"] == "vera" and forbidden[0]["outcome"] == "refused"


def test_resend_by_an_operator_goes_through_the_cli_code_path(console):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    d = console.done
    job = console.svc.store.get(d)
    series = Path(job.result_dir) / "dicom" / "t1"
    series.mkdir(parents=True)
    for i in range(2):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(series / f"{i}.dcm", enforce_file_format=True)
    r = console.post(f"/api/jobs/{d}/resend", headers=basic("otto", PASSWORDS["otto"]))
    assert r.status_code == 200 and r.json()["message"].startswith(f"job {d}: 2 instance(s) queued again for share")
    items = console.svc.egress.outbox.items(job_id=d)
    assert len(items) == 2 and {it.destination for it in items} == {"share"}
    resend = [a for a in audit_lines(console) if a["kind"] == "job.resend"]
    assert resend[-1]["actor"] == "otto" and resend[-1]["via"] == "console (basic)"
    view = console.get(f"/api/jobs/{d}", headers=basic("vera", PASSWORDS["vera"])).json()
    assert view["deliveries"][0]["destination"] == "share" and view["deliveries"][0]["states"] == {"pending": 2}
    assert view["outputs"][0]["instances"] == {"pending": 2}


def test_bearer_token(console):
    r = console.get("/api/jobs?state=failed", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and [j["id"] for j in r.json()["jobs"]] == [console.failed]
    r = console.get("/api/jobs", headers={"Authorization": "Bearer rn_guessed"})
    assert r.status_code == 401 and r.json() == {"error": "the token is not valid"}
    assert console.post(f"/api/jobs/{console.failed}/retry",
                        headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403  # a viewer token
    assert any(a["kind"] == "http.login" and a.get("method") == "bearer" for a in audit_lines(console))


def test_login_session_csrf_and_same_origin(console):
    f = console.failed
    r = console.post("/login", data={"user": "otto", "password": PASSWORDS["otto"], "next": f"/jobs/{f}"},
                     follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{f}"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = console.get(f"/jobs/{f}")
    assert page.status_code == 200 and "otto" in page.text
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    assert len(csrf) > 20
    r = console.post(f"/jobs/{f}/retry", data={}, follow_redirects=False)  # no token: refused
    assert r.status_code == 403 and "expired" in r.text
    r = console.post(f"/jobs/{f}/retry", data={"csrf": csrf}, headers={"Origin": "https://evil.example"},
                     follow_redirects=False)
    assert r.status_code == 403 and "cross-site" in r.text
    r = console.post(f"/jobs/{f}/retry", data={"csrf": csrf}, headers={"Origin": "http://console.test"},
                     follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/jobs/{f}?flash=")
    page = console.get(r.headers["location"])
    assert "no longer in the spool" in page.text  # the action's answer, shown once
    # an open redirect after login is not possible
    r = console.post("/login", data={"user": "otto", "password": PASSWORDS["otto"], "next": "//evil.example/x"},
                     follow_redirects=False)
    assert r.headers["location"] == "/jobs"
    # sign out ends the session
    sid = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    csrf = console.get("/jobs").text.split('name="csrf" value="')[1].split('"')[0]
    r = console.post("/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    console.cookies.clear()
    console.cookies.set("recon_node_session", sid)
    assert console.get("/jobs").status_code == 401


def test_failed_logins_are_throttled_per_address(console):
    for _ in range(10):
        console.get("/api/jobs", headers=basic("vera", "wrong"))
    r = console.get("/api/jobs", headers=basic("vera", PASSWORDS["vera"]))
    assert r.status_code == 429 and "too many failed logins" in r.json()["error"]
    console.app.state.console.auth.clock = lambda: 1e12  # the window has passed
    assert console.get("/api/jobs", headers=basic("vera", PASSWORDS["vera"])).status_code == 200


def test_pages_render_and_preview_is_a_png(console):
    from PIL import Image

    vera = basic("vera", PASSWORDS["vera"])
    d = console.done
    jobs = console.get("/jobs", headers=vera)
    assert jobs.status_code == 200 and d in jobs.text and "Invalid literal" in jobs.text
    assert jobs.headers["content-security-policy"].startswith("default-src 'self'")
    assert jobs.headers["x-frame-options"] == "DENY" and jobs.headers["cache-control"] == "no-store"
    assert console.get("/jobs?state=failed", headers=vera).text.count('class="state-failed"') == 1
    assert d not in console.get("/jobs?state=failed", headers=vera).text
    assert console.get("/jobs?since=2999-01-01", headers=vera).text.count("<tr id=") == 0
    assert console.get("/jobs?state=bogus", headers=vera).status_code == 400
    page = console.get(f"/jobs/{d}", headers=vera)
    assert page.status_code == 200 and "T1 map" in page.text and f"/jobs/{d}/preview/t1.png" in page.text
    assert "MRF brain" in page.text and "unit ms" in page.text
    png = console.get(f"/jobs/{d}/preview/t1.png", headers=vera)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (420, 360)
    assert console.get(f"/jobs/{d}/preview/t2.png", headers=vera).status_code == 404
    assert console.get(f"/jobs/{d}/preview/..%2Fx.png", headers=vera).status_code == 404
    peers = console.get("/peers", headers=vera)
    assert peers.status_code == 200 and "scanner" in peers.text and "share" in peers.text
    view = console.get(f"/api/jobs/{d}", headers=vera).json()
    assert [e["event"] for e in view["timeline"]] == ["queued", "running", "done"]  # from the audit log
    assert view["job"]["log"] == "" and view["input"]["attributes"] == {"protocolName": "MRF brain"}


def test_metrics_need_credentials_unless_public(tmp_path, hashes):
    pytest.importorskip("prometheus_client")
    from node.http.app import create_app
    from node.service import NodeService

    for public in (False, True):
        cfg = parse_config(site(tmp_path / str(public), hashes, metrics_public=public), check_pipelines=False)
        svc = NodeService(cfg)
        try:
            with TestClient(create_app(svc)) as c:
                r = c.get("/metrics")
                assert r.status_code == (200 if public else 401)
                r = c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.status_code == 200 and b"recon_node" in r.content
                r = c.get("/ready")
                assert r.status_code in (200, 503) and "patient" not in r.text.lower()
        finally:
            svc.egress.outbox.close()
            svc.store.close()


# ---- config ----------------------------------------------------------------------------------------------------
def problems(data: dict) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as e:
        parse_config(data, check_pipelines=False)
    return e.value.problems


def test_config_checks(tmp_path, hashes, monkeypatch):
    base = site(tmp_path, hashes)
    cfg = parse_config(base, check_pipelines=False)
    assert cfg.node.http is not None and cfg.node.http.users[1].role == "operator"
    assert "argon2" not in repr(cfg.node.http.users[0])  # the hash is a secret: not in reprs / logs
    assert "console: http://0.0.0.0:0/ (2 user(s), 1 token(s))" in summary(cfg)
    node = base["node"]
    p = problems({**base, "node": {**node, "http": {"port": 8443}}})
    assert p[0][0] == "node.http.users" and "nobody can log in" in p[0][1] and "hash-password" in p[0][2]
    p = problems({**base, "node": {**node, "http": {**node["http"], "tls": True}}})
    assert p[0][0] == "node.http.tls" and "node.tls" in p[0][2]
    p = problems({**base, "node": {**node, "http": {**node["http"], "usres": []}}})
    assert p[0][0] == "node.http.usres" and p[0][2] == "did you mean 'users'?"
    bad_user = {"name": "eve", "password_hash": "plaintext", "role": "viewer"}
    p = problems({**base, "node": {**node, "http": {**node["http"], "users": [bad_user]}}})
    assert p[0][0] == "node.http.users[0].password_hash" and "hash-password" in p[0][1]
    p = problems({**base, "node": {**node, "http": {**node["http"], "users": [{**bad_user, "role": "admin"}]}}})
    assert any(k == "node.http.users[0].role" for k, _, _ in p)
    p = problems({**base, "node": {**node, "http": {**node["http"], "tokens": [{"name": "t", "sha256": "abc"}]}}})
    assert p[0][0] == "node.http.tokens[0].sha256" and "new-token" in p[0][1]
    p = problems({**base, "node": {**node, "mrd_port": 9100, "http": {**node["http"], "port": 9100}}})
    assert p[0][0] == "node.http.port" and "node.mrd_port" in p[0][1]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    p = problems(base)
    assert p[0][0] == "node.http" and "uvicorn" in p[0][1] and p[0][2].startswith('pip install "recon-node[web]"')


def test_hash_password_cli_reads_stdin(tmp_path):
    from argon2 import PasswordHasher

    p = subprocess.run([sys.executable, "-m", "node.cli", "hash-password"], input="correct horse battery\n",
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    h = p.stdout.strip()
    assert h.startswith("$argon2id$") and PasswordHasher().verify(h, "correct horse battery")
    p = subprocess.run([sys.executable, "-m", "node.cli", "hash-password"], input="short\n",
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 2 and "at least 8" in p.stderr


def test_plain_error_words():
    from node.http.data import plain_error

    assert plain_error(None) is None
    assert plain_error("MemoryError") == "Out of memory"
    assert plain_error("FileNotFoundError: input /x does not exist") == "A file is missing: input /x does not exist"
    assert plain_error("torch.OutOfMemoryError: CUDA out of memory") == "Out of memory: CUDA out of memory"
    assert plain_error("no route matches: trajectory=radial") == "no route matches: trajectory=radial"


def test_new_token_cli_prints_a_token_and_its_hash(capsys):
    from node.cli import main

    assert main(["new-token", "--name", "grafana", "--role", "viewer"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("rn_") and len(token) > 40
    assert f"{{name: grafana, role: viewer, sha256: {token_digest(token)}}}" in out.err


def test_console_server_thread_starts_on_a_free_port_and_stops(tmp_path, hashes):
    import socket
    import urllib.error
    import urllib.request

    from node.http.app import ConsoleServer
    from node.service import NodeService

    cfg = parse_config(site(tmp_path, hashes), check_pipelines=False)
    cfg.node.bind = "127.0.0.1"
    svc = NodeService(cfg)
    try:
        server = ConsoleServer(svc).start()
        assert server.port and server.thread.is_alive()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/jobs", timeout=10)
        assert e.value.code == 401
        # a second console on the same port: refused at start with the key to change
        cfg.node.http.port = server.port
        with pytest.raises(OSError, match="node.http.port"):
            ConsoleServer(svc).start()
        server.stop()
        assert not server.thread.is_alive()
        with socket.socket() as s:  # the port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", server.port))
    finally:
        svc.egress.outbox.close()
        svc.store.close()


def test_a_huge_form_is_refused_without_reading_it_all(console):
    r = console.post("/login", content=b"user=" + b"a" * 100_000,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
