"""A real PACS for tests: Orthanc (``/usr/sbin/Orthanc``) on loopback with its own config and storage in tmp.

    orthanc = start_orthanc(tmp_path)            # skips the test when Orthanc is not installed
    orthanc.instances(); orthanc.stop(); orthanc.start()   # restart keeps the stored data
    orthanc = start_orthanc(tmp_path, dicomweb=True)   # + the DICOMweb plugin: orthanc.dicomweb_url
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import base64
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ORTHANC = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")
# Debian package orthanc-dicomweb
DICOMWEB_PLUGIN = os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_ROOT = "/dicom-web/"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_available() -> bool:
    return Path(ORTHANC).is_file() or shutil.which(ORTHANC) is not None


@dataclass
class OrthancProcess:
    config_path: Path
    dicom_port: int
    http_port: int
    aet: str
    log_path: Path
    startup_timeout_s: float = 60.0
    user: tuple[str, str] | None = None  # (name, password) when the REST API wants authentication
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (with ``dicomweb=True``)."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def basic_auth(self) -> str | None:
        """The Authorization header value for ``user``."""
        if self.user is None:
            return None
        return "Basic " + base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()

    def start(self) -> OrthancProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = dict(os.environ, TCP_NODELAY="1")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.config_path.parent)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.proc.returncode} at startup; log: {self.log_path}\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                self.rest("/system", timeout=2)
                if self._dicom_port_open():
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url}/system within {self.startup_timeout_s:.0f} s; "
                           f"log: {self.log_path}")

    def _dicom_port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 30.0, kill: bool = False) -> None:
        """Shut Orthanc down (SIGTERM, graceful), or with ``kill=True`` crash it (SIGKILL: a PACS that vanishes)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rest(self, path: str, timeout: float = 30.0, data: bytes | None = None) -> Any:
        """GET (or POST ``data``) the REST API; JSON answer."""
        request = urllib.request.Request(self.url + path, data=data)
        if self.basic_auth:
            request.add_header("Authorization", self.basic_auth)
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def instances(self) -> list[str]:
        return list(self.rest("/instances"))

    def studies(self) -> list[str]:
        return list(self.rest("/studies"))

    def series_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Orthanc's series objects (MainDicomTags, Instances ...) of the study with this StudyInstanceUID."""
        out = []
        for sid in self.studies():
            study = self.rest(f"/studies/{sid}")
            if study["MainDicomTags"].get("StudyInstanceUID") == study_instance_uid:
                out += [self.rest(f"/series/{s}") for s in study["Series"]]
        return out

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword -> value (sequences as lists of dicts)."""
        return dict(self.rest(f"/instances/{instance_id}/simplified-tags"))

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance, one entry per instance (a duplicate would show twice)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.rest("/instances?expand")]

    def store(self, path: Path) -> None:
        """Store a DICOM file through the REST API (not through the node)."""
        self.rest("/instances", data=Path(path).read_bytes())


def start_orthanc(tmp_path: Path, dicom_port: int | None = None, http_port: int | None = None,
                  aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None, *,
                  dicomweb: bool = False, user: tuple[str, str] | None = None) -> OrthancProcess:
    """Configure and start Orthanc under ``tmp_path/orthanc``; skips the calling test when it is not installed.

    ``dicomweb``: load the DICOMweb plugin (QIDO-RS, STOW-RS under ``/dicom-web/``; skips without it).
    ``user``: the HTTP API (DICOMweb included) wants this (name, password) with HTTP basic authentication."""
    if not orthanc_available():
        pytest.skip(f"Orthanc is not installed ({ORTHANC}); apt-get install orthanc")
    if dicomweb and not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip(f"Orthanc's DICOMweb plugin is not installed ({DICOMWEB_PLUGIN}); apt-get install orthanc-dicomweb")
    root = Path(tmp_path) / "orthanc"
    (root / "storage").mkdir(parents=True, exist_ok=True)
    (root / "index").mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    modalities = modalities if modalities is not None else {"RECONNODE": ("RECONNODE", "127.0.0.1", free_port())}
    config = {
        "Name": "recon-node-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": user is not None,
        "RegisteredUsers": {user[0]: user[1]} if user else {},
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {name: list(v) for name, v in modalities.items()},
        "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
        **({"DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT}} if dicomweb else {}),
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
    }
    config_path = root / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=1))
    return OrthancProcess(config_path, dicom_port, http_port, aet, root / "orthanc.log", user=user).start()
