"""The shipped pipeline definitions: one package above the library, looked up through it, mapping parameters
shared by the MRF pipelines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.definitions import get_pipeline, list_pipelines
from pipelines.definitions.mrf import MAPPING_PARAMS


def test_builtins_are_listed_and_looked_up():
    names = {s.name for s in list_pipelines()}
    assert {"cartesian_frames", "cartesian_recon", "noncartesian_recon", "mrf", "mrf_maps_from_images"} <= names
    assert get_pipeline("mrf").input_kind == "raw" and get_pipeline("mrf_maps_from_images").input_kind == "images"
    with pytest.raises(ValueError, match="registered are .*cartesian_frames"):
        get_pipeline("no_such_pipeline")


def test_mrf_pipelines_share_the_mapping_parameters():
    for name in ("mrf", "mrf_maps_from_images"):
        params = get_pipeline(name).params
        for key, param in MAPPING_PARAMS.items():
            assert params[key] is param, (name, key)


def test_registry_does_not_import_the_definitions():
    """The library (registry included) sits below the definitions: importing it registers nothing."""
    code = ("import sys, pipelines.registry as r, pipelines.recon.subspace, pipelines.mapping.maps\n"
            "assert r.registered() == {}, r.registered()\n"
            "assert not [m for m in sys.modules if m.startswith('pipelines.definitions')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
