"""Deterministic DICOM UIDs: the same inputs give the same UID, so a resend or rerun is idempotent."""

from __future__ import annotations

import uuid

# Name space for UUID-derived UIDs (uuid5 of this namespace + the key parts).
_UID_NAMESPACE = uuid.UUID("6f1c0d0e-6a3b-5c1e-9b7d-3e5a2f4c8d10")


def deterministic_uid(*parts: object) -> str:
    """A valid DICOM UID (2.25.<128-bit integer>, PS3.5 B.2) that depends only on ``parts``."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}"
