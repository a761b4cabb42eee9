"""A small synthetic whole-slide image with a known µm/px and a known ground-truth mask.

Tissue pieces (ellipses) on glass, filled with the project's synthetic H&E tiles
(:func:`mmseg_sparsevit.datasets.synthetic.render_tile`) at the scale of the requested µm/px: a rendered
tile always shows the field of view of a SegPath tile (984 px at ~0.22 µm/px), so the demo model sees
cells at the size it was trained on. Written as a pyramidal tiled TIFF that OpenSlide opens.
"""
import math
from typing import Sequence, Tuple

import cv2
import numpy as np

from ..datasets.synthetic import render_tile
from .writers import write_pyramidal_tiff

SEGPATH_SCAN_MPP = 0.22  # µm/px of the SegPath scans (40x)
SEGPATH_TILE_SIZE = 984  # px per SegPath tile side
GLASS = 244  # grey level of the empty slide


def render_demo_slide(size: Tuple[int, int] = (3072, 2048), mpp: float = 0.5, antigen: str = 'panCK',
                      seed: int = 0, glass: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(h, w, 3) uint8 RGB slide and its (h, w) uint8 {0, 1} mask of the antigen's cells, at ``mpp`` µm/px.

    Two tissue pieces cover about a third of the glass (all of it is tissue with ``glass=False``, as in a
    region of interest); everything depends only on the arguments."""
    width, height = size
    rng = np.random.default_rng((seed, width, height))
    tissue = np.full((height, width), 0 if glass else 1, np.uint8)
    for cx, cy, ax, ay in ((0.3, 0.45, 0.22, 0.32), (0.72, 0.55, 0.2, 0.28)):
        center = (int(cx * width), int(cy * height))
        axes = (int(ax * width * rng.uniform(0.9, 1.1)), int(ay * height * rng.uniform(0.9, 1.1)))
        cv2.ellipse(tissue, center, axes, float(rng.uniform(-30, 30)), 0, 360, 1, -1)
    side = max(16, round(SEGPATH_SCAN_MPP * SEGPATH_TILE_SIZE / mpp))  # px of one rendered field of view
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for y in range(0, height, side):
        for x in range(0, width, side):
            tile, tile_mask = render_tile(antigen, side, np.random.default_rng((seed, y // side, x // side)))
            h, w = min(side, height - y), min(side, width - x)
            image[y:y + h, x:x + w], mask[y:y + h, x:x + w] = tile[:h, :w], tile_mask[:h, :w]
    empty = np.clip(GLASS + rng.normal(0, 2, (height, width, 1)), 0, 255).astype(np.uint8)
    image = np.where(tissue[..., None] > 0, image, empty)
    return image, mask * tissue


def make_demo_slide(path: str, size: Tuple[int, int] = (3072, 2048), mpp: float = 0.5, antigen: str = 'panCK',
                    seed: int = 0, factors: Sequence[int] = (1, 4, 16), glass: bool = True
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Write :func:`render_demo_slide` as a pyramidal TIFF (levels at ``factors``, like an SVS file's 1/4/16)
    with resolution tags for ``mpp``; return the image and mask."""
    image, mask = render_demo_slide(size, mpp, antigen, seed, glass)
    factors = [f for f in factors if math.ceil(max(size) / f) >= 16]
    write_pyramidal_tiff(path, image, (mpp, mpp), factors=factors, smooth=True)
    return image, mask
