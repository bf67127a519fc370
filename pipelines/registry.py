"""What a pipeline is (:class:`PipelineSpec`, its :class:`Param` list, the :class:`RunContext` it runs in) and the
table every pipeline registers in. The built-in pipelines live in :mod:`pipelines.definitions`, which also has the
lookup the node, the CLI and notebooks use (``get_pipeline``, ``list_pipelines``).

A pipeline is a plain function ``run(study, params, ctx) -> list[QuantitativeMap | ReconImage]`` with a typed
parameter list, so it can run from a notebook with arrays in and maps out, with no server.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipelines.types import ImageStudy, PipelineOutput, RawStudy

InputKind = Literal["raw", "images"]


@dataclass(frozen=True)
class Param:
    """One settable parameter: ``--set name=value`` on the CLI, ``params:`` in a site route."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def parse(self, name: str, value: Any) -> Any:
        try:
            if self.type is bool and isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                out: Any = low in ("1", "true", "yes", "on")
            else:
                out = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {name!r}: {value!r} is not a valid {self.type.__name__}") from None
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"parameter {name!r}: {out!r} is not one of {', '.join(map(str, self.choices))}")
        return out


@dataclass
class RunContext:
    """What a pipeline may use from its environment: a device, a cache folder, a logger, progress bars, and
    ``phase(name)`` to say that a phase begins (``reconstruction``, ``mapping``): the node times each one (its
    metrics); a pipeline that says nothing is timed as one phase, reconstruction for raw input, mapping for images.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache_dir: Path | None = None
    progress: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("pipelines"))
    phase: Callable[[str], None] = field(default=lambda _name: None)


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    input_kind: InputKind
    summary: str
    run: Callable[[Any, dict[str, Any], RunContext], list[PipelineOutput]]
    params: dict[str, Param] = field(default_factory=dict)

    def resolve_params(self, given: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown names and bad values are errors that list what is valid."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            valid = ", ".join(sorted(self.params)) or "none"
            close = [c for u in unknown for c in difflib.get_close_matches(u.lower(), self.params, n=1, cutoff=0.6)]
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise ValueError(
                f"pipeline {self.name!r} has no parameter {', '.join(map(repr, unknown))} ({hint}valid: {valid})"
            )
        return {k: (p.parse(k, given[k]) if k in given else p.default) for k, p in self.params.items()}

    def check_input(self, study: object) -> None:
        """Raise, naming what was given and the pipelines that take it, when ``study`` is not this pipeline's kind."""
        want = RawStudy if self.input_kind == "raw" else ImageStudy
        if isinstance(study, want):
            return
        kinds = {"raw": "raw MR data (ISMRMRD)", "images": "an image series (DICOM)"}
        got = "raw" if isinstance(study, RawStudy) else "images" if isinstance(study, ImageStudy) else None
        fits = sorted(n for n, p in _REGISTRY.items() if p.input_kind == got)
        raise ValueError(
            f"pipeline {self.name!r} takes {kinds[self.input_kind]}, but the input is "
            f"{kinds[got] if got else type(study).__name__}"
            + (f"; pipelines for that input: {', '.join(fits)}" if fits else "")
        )

    def __call__(
        self, study: RawStudy | ImageStudy, params: dict[str, Any] | None = None, ctx: RunContext | None = None
    ) -> list[PipelineOutput]:
        self.check_input(study)
        return self.run(study, self.resolve_params(params), ctx or RunContext())


_REGISTRY: dict[str, PipelineSpec] = {}


def register(spec: PipelineSpec) -> PipelineSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"pipeline {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, PipelineSpec]:
    """What has been registered so far, by name. The built-ins register when :mod:`pipelines.definitions` is
    imported; look pipelines up through its ``get_pipeline`` / ``list_pipelines``."""
    return dict(_REGISTRY)
