import json

import ismrmrd.xsd as x
import numpy as np
import pytest

from pipelines.physics.sequences import (
    MRFSequence, fisp_sequence, get_sequence, sequence_from_ismrmrd, sequence_to_ismrmrd, t1ff_sequence,
)


def test_fisp_schedule_matches_its_description():
    s = fisp_sequence()
    assert s.n_frames == 1000
    assert 0 < s.flip_angles_deg.min() < 1 and 69.9 < s.flip_angles_deg.max() <= 70
    assert s.tr_ms.min() == pytest.approx(11.0) and s.tr_ms.max() == pytest.approx(15.0)
    assert np.all(s.te_ms == 2.0) and s.ti_ms == 40.0
    # Smooth TR: the largest step between TRs is a small fraction of the range.
    assert np.abs(np.diff(s.tr_ms)).max() < 0.1
    # Deterministic: same seed, same schedule; other seed, other schedule.
    assert np.array_equal(s.flip_angles_deg, fisp_sequence().flip_angles_deg)
    assert not np.array_equal(s.tr_ms, fisp_sequence(seed=1).tr_ms)


def test_t1ff_te_cycles_fat_phase_at_3T():
    s = t1ff_sequence()
    assert s.n_frames == 175
    f_fat = -3.4e-6 * 42.577478e6 * 3.0  # Hz, main fat peak at 3 T
    phases = np.mod(np.rad2deg(2 * np.pi * f_fat * s.te_ms[:4] * 1e-3), 360)
    # Four TEs a quarter period apart: fat phases 0, -90, -180, -270 deg (mod 360).
    steps = np.mod(np.diff(phases), 360)
    assert np.allclose(steps, 270, atol=1e-6)
    assert np.all(s.tr_ms > s.te_ms + 6)


def test_json_roundtrip(tmp_path):
    s = t1ff_sequence()
    p = tmp_path / "seq.json"
    s.save_json(p)
    r = get_sequence(str(p))
    assert r.name == "t1ff" and r.ti_ms == s.ti_ms
    assert np.array_equal(r.flip_angles_deg, s.flip_angles_deg) and np.array_equal(r.te_ms, s.te_ms)
    assert json.loads(p.read_text())["tr_ms"][0] == s.tr_ms[0]


def test_ismrmrd_header_roundtrip_is_exact():
    s = fisp_sequence()
    h = x.ismrmrdHeader(experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=127_732_434))
    sequence_to_ismrmrd(s, h)
    r = sequence_from_ismrmrd(x.CreateFromDocument(x.ToXML(h)))
    assert r is not None and r.name == "fisp" and r.ti_ms == 40.0
    for a, b in ((r.flip_angles_deg, s.flip_angles_deg), (r.tr_ms, s.tr_ms), (r.te_ms, s.te_ms)):
        assert np.array_equal(a, b)


def test_bad_schedules_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="one value per frame"):
        MRFSequence("bad", [10, 20, 30], [10, 10], [2, 2])
    with pytest.raises(ValueError, match="TE must lie"):
        MRFSequence("bad", [10, 20], [10, 10], [12, 2])
    with pytest.raises(ValueError, match="unknown sequence 'nope'"):
        get_sequence("nope")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_sequence(str(p))
    assert sequence_from_ismrmrd(x.ismrmrdHeader(
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=1))) is None


def test_cache_key_survives_dicom_decimal_strings():
    from pydicom.valuerep import format_number_as_ds

    s = fisp_sequence()
    ds = [np.array([float(format_number_as_ds(float(v))) for v in a]) for a in (s.flip_angles_deg, s.tr_ms, s.te_ms)]
    r = MRFSequence("from_dicom", *ds, ti_ms=float(format_number_as_ds(s.ti_ms)))
    assert r.fingerprint_key() == s.fingerprint_key()
    changed = MRFSequence("x", s.flip_angles_deg + 0.01, s.tr_ms, s.te_ms, ti_ms=s.ti_ms)
    assert changed.fingerprint_key() != s.fingerprint_key()
