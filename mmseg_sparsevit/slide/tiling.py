"""A regular grid of tiles over the tissue of a slide, at the resolution the model works at.

Tile origins are multiples of the stride (tile size minus overlap) on the slide's canvas at the target
µm/px, so neighbouring tiles overlap by exactly ``overlap`` px and stitching can blend them; each tile
also has its top-left in level-0 px, the frame of OpenSlide's ``read_region``, QuPath and CLAM/TRIDENT
``coords``. Tiles may run past the slide's right and bottom edges: readers fill that part with white.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .tissue import TissueMask


def check_tile_size(tile_size: int, patch_size: int) -> None:
    """Raise unless ``tile_size`` is a positive multiple of the model's ViT ``patch_size``."""
    if tile_size <= 0 or tile_size % patch_size:
        lower = max(patch_size, tile_size // patch_size * patch_size)
        raise ValueError(f'tile size {tile_size} is not a multiple of the model\'s patch size {patch_size}: '
                         f'use {lower} or {lower + patch_size}')


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide at ``mpp`` µm/px: ``origins`` (N, 2) are (x, y) top-lefts on the target canvas,
    in row-major order."""

    slide_size: Tuple[int, int]  # level-0 (width, height)
    mpp: float  # target µm/px
    downsample: Tuple[float, float]  # level-0 px per target px, (x, y)
    tile_size: int  # px at the target µm/px
    overlap: int  # px at the target µm/px
    origins: np.ndarray  # (N, 2) int64, (x, y) at the target µm/px

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    @property
    def canvas_size(self) -> Tuple[int, int]:
        """The slide's (width, height) at the target µm/px."""
        return (math.ceil(self.slide_size[0] / self.downsample[0]),
                math.ceil(self.slide_size[1] / self.downsample[1]))

    def __len__(self) -> int:
        return len(self.origins)

    def level0_coords(self) -> np.ndarray:
        """(N, 2) int64 top-left (x, y) of each tile in level-0 px."""
        return np.round(self.origins * np.asarray(self.downsample)).astype(np.int64)

    @property
    def level0_tile_size(self) -> Tuple[float, float]:
        """A tile's (width, height) in level-0 px."""
        return self.tile_size * self.downsample[0], self.tile_size * self.downsample[1]


def plan_tiles(slide_size: Tuple[int, int], slide_mpp: Tuple[float, float], mpp: float, tile_size: int,
               overlap: int = 0, tissue: Optional[TissueMask] = None, min_tissue: float = 0.0) -> TileGrid:
    """The grid of ``tile_size`` px tiles at ``mpp`` µm/px that covers the slide, keeping those whose share of
    tissue in ``tissue`` exceeds ``min_tissue`` (any tissue at all by default; every tile without a mask)."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f'overlap must be in [0, tile size {tile_size}), got {overlap}')
    if not 0 <= min_tissue < 1:
        raise ValueError(f'min_tissue must be in [0, 1), got {min_tissue}')
    downsample = (mpp / slide_mpp[0], mpp / slide_mpp[1])
    grid = TileGrid(tuple(slide_size), mpp, downsample, tile_size, overlap, np.zeros((0, 2), np.int64))
    width, height = grid.canvas_size
    stride = grid.stride
    xs = np.arange(0, max(1, width - overlap), stride)
    ys = np.arange(0, max(1, height - overlap), stride)
    origins = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    if tissue is not None:
        origins = origins[tissue_fraction(origins, grid, tissue) > min_tissue]
    return TileGrid(grid.slide_size, mpp, downsample, tile_size, overlap, origins)


def tissue_fraction(origins: np.ndarray, grid: TileGrid, tissue: TissueMask) -> np.ndarray:
    """Share of tissue-mask pixels in each tile's footprint (the part on the slide), shape (N,)."""
    mask = tissue.mask.astype(np.int64)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    scale = np.asarray(grid.downsample) / np.asarray(tissue.downsample)  # mask px per target px
    start = np.floor(origins * scale).astype(np.int64)
    stop = np.ceil((origins + grid.tile_size) * scale).astype(np.int64)
    limit = np.array([mask.shape[1], mask.shape[0]])
    start, stop = np.clip(start, 0, limit), np.clip(stop, 0, limit)
    stop = np.maximum(stop, np.minimum(start + 1, limit))  # at least one mask pixel where possible
    (x0, y0), (x1, y1) = start.T, stop.T
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return inside / area
