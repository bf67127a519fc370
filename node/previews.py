"""PNG previews of a map or an image: the template's window, a colour bar labelled with the unit (matplotlib Agg).

One function for ``recon-node demo`` (files next to the PACS folder) and the operator console (served to the
browser). It builds a :class:`matplotlib.figure.Figure` directly, never through ``pyplot``'s global state, so the
console's request threads can render at the same time.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def display_range(kind: str, data: np.ndarray, templates_dir: Path | None = None) -> tuple[float, float]:
    """The template's window (what a viewer shows first), else 0 to the 99th percentile of the object."""
    from node.egress.templates import TemplateError, template_for

    try:
        t = template_for(kind, templates_dir)
        if t.window_center is not None and t.window_width:
            return t.window_center - t.window_width / 2, t.window_center + t.window_width / 2
    except TemplateError:
        pass
    finite = data[np.isfinite(data)]
    hi = float(np.percentile(finite[finite > 0], 99)) if (finite > 0).any() else 1.0
    return 0.0, hi or 1.0


def preview_plane(data: Any) -> np.ndarray:
    """The 2-D plane a preview shows: magnitude of complex data; the middle of any leading axes (slices, frames)."""
    a = np.asarray(data)
    if np.iscomplexobj(a):
        a = np.abs(a)
    a = a.astype(np.float64, copy=False)
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    if a.ndim < 2:
        a = np.atleast_2d(a)
    return a


def preview_png(
    data: Any, kind: str, unit: str = "", title: str | None = None, templates_dir: Path | None = None
) -> bytes:
    """One PNG (bytes): ``data`` (its middle plane, see :func:`preview_plane`) in the ``kind`` template's window,
    magma for T1/T2, viridis otherwise, with a colour bar labelled ``unit`` (``a.u.`` when there is none)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("matplotlib is needed for the previews: pip install matplotlib") from None
    plane = preview_plane(data)
    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lo, hi = display_range(kind, plane, templates_dir)
    im = ax.imshow(plane, cmap="magma" if kind in ("t1", "t2") else "viridis", vmin=lo, vmax=hi)
    ax.set_title(title or kind.upper())
    ax.axis("off")
    bar = fig.colorbar(im, ax=ax)
    bar.set_label(unit or "a.u.")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
