"""Non-Cartesian coil maps at a site's size: low-resolution vs ESPIRiT (issue 16), time, accuracy, peak RSS.

    OMP_NUM_THREADS=1 python benchmarks/coil_maps.py

Thigh phantom at 256² with fat at another phase than water (a t1ff time average), 16 birdcage coils, 1000 radial
spokes; 1 - |<estimated, true>| per pixel, averaged over the water/fat edges and over the object.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from pipelines.recon.coil_maps import espirit_maps_noncartesian, lowres_maps
from pipelines.recon.dcf import pipe_menon_dcf
from pipelines.recon.nufft import nufft_forward
from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import make_phantom
from pipelines.sim.trajectories import radial_trajectory


def main() -> None:
    torch.set_num_threads(1)
    n, c = 256, 16
    ph = make_phantom("thigh", n)
    m = birdcage_maps(c, (n, n))
    m = (m / np.sqrt((np.abs(m) ** 2).sum(0))).astype(np.complex64)
    obj = ph.pd * ((1 - ph.ff) + ph.ff * np.exp(2.5j))
    k = radial_trajectory(1000, 2 * n, n).reshape(-1, 2)
    data = nufft_forward((m * obj).astype(np.complex64), k)
    dcf = pipe_menon_dcf(k, (n, n))
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    for name, f in (
        ("lowres", lambda: lowres_maps(data, k, (n, n), dcf=dcf)),
        ("espirit (64² grid)", lambda: espirit_maps_noncartesian(data, k, (n, n), dcf)),
    ):
        t0 = time.perf_counter()
        est = f()
        t = time.perf_counter() - t0
        edge_fat = ph.ff > 0.5
        edge = ph.mask & ((edge_fat != np.roll(edge_fat, 1, 0)) | (edge_fat != np.roll(edge_fat, 1, 1)))
        coh = np.abs((est.conj() * m).sum(0))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(
            f"{name}: {t:.1f} s, 1 - coherence at water/fat edges {1 - coh[edge].mean():.1e}, "
            f"object {1 - coh[ph.mask].mean():.1e}, peak RSS {rss:.2f} GB (before the maps {r0:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
