"""The catalogue of output kinds: what a pipeline may return, each with its unit and default description.

A map's ``kind`` names its DICOM template (``dicom_templates/<kind>.yaml``) and its ``unit`` must be the template's
``map_unit``. Both sides are checked against this table: the mapping code takes units from here
(:func:`quantitative_map`), and the node refuses a config whose templates folder lacks a kind or labels it with
another unit (``recon-node check``, config load), so a missing template fails before any job runs. A new map kind
is one entry here plus one template.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.types import Geometry, QuantitativeMap


@dataclass(frozen=True)
class MapKind:
    kind: str
    unit: str  # UCUM, as the map carries it; "" for reconstructed images, which have no physical unit
    description: str  # the output's description unless the pipeline gives a more specific one


MAP_KINDS: dict[str, MapKind] = {
    k.kind: k
    for k in (
        MapKind("t1", "ms", "T1 map"),
        MapKind("t2", "ms", "T2 map"),
        MapKind("t1fat", "ms", "T1 fat map"),
        MapKind("ff", "%", "Fat fraction (PDFF)"),
        MapKind("pd", "1", "Proton density (a.u.)"),
        MapKind("b1", "1", "B1 (relative flip angle)"),
        MapKind("df", "Hz", "Field offset"),
        MapKind("residual", "%", "Fit residual (relative)"),
        MapKind("image", "", "Reconstructed images"),
    )
}


def map_kind(kind: str) -> MapKind:
    try:
        return MAP_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown output kind {kind!r}: the catalogue (pipelines/map_kinds.py) has {', '.join(MAP_KINDS)}"
        ) from None


def quantitative_map(
    kind: str,
    data: np.ndarray,
    geometry: Geometry,
    *,
    description: str | None = None,
    mask: np.ndarray | None = None,
    notes: list[str] | None = None,
) -> QuantitativeMap:
    """A map of a catalogue kind, in the catalogue's unit."""
    entry = map_kind(kind)
    return QuantitativeMap(
        kind, data, entry.unit, description or entry.description, geometry, mask=mask, notes=list(notes or [])
    )
