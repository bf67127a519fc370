"""Random anatomical images and coil arrays for training and evaluating the reconstruction networks.

Each image is a randomised brain or thigh phantom (pose, tissue values, ventricles, texture) rendered with a
random spin-echo or spoiled gradient-echo contrast, with fat and water summed in phase and a smooth random
phase (B0, coil and RF phase that a real complex image carries). Held-out images come from phantom seeds the
training sampler can never draw, so an evaluation on them measures generalisation to unseen anatomy.
"""

from __future__ import annotations

import numpy as np

from pipelines.sim.coils import birdcage_maps
from pipelines.sim.phantoms import _pixel_grid, _smooth_noise, make_phantom

HELDOUT_START = 2**31  # training draws phantom seeds below this, held-out sets at and above it
ANATOMIES = ("brain", "thigh")


def training_seeds() -> range:
    return range(0, HELDOUT_START)


def heldout_seeds(n: int) -> list[int]:
    return [HELDOUT_START + i for i in range(n)]


def _contrast(rng: np.random.Generator, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Relative signal of one compartment for a random SE (T1w/T2w/PDw) or spoiled-GRE weighting."""
    t1 = np.maximum(t1, 1e-3)
    t2 = np.maximum(t2, 1e-3)
    if rng.random() < 0.5:  # spin echo
        tr = rng.uniform(400.0, 5000.0)
        te = rng.uniform(8.0, 120.0)
        return (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
    tr = rng.uniform(5.0, 30.0)
    te = rng.uniform(2.0, 10.0)
    a = np.deg2rad(rng.uniform(5.0, 40.0))
    e1 = np.exp(-tr / t1)
    return np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te / (0.7 * t2))  # T2* ~ 0.7 T2


def random_image(rng: np.random.Generator, matrix: int, seed: int | None = None) -> np.ndarray:
    """A complex64 [matrix, matrix] image with max |x| = 1; ``seed`` fixes the phantom (else drawn for training)."""
    phantom_seed = int(rng.integers(0, HELDOUT_START)) if seed is None else int(seed)
    anatomy = ANATOMIES[int(rng.integers(len(ANATOMIES)))]
    ph = make_phantom(
        anatomy, matrix, field_strength_T=float(rng.choice([1.5, 3.0])), seed=phantom_seed, randomize=True
    )
    water = _contrast(rng, ph.t1_water_ms, ph.t2_water_ms)
    fat = _contrast(rng, ph.t1_fat_ms, ph.t2_fat_ms)
    mag = ph.pd * ((1 - ph.ff) * water + ph.ff * fat)
    mag = np.where(ph.mask, mag, 0.0)
    phase = np.pi * rng.uniform(0.2, 1.0) * _smooth_noise(
        _pixel_grid((matrix, matrix)), rng, max_freq=1.0
    ) + rng.uniform(-np.pi, np.pi)
    img = mag * np.exp(1j * phase)
    peak = float(np.abs(img).max())
    return (img / peak if peak > 0 else img).astype(np.complex64)


def heldout_image(index: int, matrix: int) -> np.ndarray:
    """Held-out image ``index``: a phantom seed training never draws, a fixed contrast."""
    seed = heldout_seeds(index + 1)[index]
    return random_image(np.random.default_rng(seed), matrix, seed=seed)


def random_coil_maps(rng: np.random.Generator, matrix: int, n_coils: int) -> np.ndarray:
    """Complex64 [C, matrix, matrix] birdcage sensitivities, jittered ring, RSS-normalised over the FOV."""
    maps = birdcage_maps(
        n_coils, (matrix, matrix), radius=float(rng.uniform(1.2, 2.0)), seed=int(rng.integers(0, 2**31))
    )
    rss = np.sqrt((np.abs(maps) ** 2).sum(axis=0, keepdims=True))
    return (maps / np.maximum(rss, 1e-12)).astype(np.complex64)
