"""Raw-data reconstruction pipelines: ``cartesian_recon``, ``noncartesian_recon``.

Both build a SENSE operator (:mod:`pipelines.recon.operators`) and hand it with the data to one entry of
:data:`RECONS`; a new method is one more entry there, taking ``(op, y, params, ctx)`` and returning complex
images [slices, ny, nx].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipelines.recon.classical import (
    CG_ITERATIONS,
    CG_LAMBDA,
    L1_ITERATIONS,
    L1_LAMBDA,
    adjoint_recon,
    cg_sense,
    l1_wavelet,
)
from pipelines.recon.coil_maps import calibration_width, espirit_maps, lowres_maps, lowres_maps_cartesian
from pipelines.recon.dcf import pipe_menon_dcf
from pipelines.recon.operators import CartesianSense, NonCartesianSense, Operator
from pipelines.recon.raw_prep import cartesian_kspace, noncartesian_samples
from pipelines.registry import Param, PipelineSpec, RunContext, register
from pipelines.types import PipelineOutput, RawStudy, ReconImage

ReconFn = Callable[[Operator, torch.Tensor, dict[str, Any], RunContext], torch.Tensor]

RECONS: dict[str, ReconFn] = {
    "adjoint": lambda op, y, p, ctx: adjoint_recon(op, y),
    "cgsense": lambda op, y, p, ctx: cg_sense(
        op, y, lam=p["lam"] or CG_LAMBDA, iterations=p["iterations"] or CG_ITERATIONS
    ),
    "l1": lambda op, y, p, ctx: l1_wavelet(
        op, y, lam=p["lam"] or L1_LAMBDA, iterations=p["iterations"] or L1_ITERATIONS
    ),
}

MIN_CALIB = 8  # fewer fully sampled central lines cannot calibrate ESPIRiT


def _common_params() -> dict[str, Param]:
    # Each pipeline adds its own "recon" (its methods) and "weights" (its network's shipped weights).
    return {
        "lam": Param(
            float,
            0.0,
            f"regularisation (0: default, cgsense {CG_LAMBDA:g} x operator norm, l1 {L1_LAMBDA:g} x max |A^H y|)",
        ),
        "iterations": Param(int, 0, f"iterations (0: default, cgsense {CG_ITERATIONS}, l1 {L1_ITERATIONS})"),
    }


def _images(x: torch.Tensor, raw: RawStudy, what: str, notes: list[str]) -> list[PipelineOutput]:
    mag = x.abs().detach().cpu().numpy().astype(np.float32)
    geometry = raw.geometry
    if tuple(mag.shape[-2:]) != tuple(geometry.matrix):
        notes.append(f"image grid {mag.shape[-2:]} differs from reconSpace {geometry.matrix}")
        spacing = (raw.fov_mm[0] / mag.shape[-2], raw.fov_mm[1] / mag.shape[-1])
        geometry = dataclasses.replace(geometry, matrix=tuple(mag.shape[-2:]), pixel_spacing_mm=spacing)
    return [ReconImage(kind="image", data=mag, description=what, geometry=geometry, notes=notes)]


# ---- Cartesian -------------------------------------------------------------------------------------------------
def _xpdnet(op: Operator, y: torch.Tensor, p: dict[str, Any], ctx: RunContext) -> torch.Tensor:
    from pipelines.recon.xpdnet import xpdnet_cartesian  # torch model code: imported only when used

    return xpdnet_cartesian(op, y, weights=p.get("weights", ""))


RECONS["xpdnet"] = _xpdnet
CARTESIAN_RECONS = ("adjoint", "cgsense", "l1", "xpdnet")


def _cartesian_maps(avg_k: np.ndarray, avg_mask: np.ndarray, method: str, calib: int, where: str) -> np.ndarray:
    """Maps [S, C, ny, nx] from the repetition-averaged k-space (more calibration lines than one repetition)."""
    out = []
    for s in range(avg_k.shape[0]):
        width = min(int(calib), calibration_width(avg_mask[s, :, avg_mask.shape[-1] // 2]))
        if method == "espirit":
            if width < MIN_CALIB:
                raise ValueError(
                    f"{where}: slice {s} has only {width} fully sampled central lines; ESPIRiT needs "
                    f"at least {MIN_CALIB} (use --set maps=lowres)"
                )
            out.append(espirit_maps(avg_k[s], calib=width))
        else:
            out.append(lowres_maps_cartesian(avg_k[s], calib=max(width, 4)))
    return np.stack(out)


def _cartesian_recon(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    frame = None if params["frame"] < 0 else int(params["frame"])
    avg_k, avg_mask = cartesian_kspace(raw, None)
    k, mask = (avg_k, avg_mask) if frame is None else cartesian_kspace(raw, frame)
    if params["recon"] == "xpdnet":  # XPDNet estimates (and refines) its own maps from the k-space centre
        maps = np.ones((k.shape[0], 1, *k.shape[2:]), np.complex64)
    else:
        maps = _cartesian_maps(avg_k, avg_mask, params["maps"], params["calib"], raw.source_path or "raw data")
    op = CartesianSense(maps, mask, device=ctx.device)
    with torch.no_grad():
        x = RECONS[params["recon"]](op, torch.from_numpy(k).to(ctx.device), params, ctx)
    r = mask[0].size / max(int(mask[0].sum()), 1)
    ctx.log.info(
        "cartesian_recon: %d slice(s) %dx%d, %d coils, R=%.2f, %s",
        *k.shape[:1],
        *k.shape[2:],
        k.shape[1],
        r,
        params["recon"],
    )
    maps_note = "XPDNet's own (central k-space, refined)" if params["recon"] == "xpdnet" else params["maps"]
    notes = [f"R = {r:.2f}; maps: {maps_note}"]
    return _images(x, raw, f"Cartesian recon ({params['recon']})", notes)


register(
    PipelineSpec(
        name="cartesian_recon",
        input_kind="raw",
        summary="Cartesian multi-coil raw data -> magnitude images (adjoint, CG-SENSE or L1-wavelet, ESPIRiT maps)",
        run=_cartesian_recon,
        params={
            **_common_params(),
            "recon": Param(
                str,
                "cgsense",
                "reconstruction: adjoint (zero-filled), cgsense (CG-SENSE with Tikhonov), "
                "l1 (L1-wavelet by FISTA), xpdnet (unrolled network, shipped or site weights)",
                choices=CARTESIAN_RECONS,
            ),
            "weights": Param(
                str, "", "xpdnet: path to a site's own safetensors weights (empty: the shipped xpdnet_small)"
            ),
            "maps": Param(
                str,
                "espirit",
                "coil maps: espirit (sigpy) or lowres (RSS-normalised calibration images)",
                choices=("espirit", "lowres"),
            ),
            "calib": Param(int, 24, "largest calibration block (lines) for the coil maps"),
            "frame": Param(int, -1, "repetition to reconstruct (-1: average all repetitions line by line)"),
        },
    )
)


# ---- non-Cartesian ---------------------------------------------------------------------------------------------
def _ncpdnet(op: Operator, y: torch.Tensor, p: dict[str, Any], ctx: RunContext) -> torch.Tensor:
    from pipelines.recon.ncpdnet import ncpdnet_noncartesian  # torch model code: imported only when used

    if getattr(op, "dcf", None) is None:
        raise ValueError("recon=ncpdnet needs the density compensation (--set dcf=true)")
    return ncpdnet_noncartesian(op, y, weights=p.get("weights", ""))  # type: ignore[arg-type]


RECONS["ncpdnet"] = _ncpdnet
NONCARTESIAN_RECONS = ("adjoint", "cgsense", "l1", "ncpdnet")


def _noncartesian_recon(raw: RawStudy, params: dict[str, Any], ctx: RunContext) -> list[PipelineOutput]:
    data, k = noncartesian_samples(raw)
    shape = raw.matrix
    dcf = pipe_menon_dcf(k, shape) if params["dcf"] else None
    maps = np.stack([lowres_maps(d, k, shape, dcf=dcf, cutoff=params["maps_cutoff"]) for d in data])
    op = NonCartesianSense(maps, k, dcf=dcf, toeplitz=params["toeplitz"], device=ctx.device)
    with torch.no_grad():
        x = RECONS[params["recon"]](op, torch.from_numpy(data).to(ctx.device), params, ctx)
    ctx.log.info(
        "noncartesian_recon: %d slice(s) %dx%d, %d coils, %d samples (%s), %s",
        data.shape[0],
        *shape,
        data.shape[1],
        k.shape[0],
        raw.trajectory_kind,
        params["recon"],
    )
    notes = [
        f"{raw.trajectory_kind}: {k.shape[0]} samples, all frames combined; "
        f"DCF {'Pipe-Menon' if dcf is not None else 'none'}; low-resolution maps"
    ]
    return _images(x, raw, f"{raw.trajectory_kind} recon ({params['recon']})", notes)


register(
    PipelineSpec(
        name="noncartesian_recon",
        input_kind="raw",
        summary="radial / spiral multi-coil raw data (all frames combined) -> magnitude images",
        run=_noncartesian_recon,
        params={
            **_common_params(),
            "recon": Param(
                str,
                "cgsense",
                "reconstruction: adjoint (density-compensated), cgsense (CG-SENSE with "
                "Tikhonov), l1 (L1-wavelet by FISTA), ncpdnet (NC-PDNet, shipped or site weights)",
                choices=NONCARTESIAN_RECONS,
            ),
            "weights": Param(
                str, "", "ncpdnet: path to a site's own safetensors weights (empty: the shipped ncpdnet_anatomy)"
            ),
            "dcf": Param(bool, True, "Pipe-Menon density compensation in the adjoint and the normal operator"),
            "toeplitz": Param(bool, True, "A^H D A by Toeplitz embedding (one FFT pair) instead of a NUFFT pair"),
            "maps_cutoff": Param(float, 0.15, "k-space radius (fraction of k_max) of the low-resolution coil maps"),
        },
    )
)
