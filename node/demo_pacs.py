"""A throwaway Orthanc for ``recon-node demo --pacs orthanc``: loopback only, free ports, its own storage folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BINARY = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    if Path(ORTHANC_BINARY).is_file():
        return ORTHANC_BINARY
    return shutil.which(ORTHANC_BINARY) or shutil.which("Orthanc")


@dataclass
class LocalOrthanc:
    root: Path
    dicom_port: int
    http_port: int
    aet: str = "DEMO_PACS"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def rest(self, path: str, raw: bool = False, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            data = r.read()
        return data if raw else json.loads(data.decode("utf-8"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def download_study(self, study_uid: str, out_dir: Path) -> list[Path]:
        """Every instance of the study with this StudyInstanceUID, saved as ``out_dir/<orthanc id>.dcm``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for sid in self.rest("/studies"):
            study = self.rest(f"/studies/{sid}")
            if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
                continue
            for iid in self.rest(f"/studies/{sid}/instances"):
                path = out_dir / f"{iid['ID']}.dcm"
                path.write_bytes(self.rest(f"/instances/{iid['ID']}/file", raw=True))
                files.append(path)
        return files


def start_local_orthanc(root: Path, timeout_s: float = 60.0) -> LocalOrthanc:
    """Configure and start Orthanc under ``root`` (storage, index, config, log); raises with the log on failure."""
    binary = orthanc_binary()
    if binary is None:
        raise FileNotFoundError(
            f"Orthanc is not installed ({ORTHANC_BINARY}); apt-get install orthanc, or run the demo with --pacs folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    pacs = LocalOrthanc(root, free_port(), free_port())
    config = {
        "Name": "recon-node-demo",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpServerEnabled": True,
        "HttpPort": pacs.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": pacs.aet,
        "DicomPort": pacs.dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
    }
    cfg_path = root / "orthanc.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    log_path = root / "orthanc.log"
    with open(log_path, "ab") as log:
        pacs.proc = subprocess.Popen(
            [binary, str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pacs.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with code {pacs.proc.returncode} at start-up; log {log_path}:\n"
                + log_path.read_text(errors="replace")[-2000:]
            )
        try:
            pacs.rest("/system", timeout=2)
            with socket.create_connection(("127.0.0.1", pacs.dicom_port), timeout=1):
                return pacs
        except OSError:
            time.sleep(0.2)
    pacs.stop()
    raise TimeoutError(f"Orthanc did not start within {timeout_s:.0f} s; log {log_path}")
