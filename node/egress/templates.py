"""Output series templates (``dicom_templates/*.yaml``): one per output kind, loaded and checked here.

Where the templates come from, first match wins:

1. the ``templates_dir`` a caller (site config) gives;
2. ``dicom_templates/`` at the top of the source tree (next to the ``node`` package: checkouts, editable installs);
3. the ``dicom_templates`` package data installed with the wheel.

Errors are :class:`TemplateError` (a ``ValueError``) naming the file and the key.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_REPO_TEMPLATES = Path(__file__).resolve().parents[2] / "dicom_templates"


class TemplateError(ValueError):
    """A template file is missing or wrong; the message names the file and the key."""


@dataclass(frozen=True)
class Code:
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SeriesTemplate:
    """What one output kind looks like in DICOM (see ``dicom_templates/README.md``)."""

    kind: str
    path: Path
    series_description: str
    series_number_offset: int
    image_type: tuple[str, ...]
    map_unit: str
    unit: Code  # UCUM
    quantity: Code
    slope: float  # real = stored * slope + intercept (ignored when auto_max is set)
    intercept: float
    auto_max: int | None  # images: scale per series so the maximum is stored as auto_max
    window_center: float | None  # real units; None = automatic
    window_width: float | None
    lut_label: str
    lut_explanation: str

    def description(self, output_description: str) -> str:
        return self.series_description.replace("{description}", output_description)[:64]


def default_templates_dir() -> Path:
    """The shipped templates: the source tree's ``dicom_templates/``, else the installed package data."""
    if _REPO_TEMPLATES.is_dir():
        return _REPO_TEMPLATES
    try:
        return Path(str(importlib.resources.files("dicom_templates")))
    except ModuleNotFoundError as e:
        raise TemplateError(
            f"no DICOM templates found: neither {_REPO_TEMPLATES} nor an installed 'dicom_templates' package "
            "exists; reinstall recon-node or give templates_dir"
        ) from e


def template_for(kind: str, templates_dir: str | Path | None = None) -> SeriesTemplate:
    """The template of output ``kind`` from ``templates_dir`` (default: the shipped ones)."""
    folder = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    return _load(kind, folder.resolve())


def available_kinds(templates_dir: str | Path | None = None) -> list[str]:
    folder = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    return sorted(p.stem for p in folder.glob("*.yaml"))


def catalogue_problems(templates_dir: str | Path | None = None) -> list[str]:
    """Where a templates folder disagrees with the pipelines' output kinds (:mod:`pipelines.map_kinds`): kinds
    without a template (one message naming them all), and templates whose ``map_unit`` is not the unit the
    pipelines write. Empty when every output a pipeline can return has a matching template."""
    from pipelines.map_kinds import MAP_KINDS

    folder = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    have = set(available_kinds(folder))
    missing = [k for k in MAP_KINDS if k not in have]
    problems = [f"{folder} lacks templates for: {', '.join(missing)}"] if missing else []
    for kind in MAP_KINDS:
        if kind not in have:
            continue
        try:
            template = template_for(kind, folder)
        except TemplateError:
            continue  # the folder check reports unreadable templates on their own
        unit = MAP_KINDS[kind].unit
        if template.map_unit and template.map_unit != unit:
            problems.append(
                f"{template.path}: map_unit is {template.map_unit!r} but the pipelines write {kind!r} maps in {unit!r}"
            )
    return problems


@functools.lru_cache(maxsize=64)
def _load_cached(path: Path, mtime_ns: int) -> SeriesTemplate:
    return _parse(path)


def _load(kind: str, folder: Path) -> SeriesTemplate:
    if not folder.is_dir():
        raise TemplateError(f"DICOM templates folder {folder} does not exist (templates_dir)")
    path = folder / f"{kind}.yaml"
    if not path.is_file():
        have = ", ".join(p.name for p in sorted(folder.glob("*.yaml"))) or "none"
        raise TemplateError(
            f"no DICOM template for output kind {kind!r}: {path} does not exist (templates there: {have}); "
            f"copy one of the shipped templates to {kind}.yaml and edit it"
        )
    return _load_cached(path, path.stat().st_mtime_ns)


def _parse(path: Path) -> SeriesTemplate:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(doc, dict):
        raise TemplateError(
            f"{path}: expected a mapping of keys (kind, series_description, ...), got {type(doc).__name__}"
        )
    r = _Reader(path, doc)
    kind = r.text("kind")
    if kind != path.stem:
        raise TemplateError(f"{path}: key 'kind' is {kind!r} but the file is named {path.name}; make them agree")
    image_type = r.get("image_type")
    if (
        not isinstance(image_type, list)
        or not 2 <= len(image_type) <= 4
        or not all(isinstance(v, str) and v and len(v) <= 16 for v in image_type)
    ):
        raise TemplateError(
            f"{path}: key 'image_type' must be a list of 2 to 4 short strings "
            f"(e.g. [DERIVED, SECONDARY, T1 MAP]), got {image_type!r}"
        )
    encoding = r.mapping("encoding")
    auto_max = encoding.get("auto_max")
    if auto_max is not None:
        if not isinstance(auto_max, int) or not 1 <= auto_max <= 65535:
            raise TemplateError(f"{path}: key 'encoding.auto_max' must be an integer in 1..65535, got {auto_max!r}")
        slope, intercept = 1.0, 0.0
    else:
        slope = r.number("encoding.slope", encoding.get("slope"))
        intercept = r.number("encoding.intercept", encoding.get("intercept", 0.0))
        if slope <= 0:
            raise TemplateError(f"{path}: key 'encoding.slope' must be > 0, got {slope}")
    window = r.get("window")
    if window == "auto":
        center = width = None
    elif isinstance(window, dict):
        center = r.number("window.center", window.get("center"))
        width = r.number("window.width", window.get("width"))
        if width <= 0:
            raise TemplateError(f"{path}: key 'window.width' must be > 0, got {width}")
    else:
        raise TemplateError(f"{path}: key 'window' must be {{center: C, width: W}} or auto, got {window!r}")
    offset = r.get("series_number_offset")
    if not isinstance(offset, int) or offset < 0:
        raise TemplateError(f"{path}: key 'series_number_offset' must be a non-negative integer, got {offset!r}")
    description = r.text("series_description")
    lut_label = r.text("lut_label")
    if len(lut_label) > 16:
        raise TemplateError(f"{path}: key 'lut_label' must be at most 16 characters, got {lut_label!r}")
    return SeriesTemplate(
        kind=kind,
        path=path,
        series_description=description,
        series_number_offset=offset,
        image_type=tuple(str(v).upper() for v in image_type),
        map_unit=str(doc.get("map_unit", "") if doc.get("map_unit") is not None else ""),
        unit=r.code("unit", default_scheme="UCUM"),
        quantity=r.code("quantity"),
        slope=slope,
        intercept=intercept,
        auto_max=auto_max,
        window_center=center,
        window_width=width,
        lut_label=lut_label,
        lut_explanation=str(doc.get("lut_explanation") or description.replace("{description}", kind))[:64],
    )


@dataclass
class _Reader:
    path: Path
    doc: dict[str, Any]

    def get(self, key: str) -> Any:
        if key not in self.doc:
            raise TemplateError(f"{self.path}: key {key!r} is missing")
        return self.doc[key]

    def text(self, key: str) -> str:
        v = self.get(key)
        if not isinstance(v, str) or not v.strip():
            raise TemplateError(f"{self.path}: key {key!r} must be a non-empty string, got {v!r}")
        return v

    def mapping(self, key: str) -> dict[str, Any]:
        v = self.get(key)
        if not isinstance(v, dict):
            raise TemplateError(f"{self.path}: key {key!r} must be a mapping, got {v!r}")
        return v

    def number(self, key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TemplateError(f"{self.path}: key {key!r} must be a finite number, got {v!r}")
        return float(v)

    def code(self, key: str, default_scheme: str | None = None) -> Code:
        v = self.mapping(key)
        scheme = v.get("scheme", default_scheme)
        parts = {"code": v.get("code"), "scheme": scheme, "meaning": v.get("meaning")}
        for name, part in parts.items():
            if not isinstance(part, str) or not part:
                raise TemplateError(
                    f"{self.path}: key '{key}.{name}' must be a non-empty string (quote codes "
                    f'such as "113063"), got {part!r}'
                )
        return Code(str(parts["code"]), str(parts["scheme"]), str(parts["meaning"]))
