"""Audit log: one JSON object per line for every security-relevant event, in the spirit of IHE ATNA.

Site IT feeds this file to their SIEM. Each line holds a UTC ISO-8601 timestamp (``time``), the event ``kind``
(e.g. ``mrd.connection.accepted``, ``dicom.association.refused``, ``unit.stored``, ``job.state``,
``egress.delivered``), the ``outcome`` (``success``, ``refused``, ``failure``), the acting peer (``actor_ae``,
``actor_ip``, ``source``) and the object (``study_uid``, ``series_uid``, ``sop_uid``, ``job_id``, ``unit``).

Patient names and other demographics are never written: :func:`event` drops any field whose name looks like one
(``patient_name``, ``PatientName``, ``patient_birth_date`` ...), so a careless caller cannot leak them.

The module is a no-op until :func:`configure` is called with a path (the service does so from
``node.audit_log``); ``configure(None)`` switches it off again. Writes are serialised by a lock and flushed per
line, so concurrent threads (MRD handlers, the DICOM SCP, workers, the sender) never interleave a line.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

# Field names that would carry patient demographics; never written even if a caller passes them.
_FORBIDDEN = {
    "patient_name",
    "patientname",
    "patient_birth_date",
    "patientbirthdate",
    "patient_address",
    "patientaddress",
    "birth_date",
    "birthdate",
}

_lock = threading.Lock()
_handle: IO[str] | None = None
_path: Path | None = None


def configure(path: str | Path | None, mode: int = 0o640) -> None:
    """Open (append) the audit file at ``path``; ``None`` closes it and makes :func:`event` a no-op again.

    The file is created with ``mode`` (0640: readable by the service group only) since it names hosts and
    study UIDs.
    """
    global _handle, _path
    with _lock:
        if _handle is not None:
            try:
                _handle.close()
            except OSError:
                pass
        _handle, _path = None, None
        if path is None:
            return
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
        _handle = os.fdopen(fd, "a", encoding="utf-8", buffering=1)
        _path = p


def configured_path() -> Path | None:
    return _path


def _clean(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    # Values come from the network (AE titles, UIDs): keep them printable and bounded in size.
    text = str(value)
    return text[:256]


def event(kind: str, outcome: str = "success", /, **fields: Any) -> None:
    """Append one audit line: ``{"time", "kind", "outcome", **fields}``. Never raises; no-op when unconfigured.

    ``outcome`` may also be given by keyword; a field called ``kind`` or ``time`` is kept as ``object_kind`` /
    ``object_time`` so it cannot overwrite the event's own.
    """
    if _handle is None:
        return
    record: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "kind": kind,
        "outcome": str(fields.pop("outcome", outcome)),
    }
    for key, value in fields.items():
        if key.lower() in _FORBIDDEN or "patient" in key.lower():
            continue
        if value is None:
            continue
        record[f"object_{key}" if key in ("time", "kind") else key] = _clean(value)
    line = json.dumps(record, ensure_ascii=True, sort_keys=False)
    with _lock:
        if _handle is None:
            return
        try:
            _handle.write(line + "\n")
            _handle.flush()
        except (OSError, ValueError) as e:  # a full disk must not stop reception; say so in the log
            log.warning("cannot write the audit log %s: %s", _path, e)
