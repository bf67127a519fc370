"""The operator console (issue 18) on a real node over HTTPS, in a real browser (headless Chromium + Selenium).

One node (module fixture) with the console on TLS (the test CA of the MRD TLS tests), Orthanc as the PACS and two
MRD studies: one reaches Orthanc (job ``sent``), one is routed to a pipeline parameter that fails for good. The
browser signs in, sees the sent job, opens it, waits for its previews to load, then retries the failed job as an
operator. ``recon-node status --url`` prints the same jobs as ``recon-node status --config``, over TLS verified
against the CA. Screenshots go to the test's tmp_path; ``RECON_NODE_DOCS_IMG=1`` also refreshes the README's
docs/img/console-jobs.png and console-job.png.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("argon2")
webdriver = pytest.importorskip("selenium.webdriver")

from orthanc_harness import start_orthanc  # noqa: E402

from node.http.auth import token_digest  # noqa: E402
from node.ingest.mrd_client import send_study  # noqa: E402
from pipelines.sim.acquisition import AcquisitionSettings, simulate_study  # noqa: E402
from tests.integration.node_harness import REPO, start_node  # noqa: E402
from tests.integration.test_hardening_mrd import pki  # noqa: E402, F401 - the module-scoped test CA fixture

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
USERS = {"otto": ("operator", "otto-operator-pw"), "vera": ("viewer", "vera-viewer-pw")}
TOKEN = "rn_console-test-token"
DOCS_IMG = REPO / "docs" / "img"


def _cheap_hash(password: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


@pytest.fixture(scope="module")
def console(tmp_path_factory, pki, short_fisp):  # noqa: F811
    tmp = tmp_path_factory.mktemp("console")
    orthanc = start_orthanc(tmp)
    audit_path = tmp / "audit.jsonl"
    config = {
        "node": {
            "audit_log": str(audit_path),
            "tls": {"cert": str(pki["cert"]), "key": str(pki["key"])},
            "http": {
                "port": 0,  # a free port, read back from the run file
                "tls": True,
                "users": [{"name": n, "role": r, "password_hash": _cheap_hash(pw)} for n, (r, pw) in USERS.items()],
                "tokens": [{"name": "cli", "role": "viewer", "sha256": token_digest(TOKEN)}],
            },
        },
        "destinations": [
            {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
        "routes": [
            # int("x") in the pipeline: a permanent failure, not retried by itself
            {"name": "broken", "match": {"input": "mrd", "sequence": "broken"}, "pipeline": "cartesian_frames",
             "params": {"frames": "x"}, "send_to": ["orthanc"]},
            {"name": "frames", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
             "params": {"frames": "0,1"}, "send_to": ["orthanc"]},
        ],
    }
    node = start_node(tmp, config)
    try:
        info = json.loads((node.spool / "run" / "node.json").read_text())
        node.url = f"https://127.0.0.1:{info['http_port']}"
        node.audit_path = audit_path
        node.ca = pki["ca"]
        node.orthanc = orthanc
        study = simulate_study("brain", short_fisp, AcquisitionSettings(coils=2, snr=50), matrix=32)
        send_study(study, "127.0.0.1", node.mrd_port, timeout=60)
        node.sent = node.wait_job_state("sent", timeout=90)
        broken = dataclasses.replace(study, sequence=dataclasses.replace(short_fisp, name="broken"))
        send_study(broken, "127.0.0.1", node.mrd_port, timeout=60)
        node.failed = node.wait_job_state("failed", timeout=90)
        assert node.failed.route == "broken" and "invalid literal" in node.failed.error
        yield node
        assert node.stop() == 0, node.log()[-4000:]  # the console's server thread stops with the node
        assert "Traceback" not in node.log(), node.log()[-4000:]
    finally:
        node.kill9()
        orthanc.stop()


def _get(node, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(node.ca))
    req = urllib.request.Request(node.url + path, headers=headers or {}, method=method, data=b"" if method == "POST"
                                 else None)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _basic(name: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{USERS[name][1]}".encode()).decode()}


def test_tls_and_authentication_on_the_real_server(console):
    status, body = _get(console, "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, body = _get(console, "/ready")  # unauthenticated, and nothing about patients in it
    assert status == 200 and json.loads(body)["database"].startswith("ok") and b"brain" not in body.lower()
    for path in ("/jobs", f"/jobs/{console.sent.id}", "/api/jobs", f"/api/jobs/{console.sent.id}", "/peers"):
        status, body = _get(console, path)
        assert status == 401 and b"cartesian_frames" not in body, path
    assert _get(console, "/api/jobs", {"Authorization": "Basic " + base64.b64encode(b"vera:wrong").decode()})[0] == 401
    status, body = _get(console, "/api/jobs", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and {j["id"] for j in json.loads(body)["jobs"]} == {console.sent.id, console.failed.id}
    assert _get(console, f"/api/jobs/{console.failed.id}/retry", _basic("vera"), "POST")[0] == 403
    # a client that does not trust the test CA is refused by TLS itself
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(console.url + "/health", context=ssl.create_default_context(), timeout=10)
    with pytest.raises(OSError):  # no plain HTTP on the TLS port (the connection is dropped)
        urllib.request.urlopen(console.url.replace("https", "http") + "/health", timeout=10)


def test_status_url_prints_the_local_table(console):
    env_token = {"RECON_NODE_TOKEN": TOKEN}
    local = console.cli("status", "--config", str(console.config_path))
    assert local.returncode == 0, local.stderr
    remote = _cli(console, env_token, "status", "--url", console.url, "--ca", str(console.ca))
    assert remote.returncode == 0, remote.stderr

    def jobs_table(text: str) -> list[list[str]]:  # the job lines without AGE (seconds apart)
        lines = [ln.split() for ln in text.splitlines() if ln.startswith(("ID ", "j-"))]
        return [ln[:6] + ln[7:] for ln in lines]

    assert jobs_table(remote.stdout) == jobs_table(local.stdout) and len(jobs_table(local.stdout)) == 3
    assert remote.stdout.splitlines()[0].startswith(f"node pid {console.proc.pid}: MRD port {console.mrd_port}")
    assert "console port" in remote.stdout
    as_json = json.loads(_cli(console, env_token, "status", "--url", console.url, "--ca", str(console.ca), "--json",
                              "--state", "sent").stdout)
    assert [j["id"] for j in as_json["jobs"]] == [console.sent.id]
    local_json = console.status_json()  # `status --config --json`: the same data as the API
    remote_json = json.loads(_cli(console, env_token, "status", "--url", console.url, "--ca", str(console.ca),
                                  "--json").stdout)
    assert [(j["id"], j["state"], j["egress"]) for j in remote_json["jobs"]] == \
        [(j["id"], j["state"], j["egress"]) for j in local_json["jobs"]]
    assert remote_json["counts"] == local_json["counts"] and remote_json["node"] == local_json["node"]
    assert [d["name"] for d in remote_json["destinations"]] == [d["name"] for d in local_json["destinations"]]
    with_log = _cli(console, env_token, "status", "--url", console.url, "--ca", str(console.ca), "--log",
                    "--state", "sent")
    assert f"--- log of {console.sent.id} ---" in with_log.stdout and "attempt 1 (" in with_log.stdout
    untrusted = _cli(console, env_token, "status", "--url", console.url)
    assert untrusted.returncode == 2 and "not trusted" in untrusted.stderr and "--ca" in untrusted.stderr
    wrong = _cli(console, {"RECON_NODE_USER": "vera", "RECON_NODE_PASSWORD": "nope"}, "status", "--url", console.url,
                 "--ca", str(console.ca))
    assert wrong.returncode == 2 and "not signed in" in wrong.stderr


def _cli(node, env: dict[str, str], *args: str):
    saved = {k: os.environ.get(k) for k in ("RECON_NODE_TOKEN", "RECON_NODE_USER", "RECON_NODE_PASSWORD")}
    try:
        for k in saved:
            os.environ.pop(k, None)
        os.environ.update(env)
        return node.cli(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"Chromium / chromedriver not installed ({CHROMIUM}, {CHROMEDRIVER}); "
                    "apt-get install chromium chromium-driver")
    saved = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700",
                "--disable-gpu", "--no-first-run", "--disable-extensions", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.accept_insecure_certs = True  # the test CA is not in the browser's store (urllib checks it above)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    # the page area itself 1100 x 700 (the window size includes the browser's own bars)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1100, "height": 700, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()
    if saved is None:
        os.environ.pop("SE_OFFLINE", None)
    else:
        os.environ["SE_OFFLINE"] = saved


def _shot(driver, path: Path, docs_name: str | None = None) -> None:
    """A screenshot in the test's folder; with RECON_NODE_DOCS_IMG=1 also (small) as docs/img/<docs_name>."""
    driver.save_screenshot(str(path))
    if docs_name is None or os.environ.get("RECON_NODE_DOCS_IMG") != "1":
        return  # a test run leaves the repository's files alone
    from PIL import Image

    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    img = Image.open(path).convert("RGB")
    img.thumbnail((1100, 700))
    out = DOCS_IMG / docs_name
    img.save(out, optimize=True)
    if out.stat().st_size > 150_000:  # fewer colours keep a screenshot of tables small and sharp
        img.quantize(colors=128).save(out, optimize=True)


def test_browser_sign_in_jobs_job_previews_and_retry(console, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    sent, failed = console.sent.id, console.failed.id
    browser.get(console.url + "/jobs")
    assert "Sign in" in browser.title and sent not in browser.page_source  # nothing before signing in
    _shot(browser, tmp_path / "login.png")
    browser.find_element(By.NAME, "user").send_keys("otto")
    browser.find_element(By.NAME, "password").send_keys(USERS["otto"][1])
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.ID, sent)))
    row = browser.find_element(By.ID, sent)
    assert "sent" in row.find_element(By.CSS_SELECTOR, ".badge").text
    assert "orthanc" in row.text and re.search(r"(\d+)/\1 sent", row.text), row.text
    bad = browser.find_element(By.ID, failed)
    assert "failed" in bad.text and "Invalid literal for int()" in bad.text  # the error, without the Python name
    _shot(browser, tmp_path / "jobs.png", "console-jobs.png")

    # sources and destinations: the C-ECHO check the egress made at start, deliveries
    browser.get(console.url + "/peers")
    dest = browser.find_element(By.XPATH, "//h2[text()='Destinations']/following-sibling::table").text
    assert "orthanc" in dest and "ok" in dest and f"ORTHANC@127.0.0.1:{console.orthanc.dicom_port}" in dest
    _shot(browser, tmp_path / "peers.png")

    # filter: only failed jobs
    browser.get(console.url + "/jobs?state=failed")
    assert browser.find_elements(By.ID, failed) and not browser.find_elements(By.ID, sent)

    # one job: timeline, deliveries, previews that really load
    browser.get(console.url + "/jobs")
    browser.find_element(By.LINK_TEXT, sent).click()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "img.preview")))
    imgs = browser.find_elements(By.CSS_SELECTOR, "img.preview")
    assert imgs
    wait.until(lambda d: d.execute_script(
        "return Array.from(document.querySelectorAll('img.preview')).every(i => i.complete && i.naturalWidth > 0)"))
    text = browser.find_element(By.TAG_NAME, "main").text
    assert "MRF frames" in text and "orthanc" in text and "Timeline" in text and "sent" in text
    assert f"ORTHANC@127.0.0.1:{console.orthanc.dicom_port}" in text
    assert "delivered to orthanc" in text and "2 instance(s) accepted" in text  # the timeline, from the audit log
    _shot(browser, tmp_path / "job.png", "console-job.png")

    # retry the failed job as an operator: confirm, then it is queued again (and, still broken, fails again)
    browser.get(f"{console.url}/jobs/{failed}")
    browser.find_element(By.ID, "retry").click()
    wait.until(EC.alert_is_present()).accept()
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".flash")))
    flash = browser.find_element(By.CSS_SELECTOR, ".flash").text
    assert flash.startswith(f"job {failed} queued again (was failed): route broken"), flash
    _shot(browser, tmp_path / "retried.png")
    retries = [json.loads(ln) for ln in console.audit_path.read_text().splitlines()]
    retries = [r for r in retries if r["kind"] == "job.retry"]
    assert retries and retries[-1]["job_id"] == failed and retries[-1]["actor"] == "otto"
    assert retries[-1]["via"] == "console (session)"
    deadline = time.monotonic() + 60
    while True:  # the node ran it again (attempts counted from 1 again) and, still broken, it failed again
        again = next(j for j in console.jobs() if j.id == failed)
        if again.state == "failed" and again.log.count("attempt 1 (") == 2:
            break
        assert time.monotonic() < deadline, (again.state, again.log)
        time.sleep(0.2)

    # a viewer sees the job but no buttons
    browser.delete_all_cookies()
    browser.get(console.url + "/login")
    browser.find_element(By.NAME, "user").send_keys("vera")
    browser.find_element(By.NAME, "password").send_keys(USERS["vera"][1])
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.ID, sent)))
    browser.get(f"{console.url}/jobs/{failed}")
    assert not browser.find_elements(By.ID, "retry") and "vera" in browser.find_element(By.TAG_NAME, "header").text
