"""Routing: first match wins, regexes on attributes, no match -> None."""

from __future__ import annotations

from pathlib import Path

from node.config import parse_config
from node.ingest.units import IngestUnit
from node.routing import route


def cfg_with(routes):
    return parse_config({"node": {"spool_dir": "/tmp/spool"},
                         "sources": [{"name": "mr1", "ae_title": "MR1", "hosts": ["10.0.0.1"]},
                                     {"name": "mr2", "hosts": ["10.0.0.2"]}],
                         "routes": routes}, check_pipelines=False)


def dicom(**attrs):
    return IngestUnit(kind="dicom", path=Path("/x"), source="mr1", calling_ae="MR1", called_ae="RECON",
                      attributes=attrs)


def mrd(source="mr2", **attrs):
    return IngestUnit(kind="mrd", path=Path("/y.h5"), source=source, attributes=attrs)


def test_first_match_wins():
    cfg = cfg_with([{"name": "a", "match": {"input": "mrd"}, "pipeline": "p1"},
                    {"name": "b", "match": {"input": "mrd"}, "pipeline": "p2"},
                    {"name": "c", "pipeline": "p3"}])
    assert route(cfg, mrd()).name == "a"
    assert route(cfg, dicom()).name == "c"  # empty match matches anything


def test_conditions_and_regexes():
    cfg = cfg_with([
        {"name": "mrf", "match": {"input": "dicom", "modality": "MR", "series_description": "^mrf|fingerprint"},
         "pipeline": "p"},
        {"name": "by_ae", "match": {"calling_ae": "mr1", "called_ae": "RECON"}, "pipeline": "p"},
        {"name": "radial", "match": {"input": "mrd", "trajectory": "radial", "sequence": "fisp"}, "pipeline": "p"},
        {"name": "proto", "match": {"protocol_name": "t1ff$", "source": "mr2"}, "pipeline": "p"},
    ])
    assert route(cfg, dicom(Modality="MR", SeriesDescription="MRF brain")).name == "mrf"
    assert route(cfg, dicom(Modality="MR", SeriesDescription="brain Fingerprint")).name == "mrf"
    assert route(cfg, dicom(Modality="CT", SeriesDescription="MRF")).name == "by_ae"  # calling AE ignores case
    assert route(cfg, mrd(trajectory="radial", sequence="fisp")).name == "radial"
    assert route(cfg, mrd(trajectory="Radial", sequence="t1ff", protocolName="MRF_T1FF")).name == "proto"
    assert route(cfg, mrd(source="mr1", trajectory="spiral", protocolName="MRF_T1FF")) is None


def test_missing_attribute_does_not_match_and_unrouted_is_none():
    cfg = cfg_with([{"name": "sop", "match": {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.4"}, "pipeline": "p"}])
    assert route(cfg, dicom()) is None
    assert route(cfg, dicom(SOPClassUID="1.2.840.10008.5.1.4.1.1.4")).name == "sop"
