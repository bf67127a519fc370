"""The pipelines that ship with recon-node, one module per family, and the lookup the node uses.

The families import the library (:mod:`pipelines.recon`, :mod:`pipelines.mapping`, ...) and register their
:class:`~pipelines.registry.PipelineSpec` on import; the library and :mod:`pipelines.registry` never import them.
Importing this package therefore registers every built-in, so :func:`get_pipeline` and :func:`list_pipelines`
see them together with whatever a site plugin (``node.plugins``) registered.
"""

from __future__ import annotations

from pipelines.definitions import b1, frames, mrf, recon  # noqa: F401  (registers the built-ins)
from pipelines.registry import PipelineSpec, registered


def get_pipeline(name: str) -> PipelineSpec:
    pipelines = registered()
    try:
        return pipelines[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}: registered are {', '.join(sorted(pipelines))}") from None


def list_pipelines() -> list[PipelineSpec]:
    pipelines = registered()
    return [pipelines[k] for k in sorted(pipelines)]
