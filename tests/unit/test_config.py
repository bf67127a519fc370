"""Site config: validation errors name the key and a fix; the shipped example validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, GroupingRule, find_source, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def base(tmp_path: Path, **extra) -> dict:
    cfg = {
        "node": {"spool_dir": str(tmp_path / "spool")},
        "sources": [{"name": "scanner", "ae_title": "MR1", "hosts": ["10.1.2.3", "10.20.0.0/16"],
                     "protocols": ["dicom", "mrd"]},
                    {"name": "lab", "hosts": ["localhost"], "protocols": ["mrd"]}],
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
        "routes": [{"name": "raw", "match": {"input": "mrd"}, "pipeline": "cartesian_frames",
                    "params": {"frames": "0,1"}, "send_to": ["pacs"]}],
    }
    cfg.update(extra)
    return cfg


def problems(data: dict) -> dict[str, tuple[str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    return {k: (m, h) for k, m, h in ei.value.problems}


def test_example_config_validates():
    cfg = load_config(REPO / "deploy" / "site.example.yaml")
    assert cfg.node.mrd_port == 9002 and cfg.node.dicom_port == 11112
    assert {r.pipeline for r in cfg.routes} <= {"b1_map", "cartesian_frames", "mrf", "mrf_maps_from_images"}
    assert cfg.grouping_for("pacs").by == "series"
    assert cfg.grouping_for("mr-scanner-1").by == "series"  # its B1 map series is a unit of its own
    assert cfg.grouping_for("research-lab") == cfg.grouping.default


@pytest.mark.parametrize("trajectory", ["spiral", "cartesian"])
def test_example_config_sends_raw_mrf_to_the_map_pipeline(tmp_path, trajectory):
    """A site that copies the example gets maps from the MRD path (the demo's), not frames, whatever the trajectory."""
    from node.ingest.units import unit_from_disk
    from node.routing import route
    from pipelines.physics.sequences import MRFSequence, fisp_sequence
    from pipelines.sim.acquisition import AcquisitionSettings, simulate_study
    from pipelines.sim.mrd_writer import write_ismrmrd

    cfg = load_config(REPO / "deploy" / "site.example.yaml")
    s = fisp_sequence()
    seq = MRFSequence("fisp", s.flip_angles_deg[:8], s.tr_ms[:8], s.te_ms[:8], ti_ms=s.ti_ms)
    study = simulate_study("brain", seq, AcquisitionSettings(trajectory=trajectory, coils=2, snr=50), matrix=16)
    unit = unit_from_disk(write_ismrmrd(study, tmp_path / "scan.h5"))
    assert unit is not None
    r = route(cfg, unit)
    assert r is not None and (r.name, r.pipeline) == ("mrf-raw", "mrf"), (unit.attributes, r)


def test_defaults_and_attribute_names(tmp_path):
    cfg = parse_config(base(tmp_path))
    n = cfg.node
    assert (n.ae_title, n.dicom_port, n.mrd_port, n.bind, n.workers, n.max_attempts) == \
        ("RECON_NODE", 11112, 9002, "0.0.0.0", 1, 3)
    assert n.spool_dir == tmp_path / "spool" and n.database_path == tmp_path / "spool" / "jobs.sqlite"
    assert cfg.reject_unknown_sources is True and cfg.retention.days == 7
    assert cfg.grouping_for("scanner") == GroupingRule(by="study", quiet_seconds=5)
    assert cfg.sources[0].ae_title == "MR1" and cfg.sources[1].protocols == ["mrd"]


def test_relative_paths_are_relative_to_the_file(tmp_path):
    data = base(tmp_path)
    data["node"]["spool_dir"] = "spool"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "site.yaml").node.spool_dir == tmp_path / "spool"


def test_structure_errors_name_key_paths_and_hints(tmp_path):
    data = base(tmp_path)
    data["node"]["ae_titel"] = "X"
    data["node"]["dicom_port"] = 70000
    data["sources"][0]["hosts"] = ["10.0.0.0/33"]
    data["routes"][0]["match"]["series_description"] = "("
    p = problems(data)
    assert "did you mean 'ae_title'" in p["node.ae_titel"][1]
    assert "node.dicom_port" in p and "1-65535" in p["node.dicom_port"][1]
    assert "CIDR" in p["sources[0].hosts"][0]
    assert "regular expression" in p["routes[0].match.series_description"][0]


def test_route_errors_name_key_paths_and_hints(tmp_path):
    data = base(tmp_path)
    data["routes"] += [
        {"name": "b", "pipeline": "no_such_pipeline"},
        {"name": "c", "pipeline": "cartesian_frames", "params": {"framez": "1"}, "send_to": ["nowhere"]},
    ]
    p = problems(data)
    assert "unknown pipeline" in p["routes[1].pipeline"][0] and "cartesian_frames" in p["routes[1].pipeline"][1]
    assert "framez" in p["routes[2].params.framez"][0] and "frames" in p["routes[2].params.framez"][1]
    assert "nowhere" in p["routes[2].send_to[0]"][0] and "pacs" in p["routes[2].send_to[0]"][1]


def test_cross_checks(tmp_path):
    data = base(tmp_path, grouping={"sources": {"ghost": {"by": "series"}}})
    data["routes"] += [{"name": "raw", "match": {"input": "dicom"}, "pipeline": "cartesian_frames",
                        "reply_over_mrd": True},
                       {"name": "x", "match": {"source": "ghost"}, "pipeline": "cartesian_frames"}]
    p = problems(data)
    assert "grouping.sources.ghost" in p
    assert "used twice" in p["routes[1].name"][0]
    assert "takes mrd input" in p["routes[1].match.input"][0]
    assert "routes[1].reply_over_mrd" in p
    assert "routes[2].match.source" in p


def test_wait_for_b1_only_where_a_b1_map_is_used(tmp_path):
    data = base(tmp_path)
    data["routes"] = [
        {"name": "a", "match": {"input": "mrd"}, "pipeline": "mrf", "wait_for_b1_seconds": 900},
        {"name": "b", "match": {"input": "mrd"}, "pipeline": "cartesian_frames", "wait_for_b1_seconds": 60},
        {"name": "c", "pipeline": "mrf", "params": {"b1_measured": "off"}, "wait_for_b1_seconds": 60},
        {"name": "d", "pipeline": "mrf", "reply_over_mrd": True, "wait_for_b1_seconds": 60},
    ]
    p = problems(data)
    assert "routes[0].wait_for_b1_seconds" not in p
    assert "does not use a measured B1 map" in p["routes[1].wait_for_b1_seconds"][0]
    assert "(b1_measured is 'off')" in p["routes[2].wait_for_b1_seconds"][0]
    assert "cannot wait for a B1 series" in p["routes[3].wait_for_b1_seconds"][0]
    data["routes"] = [{"name": "e", "pipeline": "mrf", "wait_for_b1_seconds": -1}]
    assert "routes[0].wait_for_b1_seconds" in problems(data)


def test_bad_param_value_is_a_config_error(tmp_path):
    data = base(tmp_path)
    data["routes"] = [{"name": "m", "pipeline": "mrf_maps_from_images", "params": {"model": "nonsense"}}]
    p = problems(data)
    assert "nonsense" in p["routes[0].params"][0]


def test_yaml_syntax_error_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("node:\n  spool_dir: /x\n routes: [\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert "line" in ei.value.problems[0][0]


def test_check_config_cli(tmp_path, capsys):
    from node.cli import main

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base(tmp_path)))
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "raw" in out and "cartesian_frames" in out and "pacs" in out
    data = base(tmp_path)
    data["routes"][0]["pipeline"] = "nope"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "routes[0].pipeline" in err and "hint:" in err


def test_find_source(tmp_path):
    cfg = parse_config(base(tmp_path))
    assert find_source(cfg, "mrd", "10.1.2.3", None).name == "scanner"
    assert find_source(cfg, "mrd", "10.20.7.9", None).name == "scanner"  # CIDR
    assert find_source(cfg, "dicom", "10.1.2.3", "MR1").name == "scanner"
    assert find_source(cfg, "dicom", "10.1.2.3", "OTHER") is None  # AE title must match for DICOM
    assert find_source(cfg, "mrd", "127.0.0.1", None).name == "lab"  # host name resolution
    assert find_source(cfg, "dicom", "127.0.0.1", "X") is None  # lab is MRD only
    assert find_source(cfg, "mrd", "192.168.1.1", None) is None


# ---- egress: destinations (dicom | folder), templates_dir, parametric_map, sender settings ---------------------
def test_folder_destination_and_egress_settings(tmp_path):
    data = base(tmp_path)
    data["destinations"].append({"name": "share", "kind": "folder", "path": "export"})
    data["routes"][0]["send_to"] = ["pacs", "share"]
    data["node"]["parametric_map"] = True
    data["egress"] = {"backoff_base_s": 0.5, "backoff_max_s": 5, "max_attempts": 10}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "site.yaml")
    pacs, share = cfg.destinations
    assert pacs.kind == "dicom" and pacs.target == "ORTHANC@127.0.0.1:4242"
    assert share.kind == "folder" and share.path == tmp_path / "export"  # relative to the config file
    assert cfg.node.parametric_map is True and cfg.node.templates_dir is None
    assert (cfg.egress.backoff_base_s, cfg.egress.backoff_max_s, cfg.egress.max_attempts) == (0.5, 5.0, 10)
    assert cfg.node.outbox_path == tmp_path / "spool" / "outbox.sqlite"
    assert parse_config(base(tmp_path)).egress.max_attempts is None  # default: retry until delivered


def test_destination_problems_name_the_key(tmp_path):
    data = base(tmp_path)
    data["destinations"] = [
        {"name": "pacs", "ae_title": "ORTHANC", "port": 4242},  # no host
        {"name": "share", "kind": "folder"},  # no path
        {"name": "mixed", "kind": "folder", "path": "/x", "host": "10.0.0.1"},
        {"name": "odd", "kind": "ftp", "path": "/x"},
    ]
    data["routes"][0]["send_to"] = ["pacs"]
    data["egress"] = {"backoff_max_s": 0.1}
    p = problems(data)
    assert "destinations[3].kind" in p and "dicom" in p["destinations[3].kind"][0]
    del data["destinations"][3]
    p = problems(data)
    assert p["destinations[0].host"][0].startswith("required for a dicom destination")
    assert "kind: folder" in p["destinations[0].host"][1]
    assert p["destinations[1].path"][0].startswith("required for a folder destination")
    assert p["destinations[2].host"][0] == "a folder destination has no host"
    assert "below backoff_base_s" in p["egress.backoff_max_s"][0]
    data = base(tmp_path, egress={"backof_max_s": 3})
    assert problems(data)["egress.backof_max_s"][1] == "did you mean 'backoff_max_s'?"


def test_templates_dir_is_checked(tmp_path):
    import shutil

    from node.egress.templates import default_templates_dir

    data = base(tmp_path)
    data["node"]["templates_dir"] = str(tmp_path / "nope")
    assert "is not a folder" in problems(data)["node.templates_dir"][0]
    site = tmp_path / "site_templates"
    shutil.copytree(default_templates_dir(), site)
    data["node"]["templates_dir"] = str(site)
    assert parse_config(data).node.templates_dir == site
    (site / "t2.yaml").unlink()
    (site / "t1.yaml").write_text((site / "t1.yaml").read_text().replace("kind: t1", "kind: t1x"))
    msgs = [m for k, m, h in _all_problems(data) if k == "node.templates_dir"]
    assert any("lacks templates for: t2" in m for m in msgs) and any("t1.yaml" in m for m in msgs)


def _all_problems(data: dict) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    return ei.value.problems
