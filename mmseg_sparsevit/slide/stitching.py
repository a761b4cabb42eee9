"""Blend overlapping tile predictions into one seamless map, block by block.

Each tile's scores are weighted by a separable window that is 1 in its centre and falls towards its edges
over the overlap, never to 0 (so every covered pixel is defined, even on the slide's border where one tile
covers it); the map is the weighted mean. Tiles sit on a grid with step ``stride``, so the canvas is cut
into ``stride`` x ``stride`` blocks: a block is finished once every tile that covers it has been added,
is handed to a sink, and its float sums are freed. Memory follows a couple of tile rows, not the slide.
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, Literal, Tuple

import numpy as np

from .tiling import TileGrid

Cell = Tuple[int, int]  # (row, column) of a stride x stride block


def window_profile(tile_size: int, overlap: int, kind: Literal['cosine', 'linear'] = 'cosine') -> np.ndarray:
    """1-D weights (tile_size,): rising over ``overlap`` px from each edge to 1, strictly positive."""
    if kind not in ('cosine', 'linear'):
        raise ValueError(f"window kind must be 'cosine' or 'linear', got {kind!r}")
    i = np.arange(tile_size, dtype=np.float64)
    t = np.minimum(np.minimum(i + 1, tile_size - i) / (overlap + 1), 1.0)  # in (0, 1]
    w = 0.5 - 0.5 * np.cos(np.pi * t) if kind == 'cosine' else t
    return w.astype(np.float32)


def blend_window(tile_size: int, overlap: int, kind: Literal['cosine', 'linear'] = 'cosine') -> np.ndarray:
    """Separable 2-D weight window (tile_size, tile_size), strictly positive."""
    w = window_profile(tile_size, overlap, kind)
    return np.outer(w, w)


@dataclass
class Block:
    """A finished part of the blended map: rows y..y+h, columns x..x+w of the target canvas."""

    y: int
    x: int
    scores: np.ndarray  # (C, h, w) float32 weighted mean; 0 where not covered
    covered: np.ndarray  # (h, w) bool: some tile covered the pixel


class Stitcher:
    """Accumulates tile scores on a :class:`TileGrid` and emits each block once it is finished."""

    def __init__(self, grid: TileGrid, num_channels: int, sink: Callable[[Block], None],
                 window: Literal['cosine', 'linear'] = 'cosine'):
        self.grid, self.num_channels, self.sink = grid, num_channels, sink
        self.window = blend_window(grid.tile_size, grid.overlap, window)
        width, height = grid.canvas_size
        self._cells_shape = (math.ceil(height / grid.stride), math.ceil(width / grid.stride))
        self._pending: Dict[Cell, int] = {}  # tiles still to come per block
        for index in range(len(grid)):
            for cell in self._cells_of(index):
                self._pending[cell] = self._pending.get(cell, 0) + 1
        self._sums: Dict[Cell, Tuple[np.ndarray, np.ndarray]] = {}  # (C, h, w) scores * weight, (h, w) weight
        self.added = np.zeros(len(grid), bool)

    def _cells_of(self, index: int):
        x, y = (int(v) for v in self.grid.origins[index])
        s, t = self.grid.stride, self.grid.tile_size
        rows, cols = self._cells_shape
        for r in range(y // s, min(rows, (y + t - 1) // s + 1)):
            for c in range(x // s, min(cols, (x + t - 1) // s + 1)):
                yield r, c

    def _cell_box(self, cell: Cell) -> Tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of a block on the canvas."""
        width, height = self.grid.canvas_size
        s = self.grid.stride
        return cell[0] * s, cell[1] * s, min((cell[0] + 1) * s, height), min((cell[1] + 1) * s, width)

    def add(self, index: int, scores: np.ndarray) -> None:
        """Add tile ``index``'s (C, tile, tile) scores; emits the blocks this tile finishes."""
        t = self.grid.tile_size
        if scores.shape != (self.num_channels, t, t):
            raise ValueError(f'tile {index}: expected scores of shape {(self.num_channels, t, t)}, '
                             f'got {tuple(scores.shape)}')
        if self.added[index]:
            raise ValueError(f'tile {index} was already added')
        self.added[index] = True
        x, y = (int(v) for v in self.grid.origins[index])
        for cell in self._cells_of(index):
            y0, x0, y1, x1 = self._cell_box(cell)
            if cell not in self._sums:
                self._sums[cell] = (np.zeros((self.num_channels, y1 - y0, x1 - x0), np.float32),
                                    np.zeros((y1 - y0, x1 - x0), np.float32))
            total, weight = self._sums[cell]
            ty0, tx0, ty1, tx1 = max(y0, y), max(x0, x), min(y1, y + t), min(x1, x + t)  # tile part in the block
            w = self.window[ty0 - y:ty1 - y, tx0 - x:tx1 - x]
            total[:, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] += scores[:, ty0 - y:ty1 - y, tx0 - x:tx1 - x] * w
            weight[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] += w
            self._pending[cell] -= 1
            if self._pending[cell] == 0:
                self._emit(cell)

    def _emit(self, cell: Cell) -> None:
        total, weight = self._sums.pop(cell)
        covered = weight > 0
        scores = np.divide(total, weight, out=np.zeros_like(total), where=covered)
        y0, x0, _, _ = self._cell_box(cell)
        self.sink(Block(y0, x0, scores, covered))

    @property
    def finished(self) -> bool:
        return bool(self.added.all())

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Arrays that restore this stitcher (the blocks in progress and which tiles were added)."""
        state = {'added': self.added.copy()}
        for (r, c), (total, weight) in self._sums.items():
            state[f'sum_{r}_{c}'], state[f'weight_{r}_{c}'] = total, weight
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Continue from :meth:`state_dict` of a stitcher on the same grid (blocks already emitted stay done)."""
        added = np.asarray(state['added'], bool)
        if added.shape != self.added.shape:
            raise ValueError(f'saved stitcher state has {added.size} tiles, this grid {self.added.size}')
        self.added = added.copy()
        for index in np.flatnonzero(added):
            for cell in self._cells_of(int(index)):
                self._pending[cell] -= 1
        self._sums = {}
        for key in state:
            if key.startswith('sum_'):
                r, c = (int(v) for v in key[4:].split('_'))
                self._sums[(r, c)] = (np.array(state[key], np.float32), np.array(state[f'weight_{r}_{c}'], np.float32))
