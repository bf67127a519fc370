"""Site routes: the first route whose every condition holds picks pipeline, params and destinations.

Conditions (all optional; an absent condition matches anything): ``input`` (mrd | dicom), ``calling_ae``,
``called_ae``, ``source`` (source name), ``modality``, ``sop_class_uid``, ``trajectory``, ``sequence`` compare
exactly (AE titles and trajectory ignore case and surrounding spaces); ``series_description`` and
``protocol_name`` are regular expressions searched anywhere in the value, ignoring case (anchor with ``^...$``).
A condition on an attribute the unit does not carry does not match. No route: ``None`` (the caller records the
unit as ``unrouted``; it is never dropped).
"""

from __future__ import annotations

import re

from node.config import Route, SiteConfig
from node.ingest.units import IngestUnit

# route condition -> attribute names that may carry it (DICOM keyword first, MRD header name second)
_ATTRS: dict[str, tuple[str, ...]] = {
    "modality": ("Modality",),
    "sop_class_uid": ("SOPClassUID",),
    "series_description": ("SeriesDescription", "seriesDescription"),
    "protocol_name": ("ProtocolName", "protocolName"),
    "trajectory": ("trajectory",),
    "sequence": ("sequence", "mrf_sequence_name"),
}
_REGEX = {"series_description", "protocol_name"}
_CASELESS = {"trajectory", "calling_ae", "called_ae"}


def _attr(unit: IngestUnit, cond: str) -> str | None:
    for name in _ATTRS[cond]:
        if name in unit.attributes and unit.attributes[name] is not None:
            return str(unit.attributes[name])
    return None


def _equal(cond: str, want: str, have: str) -> bool:
    if cond in _CASELESS:
        return want.strip().lower() == have.strip().lower()
    return want.strip() == have.strip()


def route_matches(r: Route, unit: IngestUnit) -> bool:
    m = r.match
    if m.input is not None and m.input != unit.kind:
        return False
    if m.source is not None and m.source != unit.source:
        return False
    for cond, have in (("calling_ae", unit.calling_ae), ("called_ae", unit.called_ae)):
        want = getattr(m, cond)
        if want is not None and not _equal(cond, want, have or ""):
            return False
    for cond in _ATTRS:
        want = getattr(m, cond)
        if want is None:
            continue
        value = _attr(unit, cond)
        if value is None:
            return False
        if cond in _REGEX:
            if re.search(want, value, flags=re.IGNORECASE) is None:
                return False
        elif not _equal(cond, want, value):
            return False
    return True


def route(cfg: SiteConfig, unit: IngestUnit) -> Route | None:
    """The first route of the site config that matches ``unit``, or None."""
    return next((r for r in cfg.routes if route_matches(r, unit)), None)
