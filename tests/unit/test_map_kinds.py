"""The output-kind catalogue: the mapping code writes its units, the shipped templates cover it, and a site
templates folder that does not is refused at config load, naming the kind."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from node.config import ConfigError, parse_config
from node.egress.templates import available_kinds, catalogue_problems, default_templates_dir, template_for
from pipelines.map_kinds import MAP_KINDS, map_kind, quantitative_map
from pipelines.mapping.maps import MappingOptions, _to_maps
from pipelines.mapping.matching import MatchResult
from pipelines.types import Geometry


def _config(tmp_path: Path, templates_dir: Path | None) -> dict:
    node: dict = {"spool_dir": str(tmp_path / "spool")}
    if templates_dir is not None:
        node["templates_dir"] = str(templates_dir)
    return {
        "node": node,
        "sources": [{"name": "scanner", "hosts": ["localhost"], "protocols": ["mrd"]}],
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
        "routes": [{"name": "raw", "match": {"input": "mrd"}, "pipeline": "cartesian_frames", "send_to": ["pacs"]}],
    }


def _template_problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    return [m for k, m, _ in ei.value.problems if k == "node.templates_dir"]


def test_shipped_templates_match_the_catalogue():
    assert available_kinds() == sorted(MAP_KINDS)  # no kind without a template, no template without a kind
    for kind, entry in MAP_KINDS.items():
        assert template_for(kind).map_unit == entry.unit, kind
    assert catalogue_problems() == []


def test_site_folder_missing_a_kind_fails_at_config_load(tmp_path):
    site = tmp_path / "templates"
    shutil.copytree(default_templates_dir(), site)
    assert parse_config(_config(tmp_path, site)).node.templates_dir == site
    (site / "t1fat.yaml").unlink()
    msgs = _template_problems(_config(tmp_path, site))
    assert any("lacks templates for: t1fat" in m for m in msgs), msgs


def test_site_template_with_another_unit_fails_at_config_load(tmp_path):
    site = tmp_path / "templates"
    shutil.copytree(default_templates_dir(), site)
    t2 = site / "t2.yaml"
    t2.write_text(t2.read_text().replace("map_unit: ms", "map_unit: s"))
    msgs = _template_problems(_config(tmp_path, site))
    assert any("t2.yaml" in m and "'t2' maps in 'ms'" in m for m in msgs), msgs


def test_mapping_outputs_carry_catalogue_units():
    n = 6
    rng = np.random.default_rng(0)
    res = MatchResult(t1_ms=rng.uniform(300, 2000, n), t2_ms=rng.uniform(20, 200, n), b1=np.ones(n),
                      df_hz=np.full(n, 5.0), m0=rng.uniform(0.5, 1, n), residual=rng.uniform(0, 0.1, n), rank=4,
                      ff=rng.uniform(0, 1, n), t1_fat_ms=np.full(n, 350.0))
    geometry = Geometry.centred((2, 3), (20.0, 30.0))
    keep = np.ones(n, dtype=bool)
    for model, kinds in (("single", ["t1", "t2", "pd", "b1", "residual"]),
                         ("water_fat", ["t1", "ff", "t1fat", "pd", "b1", "residual", "df"])):
        maps = _to_maps(res, keep, (1, 2, 3), geometry, MappingOptions(mask_threshold=0.0), model)
        assert [m.kind for m in maps] == kinds
        for m in maps:
            assert m.unit == MAP_KINDS[m.kind].unit, m.kind
    assert maps[0].description == "T1 water map"


def test_unknown_kind_names_the_catalogue():
    with pytest.raises(ValueError, match="t1fat"):
        map_kind("t3")
    with pytest.raises(ValueError, match="unknown output kind 't3'"):
        quantitative_map("t3", np.zeros((1, 2, 2)), Geometry.centred((2, 2), (2.0, 2.0)))
