"""Geometry of the windowed sparse attention pattern, shared by the reference and every backend.

The attention pattern is separable: a patch query at grid cell (r, c) may see a patch key at (r', c')
iff r' lies in the query's row interval and c' in its column interval.  Keeping that single 1-D rule
here means the reference and the fast paths cannot drift apart on border handling.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

Neighbourhood = Literal['block', 'sliding']


def window_bounds(pos: Tensor, length: int, window_size: int,
                  neighbourhood: Neighbourhood) -> tuple[Tensor, Tensor]:
    """Half-open key interval ``[lo, hi)`` along one grid axis for query coordinates ``pos``.

    'block': the axis is cut into ``window_size`` blocks; a query sees its own block and both adjacent
    ones (BigBird / Longformer style blocked local attention).
    'sliding': ``window_size`` keys centred on the query (``window_size // 2`` before it), shifted inward
    at the borders so it always spans ``min(window_size, length)`` keys (NATTEN's clamping).
    """
    if neighbourhood == 'block':
        block = torch.div(pos, window_size, rounding_mode='floor')
        lo = ((block - 1) * window_size).clamp(min=0)
        hi = ((block + 2) * window_size).clamp(max=length)
    else:
        lo = (pos - window_size // 2).clamp(min=0, max=max(length - window_size, 0))
        hi = (lo + window_size).clamp(max=length)
    return lo, hi


def tile_query_bounds(length: int, tile: int, num_tiles: int, window_size: int,
                      neighbourhood: Neighbourhood, device: torch.device) -> tuple[Tensor, Tensor]:
    """``window_bounds`` of every query of every tile along one axis, each (tiles, tile).

    Padding queries past the border borrow the last row/column, so they see a non-empty interval.
    """
    q_pos = (torch.arange(num_tiles, device=device)[:, None] * tile
             + torch.arange(tile, device=device)).clamp(max=length - 1)
    return window_bounds(q_pos, length, window_size, neighbourhood)


def positions_of_tokens(grid_hw: tuple[int, int], patch_index: Optional[Tensor],
                        device: torch.device) -> Tensor:
    """Original row-major grid position of every patch token, (B or 1, M)."""
    if patch_index is None:
        return torch.arange(grid_hw[0] * grid_hw[1], device=device)[None]
    return patch_index


@dataclass
class TileLayout:
    """Tile-major slot layout of the patch grid, used by the gather and flex backends.

    The (H, W) grid is cut into ``tile_hw`` tiles (``window_size`` squares, shrunk to the grid when the
    window is larger).  Every tile owns ``tile_hw[0] * tile_hw[1]`` consecutive *slots*; slots outside the
    grid or at pruned positions hold no token.  Tensors with a leading ``B'`` have B' = 1 without pruning
    and B' = batch size with ``patch_index``.
    """
    grid_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    tiles_hw: tuple[int, int]
    slot_rc: tuple[Tensor, Tensor]  # (P,) grid row / column of each slot, may lie outside the grid
    slot_token: Tensor  # (B', P) index into the G + M token axis; 0 where the slot is empty
    slot_valid: Tensor  # (B', P) slot holds a present patch token
    token_slot: Tensor  # (B', M) slot of each patch token
    pos_token: Tensor  # (B', H * W) token index at each grid position, -1 where pruned

    @property
    def tile_size(self) -> int:
        return self.tile_hw[0] * self.tile_hw[1]

    @property
    def num_tiles(self) -> int:
        return self.tiles_hw[0] * self.tiles_hw[1]


def tile_layout(grid_hw: tuple[int, int], num_global: int, window_size: int,
                patch_index: Optional[Tensor], device: torch.device) -> TileLayout:
    """Build the tile-major slot layout; O(H * W) integers, no attention-sized tensors."""
    height, width = grid_hw
    tile_hw = (min(window_size, height), min(window_size, width))
    tiles_hw = (-(-height // tile_hw[0]), -(-width // tile_hw[1]))
    th, tw = tile_hw
    nth, ntw = tiles_hw
    rows = torch.arange(nth * th, device=device).view(nth, 1, th, 1)
    cols = torch.arange(ntw * tw, device=device).view(1, ntw, 1, tw)
    slot_r = rows.expand(nth, ntw, th, tw).reshape(-1)
    slot_c = cols.expand(nth, ntw, th, tw).reshape(-1)
    in_grid = (slot_r < height) & (slot_c < width)
    slot_pos = torch.where(in_grid, slot_r * width + slot_c, 0)

    positions = positions_of_tokens(grid_hw, patch_index, device)
    num_tokens = positions.shape[1]
    token_ids = torch.arange(num_global, num_global + num_tokens, device=device)
    pos_token = torch.full((positions.shape[0], height * width), -1, dtype=torch.long, device=device)
    pos_token.scatter_(1, positions, token_ids.expand_as(positions))
    slot_token = torch.where(in_grid, pos_token[:, slot_pos], -1)

    grid_r = torch.div(positions, width, rounding_mode='floor')
    grid_c = positions % width
    pos_slot = ((grid_r // th * ntw + grid_c // tw) * th + grid_r % th) * tw + grid_c % tw
    return TileLayout(grid_hw=grid_hw, tile_hw=tile_hw, tiles_hw=tiles_hw, slot_rc=(slot_r, slot_c),
                      slot_token=slot_token.clamp(min=0), slot_valid=slot_token >= 0,
                      token_slot=pos_slot, pos_token=pos_token)
