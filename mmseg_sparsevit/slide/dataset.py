"""The tiles of one slide as a torch ``Dataset``, so that DataLoader workers read them in parallel.

Each worker opens its own reader on first use (OpenSlide handles must not cross ``fork``), reads a tile at
the grid's µm/px from its level-0 top-left, and returns ``(index, tile)`` with the tile as an
(h, w, 3) uint8 RGB tensor. Segmentation and feature extraction share it.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .reader import SlideReader, open_slide
from .tiling import TileGrid


class TileDataset(Dataset):
    """Tiles ``indices`` (default all) of ``grid`` read from ``path``."""

    def __init__(self, path: str, grid: TileGrid, slide_mpp: Optional[float] = None,
                 indices: Optional[Sequence[int]] = None):
        self.path, self.grid, self.slide_mpp = path, grid, slide_mpp
        self.coords = grid.level0_coords()
        self.indices = np.arange(len(grid)) if indices is None else np.asarray(indices, np.int64)
        self._reader: Optional[SlideReader] = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Tuple[int, torch.Tensor]:
        if self._reader is None:
            self._reader = open_slide(self.path, self.slide_mpp)
        index = int(self.indices[item])
        x, y = self.coords[index]
        size = (self.grid.tile_size, self.grid.tile_size)
        return index, torch.from_numpy(self._reader.read_region(int(x), int(y), size, self.grid.mpp))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_reader'] = None  # each worker opens its own
        return state

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
