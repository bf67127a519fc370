"""deploy/: the systemd unit verifies clean with systemd-analyze, its command lines parse with the real CLI, it stops
slower than the node may take; the compose file's node config passes ``recon-node check-config`` and agrees with the
compose file on ports, AE titles, host names and paths; the Dockerfile runs what compose mounts.

The images themselves cannot be built here (no registry access for base images); what can be checked is."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.cli import build_parser, main
from node.config import Egress, NodeSettings, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "recon-node.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
INSTALLED = "/opt/recon-node/.venv/bin/recon-node"


def unit_entries() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, val = line.partition("=")
            out.setdefault(key, []).append(val)
    return out


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|min)?", text.strip())
    assert m, text
    return float(m.group(1)) * (60 if m.group(2) == "min" else 1)


def slowest_stop() -> float:
    """What a node with default settings may take after SIGTERM: jobs' grace + a send in progress."""
    return NodeSettings.model_fields["shutdown_grace_s"].default + Egress.model_fields["timeout_s"].default


@pytest.fixture
def runnable_unit(tmp_path) -> Path:
    """The unit with its binary pointed at this checkout's recon-node: systemd-analyze checks that the command
    exists, and /opt/recon-node is where a site installs it, not where tests run."""
    here = Path(sys.executable).with_name("recon-node")
    if not here.exists():
        pytest.skip(f"{here} is not installed (pip install -e .)")
    path = tmp_path / "recon-node.service"
    path.write_text(UNIT.read_text().replace(INSTALLED, str(here)))
    return path


def test_systemd_unit_verifies_clean(runnable_unit):
    if not Path(SYSTEMD_ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    p = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(runnable_unit)], capture_output=True, text=True,
                       timeout=60)
    # unknown keys and unparsable values are warnings on stderr with exit 0: the output must be empty
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout + p.stderr


def test_systemd_unit_is_hardened(runnable_unit):
    if not Path(SYSTEMD_ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    p = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager", str(runnable_unit)],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0 and "offline" in p.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {p.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 2.5, p.stdout  # systemd rates <= 2.5 "OK"; an unhardened service is 9.6
    e = unit_entries()
    assert e["User"] == ["recon-node"] and e["NoNewPrivileges"] == ["true"] and e["CapabilityBoundingSet"] == [""]
    assert e["ProtectSystem"] == ["strict"] and e["ProtectHome"] == ["true"] and e["PrivateTmp"] == ["true"]
    assert any("/var/lib/recon-node/spool" in v for v in e["ReadWritePaths"])
    assert e["Restart"] == ["on-failure"]


def test_systemd_commands_are_real_cli_commands_and_stop_waits_long_enough():
    e = unit_entries()
    parser = build_parser()
    for key in ("ExecStartPre", "ExecStart"):
        argv = shlex.split(e[key][0])
        assert argv[0] == INSTALLED
        parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown command or flag
    serve = parser.parse_args(shlex.split(e["ExecStart"][0])[1:])
    assert serve.func.__name__ == "cmd_serve" and serve.config == "/etc/recon-node/site.yaml"
    assert seconds(e["TimeoutStopSec"][0]) > slowest_stop()


def test_compose_site_config_passes_check_config_and_agrees_with_compose(capsys):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    node_svc, orthanc = services["recon-node"], services["orthanc"]

    # the config the node reads is the file compose mounts, and it passes check-config
    mounts = dict(v.split(":")[:2] for v in node_svc["volumes"])  # source -> target (":ro" dropped)
    config_in_container = node_svc["command"][node_svc["command"].index("--config") + 1]
    host_file = next(src for src, dst in mounts.items() if dst == config_in_container)
    site = (DEPLOY / host_file).resolve()
    assert main(["check-config", str(site)]) == 0, capsys.readouterr()
    cfg = load_config(site)
    n = cfg.node

    # the node's ports are the ones compose publishes
    published = {int(p.split(":")[-1]) for p in node_svc["ports"]}
    assert {n.dicom_port, n.mrd_port} <= published
    # spool and cache on the node's volume, not in the container's writable layer
    volume_dir = next(dst for src, dst in mounts.items() if src in compose["volumes"])
    for path in (n.spool_dir, n.cache_dir):
        assert Path(path).is_relative_to(volume_dir), path

    # the destination is the compose Orthanc: service name, AE title, DICOM port
    env = orthanc["environment"]
    (pacs,) = cfg.destinations
    assert pacs.host == "orthanc" and pacs.ae_title == env["ORTHANC__DICOM_AET"]
    assert pacs.port == int(env["ORTHANC__DICOM_PORT"])
    # Orthanc knows the node under its AE title, compose host name and DICOM port
    modality = yaml.safe_load(env["ORTHANC__DICOM_MODALITIES"])["recon-node"]
    assert modality == [n.ae_title, "recon-node", n.dicom_port]
    src = next(s for s in cfg.sources if s.name == "orthanc")
    assert src.ae_title == env["ORTHANC__DICOM_AET"] and src.hosts == ["orthanc"]

    assert seconds(node_svc["stop_grace_period"]) > n.shutdown_grace_s + cfg.egress.timeout_s


def test_dockerfile_runs_what_compose_mounts():
    text = (DEPLOY / "Dockerfile").read_text()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and yaml.safe_load(cmd.group(1)) == compose["services"]["recon-node"]["command"]
    assert re.search(r'^ENTRYPOINT \["recon-node"\]$', text, re.M)
    assert re.search(r"^USER recon-node$", text, re.M)
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.M).group(1).split()}
    n = load_config(DEPLOY / "site.compose.yaml").node
    assert {n.dicom_port, n.mrd_port} <= exposed
    assert compose["services"]["recon-node"]["build"]["dockerfile"] == "deploy/Dockerfile"
