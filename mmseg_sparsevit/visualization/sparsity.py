"""The two sparsity figures of ``tools/visualize_sparsity.py``, drawn from the arrays they show.

1. Attention pattern: the (G + N) x (G + N) boolean matrix of which query may attend to which key (the op's
   reference ``neighbourhood_mask``), next to the grid cells one query sees (:func:`query_keys_image`).
2. Pruned tokens: a tile and the same tile with the patches token pruning removes dimmed
   (:func:`pruned_tokens_image`), the kept positions coming from ``SparseViT.forward_tokens``.

The panels are RGB arrays built here and shown unscaled (``interpolation='nearest'``), so what a figure shows is
exactly what these functions return. matplotlib is imported only when a figure is drawn.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from mmseg_sparsevit.classification.dataset import to_tensor
from mmseg_sparsevit.models.sparse_vit import SparseViT
from mmseg_sparsevit.ops import neighbourhood_mask
from mmseg_sparsevit.utils.he_tiles import LUMEN, add_noise, stroma

GridHW = Tuple[int, int]
SEEN = (49, 130, 189)  # a key the query may attend to
UNSEEN = (255, 255, 255)
QUERY = (214, 39, 40)  # the query cell itself (it always sees itself)
DIM = 0.25  # pruned patches keep a quarter of their brightness (+ 20), so the tissue stays recognisable


def default_query(grid: GridHW) -> Tuple[int, int]:
    """The grid cell drawn when none is given: a quarter into the grid, away from the clamped borders."""
    return grid[0] // 4, grid[1] // 4


def query_keys_image(grid: GridHW, num_global: int, window_size: int, neighbourhood: str,
                     query: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8: ``SEEN`` where the patch at ``query`` may attend (reference mask), ``QUERY`` on itself,
    ``UNSEEN`` elsewhere. Global tokens are seen by every query and are not drawn on the grid."""
    height, width = grid
    row, col = query
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f'query {tuple(query)} is outside the {height}x{width} grid')
    mask = neighbourhood_mask(grid, num_global, window_size, neighbourhood)[0]
    seen = mask[num_global + row * width + col, num_global:].reshape(height, width).numpy()
    image = np.where(seen[..., None], np.array(SEEN, np.uint8), np.array(UNSEEN, np.uint8))
    image[row, col] = QUERY
    return image


def attention_pattern_figure(grid: GridHW, num_global: int, window_size: int, neighbourhood: str = 'block',
                             query: Optional[Tuple[int, int]] = None):
    """matplotlib figure: the full allowed-attention matrix and the keys of one query on the grid."""
    import matplotlib.pyplot as plt

    height, width = grid
    row, col = query or default_query(grid)
    mask = neighbourhood_mask(grid, num_global, window_size, neighbourhood)[0].numpy()
    fig, (ax_m, ax_q) = plt.subplots(1, 2, figsize=(11, 5.4), gridspec_kw=dict(width_ratios=[1.25, 1]),
                                     layout='constrained')
    ax_m.imshow(np.where(mask[..., None], np.array(SEEN, np.uint8), np.array(UNSEEN, np.uint8)),
                interpolation='nearest')
    ax_m.axhline(num_global - 0.5, color='tab:red', lw=0.8)
    ax_m.axvline(num_global - 0.5, color='tab:red', lw=0.8)
    ax_m.set(title=f'allowed attention, {height}x{width} grid, window {window_size} ({neighbourhood}), '
                   f'G={num_global}\n{mask.mean():.1%} of {mask.size} query-key pairs',
             xlabel='key token (globals first, then patches row-major)', ylabel='query token')
    ax_q.imshow(query_keys_image(grid, num_global, window_size, neighbourhood, (row, col)), interpolation='nearest')
    ax_q.set_xticks(np.arange(-0.5, width, window_size))
    ax_q.set_yticks(np.arange(-0.5, height, window_size))
    ax_q.grid(True, color='grey', lw=0.6)
    ax_q.set(title=f'keys of patch ({row}, {col}) (red) + all {num_global} global tokens', xticklabels=[],
             yticklabels=[])
    return fig


def synthetic_tile(size: int, seed: int = 0) -> np.ndarray:
    """H&E-like RGB tile (``utils.he_tiles``) whose lower-right corner is empty glass, the kind of background
    pruning should drop first."""
    rng = np.random.default_rng(seed)
    tile = stroma(size, rng, scale=size / 256)
    yy, xx = np.mgrid[:size, :size]
    tile[xx + 0.4 * yy > 1.05 * size] = LUMEN
    return add_noise(tile, rng, 4)


@torch.no_grad()
def kept_patch_tokens(model: SparseViT, tile: np.ndarray) -> Tuple[np.ndarray, GridHW]:
    """Row-major grid positions of the patch tokens ``model`` keeps on an HWC uint8 RGB tile (all of them without
    token pruning), normalised as the classification data pipeline does, and the patch grid."""
    features = model.eval().forward_tokens(to_tensor(tile)[None])
    height, width = features.grid_hw
    kept = features.kept_index
    return (np.arange(height * width) if kept is None else kept[0].cpu().numpy()), (height, width)


def pruned_tokens_image(tile: np.ndarray, kept: Sequence[int], grid: GridHW, patch_size: int) -> np.ndarray:
    """``tile`` with the patches not in ``kept`` dimmed to ``DIM`` of their brightness (+ 20)."""
    height, width = grid
    if tile.shape[:2] != (height * patch_size, width * patch_size):
        raise ValueError(f'tile of shape {tile.shape} does not match grid {grid} x patch {patch_size}')
    keep = np.zeros(height * width, dtype=bool)
    keep[np.asarray(kept)] = True
    dim = np.kron(~keep.reshape(height, width), np.ones((patch_size, patch_size), dtype=bool))
    shown = tile.astype(np.float32)
    shown[dim] = shown[dim] * DIM + 20
    return shown.clip(0, 255).astype(np.uint8)


def pruned_tokens_figure(tile: np.ndarray, kept: Sequence[int], grid: GridHW, patch_size: int, title: str,
                         tile_title: str = 'input tile'):
    """matplotlib figure: the tile and :func:`pruned_tokens_image` of it, with the patch grid drawn."""
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(10, 5.6), layout='constrained')
    ax_t.imshow(tile, interpolation='nearest')
    ax_t.set(title=tile_title, xticks=[], yticks=[])
    ax_p.imshow(pruned_tokens_image(tile, kept, grid, patch_size), interpolation='nearest')
    ax_p.set_xticks(np.arange(0, grid[1] * patch_size + 1, patch_size) - 0.5)
    ax_p.set_yticks(np.arange(0, grid[0] * patch_size + 1, patch_size) - 0.5)
    ax_p.grid(True, color='white', lw=0.3, alpha=0.5)
    ax_p.set(xticklabels=[], yticklabels=[], title=f'kept {len(kept)} of {grid[0] * grid[1]} tokens\n{title}')
    return fig
