"""Inputs and probes shared by the op tests (imported by the test modules of this folder)."""
import random

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from mmseg_sparsevit.ops.backends import flex

needs_flex = pytest.mark.skipif(flex.flex_attention is None, reason='torch has no flex_attention')


def inputs(seed, batch, num_global, grid, keep=1.0, heads=2, dim=8, dtype=torch.float32, requires_grad=False):
    """Seeded q, k, v (B, heads, G + M, dim) and, for keep < 1, a sorted random ``patch_index`` per row."""
    gen = torch.Generator().manual_seed(seed)
    cells = grid[0] * grid[1]
    patch_index = None
    num_patches = cells
    if keep < 1.0:
        num_patches = max(1, int(cells * keep))
        patch_index = torch.stack(
            [torch.randperm(cells, generator=gen)[:num_patches].sort().values for _ in range(batch)])
    q, k, v = (torch.randn(batch, heads, num_global + num_patches, dim, generator=gen, dtype=dtype)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, patch_index


# (grid, num_global, window, batch, keep fraction): odd grids, partial blocks, window >= grid,
# G = 0 / 1 / 9, batch > 1, pruned subsets.
HAND_PICKED = [
    ((5, 7), 1, 3, 1, 1.0),
    ((9, 4), 9, 4, 2, 1.0),
    ((13, 1), 0, 3, 1, 1.0),
    ((6, 6), 9, 8, 2, 1.0),
    ((8, 8), 9, 2, 2, 0.5),
    ((7, 9), 0, 3, 3, 0.3),
    ((11, 6), 1, 5, 2, 0.7),
    ((3, 3), 1, 1, 1, 0.12),
]
_rng = random.Random(0)
RANDOM_SWEEP = [((_rng.randint(1, 14), _rng.randint(1, 14)), _rng.choice([0, 1, 9]), _rng.randint(1, 9),
                 _rng.randint(1, 3), _rng.choice([1.0, 0.4, 0.8])) for _ in range(10)]
CASES = HAND_PICKED + RANDOM_SWEEP


def flex_eager(*args):
    """The flex backend run uncompiled (unfused, small shapes only): checks the block mask without compiling."""
    return flex.flex_attention_backend(*args, compiled=False)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (elements, views included) and the largest storage
    (bytes actually allocated; expanded views share their base's storage)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out, ):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.untyped_storage().nbytes())
        return out


def kept_positions(pattern: str, grid: tuple[int, int]) -> Tensor:
    """About 40 % of the grid: scattered at random, one band of rows, or a dense corner + sparse rest."""
    height, width = grid
    cells = torch.arange(height * width)
    if pattern == 'random':
        return torch.randperm(height * width, generator=torch.Generator().manual_seed(0))[:410].sort().values
    if pattern == 'band':
        return cells[:410]
    dense_corner = (cells // width < 12) & (cells % width < 12)
    return cells[dense_corner | (cells % 3 == 0)]
