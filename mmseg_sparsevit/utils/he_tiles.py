"""Synthetic H&E-like tiles: the one renderer behind the SegPath demo data (``datasets.synthetic``), the demo
classification tiles (``classification.demo``) and the sparsity figure (``visualization.sparsity``).

No real slides are reachable here, so tests and CPU demos draw their own: a pink eosin background (optionally
shaded), purple haematoxylin nuclei, pixel noise. Callers draw their targets (cell types, class textures, empty
glass) between :func:`stroma` / :func:`flat_background` and :func:`add_noise`. Every random draw comes from the
caller's ``numpy.random.Generator``, in a fixed order, so the same seed gives the same bytes.
"""
from typing import Tuple

import cv2
import numpy as np

Color = Tuple[int, int, int]
EOSIN: Color = (236, 172, 204)  # stroma / background
NUCLEUS: Color = (135, 85, 175)  # nuclei of cells that are no target
LUMEN: Color = (246, 228, 238)  # pale gland lumen, empty glass


def jitter(rng: np.random.Generator, color: Color, amount: int) -> Tuple[int, ...]:
    """``color`` with each channel moved by a uniform integer in [-amount, amount], clipped to 0..255."""
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def flat_background(height: int, width: int, rng: np.random.Generator, amount: int = 15) -> np.ndarray:
    """HWC uint8 RGB tile of one jittered eosin colour."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = jitter(rng, EOSIN, amount)
    return img


def stroma(size: int, rng: np.random.Generator, num_nuclei: int = 45, scale: float = 1.0) -> np.ndarray:
    """Square HWC uint8 RGB tile: eosin with smooth shading and ``num_nuclei`` elliptic nuclei, radius 3-5 px
    times ``scale`` (the field of view of a 256 px tile at ``scale = size / 256``)."""
    shading = cv2.resize(rng.normal(0, 10, (8, 8, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
    img = np.clip(np.array(EOSIN, np.float64) + shading, 0, 255).astype(np.uint8)
    for _ in range(num_nuclei):
        center = tuple(int(v) for v in rng.integers(0, size, 2))
        radius = max(2, int(rng.integers(3, 6) * scale))
        axes = (radius, max(1, int(radius * rng.uniform(0.55, 0.9))))
        cv2.ellipse(img, center, axes, int(rng.integers(0, 180)), 0, 360, jitter(rng, NUCLEUS, 18), -1)
    return img


def add_noise(img: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """``img`` plus Gaussian pixel noise, as uint8."""
    return np.clip(img + rng.normal(0, std, img.shape), 0, 255).astype(np.uint8)
