"""The tiles of one slide as a torch ``Dataset``, so that DataLoader workers read them in parallel.

Each worker opens its own reader on first use (OpenSlide handles must not cross ``fork``), reads a tile at
the grid's µm/px from its level-0 top-left, and returns ``(index, tile)`` with the tile as an
(h, w, 3) uint8 RGB tensor. Segmentation and feature extraction share it.
"""
from typing import Callable, Iterator, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .parallel import Ranks, deal, gathered_batches
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


class TileRunSettings(Protocol):
    """The settings :func:`run_tiles` reads (both slide pipelines' settings have them)."""

    slide_mpp: Optional[float]
    batch_size: int
    num_workers: int
    checkpoint_every: int
    progress: bool


def run_tiles(compute: Callable[[torch.Tensor], np.ndarray], path: str, grid: TileGrid, todo: Sequence[int],
              settings: TileRunSettings, ranks: Ranks, desc: str) -> Iterator[Tuple[bool, np.ndarray, np.ndarray]]:
    """Read the ``todo`` tiles in DataLoader workers and run ``compute`` on them, shared over ``ranks``.

    Yields, on rank 0 only and in tile order, ``(save_now, tile indices, outputs)`` per round; ``save_now`` is
    True every ``checkpoint_every`` tiles, when the caller should save its partial state. A progress bar counts
    the slide's tiles (those finished earlier included) with tiles/s and ETA."""
    dataset = TileDataset(path, grid, settings.slide_mpp, deal(todo, ranks))
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.num_workers, shuffle=False)
    save_every = max(1, -(-settings.checkpoint_every // (settings.batch_size * ranks.world_size)))  # in rounds
    try:
        with tqdm(total=len(grid), initial=len(grid) - len(todo), unit='tile', desc=desc, dynamic_ncols=True,
                  disable=not (settings.progress and ranks.is_main)) as bar:
            # one batch per rank per round, gathered on rank 0 in tile order (a single process: each batch as is)
            rounds = gathered_batches(compute, loader, len(todo), settings.batch_size, ranks)
            for number, gathered in enumerate(rounds, 1):
                if gathered is not None:
                    yield number % save_every == 0, gathered[0], gathered[1]
                    bar.update(len(gathered[0]))
    finally:
        dataset.close()
