"""Gathered-tile backend: pure PyTorch, any device, differentiable.

Patch tokens are grouped tile-major; every tile gathers only the key region its queries can see (the
3 x 3 neighbour tiles for 'block', a (2w - 1)^2 patch for 'sliding') plus the global keys.  The attention
over those regions runs in ``gather_autograd.py``, chunk of tiles by chunk of tiles, and its backward
recomputes the gathers, so what a training step keeps is O(N * d) and the temporaries are O(chunk); no
N x N score matrix or mask is ever built.  Global rows are O(G * N) (``global_rows.py``, run by the same
function).  With pruning the tiles are compacted: only tiles holding a kept query take part, each with
only its kept queries and the kept keys they can see, padded to the fullest tile, so memory follows the
kept tokens instead of the grid.
"""
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from ..neighbourhood import Neighbourhood, TileLayout, tile_layout, tile_query_bounds
from .base import AttentionBackend
from .gather_autograd import TileProblem, tile_attention


class _Tiles(NamedTuple):
    """One attention problem per (sample, tile) pair; A pairs, Q query and K key slots each."""
    sample: Tensor  # (A,) sample of each pair
    query_token: Tensor  # (A, Q) token index of each query slot (0 where empty)
    query_valid: Tensor  # (A, Q) the slot holds a present patch token
    key_token: Tensor  # (A, K) token index of each patch key slot (0 where empty)
    mask: Tensor  # (A, 1 or Q, K) query may see key; 1 row when all of a tile's queries share their keys


def _axis_regions(length: int, tile: int, num_tiles: int, window_size: int,
                  neighbourhood: Neighbourhood, device: torch.device) -> tuple[Tensor, Tensor]:
    """Key coordinates each tile gathers along one axis, (tiles, span), and which of them each of the
    tile's queries may see, (tiles, tile, span)."""
    lo, hi = tile_query_bounds(length, tile, num_tiles, window_size, neighbourhood, device)
    start = lo.amin(dim=1)
    span = int((hi.amax(dim=1) - start).max())
    key_pos = start[:, None] + torch.arange(span, device=device)
    visible = (lo[:, :, None] <= key_pos[:, None, :]) & (key_pos[:, None, :] < hi[:, :, None])
    return key_pos.clamp(max=length - 1), visible


def _tiles(layout: TileLayout, batch: int, window_size: int, neighbourhood: Neighbourhood) -> _Tiles:
    """Every tile with the patch keys its region holds; pairs with every sample of the batch when
    unpruned (B' = 1), else per sample."""
    (height, width), (th, tw), (nth, ntw) = layout.grid_hw, layout.tile_hw, layout.tiles_hw
    device = layout.pos_token.device
    key_r, vis_r = _axis_regions(height, th, nth, window_size, neighbourhood, device)
    key_c, vis_c = _axis_regions(width, tw, ntw, window_size, neighbourhood, device)
    if neighbourhood == 'block':  # a tile is one block: its queries share one interval per axis
        vis_r, vis_c = vis_r[:, :1], vis_c[:, :1]
    visible = vis_r[:, None, :, None, :, None] & vis_c[None, :, None, :, None, :]
    visible = visible.reshape(layout.num_tiles, vis_r.shape[1] * vis_c.shape[1], -1)
    key_pos = (key_r[:, None, :, None] * width + key_c[None, :, None, :]).reshape(layout.num_tiles, -1)
    key_token = layout.pos_token[:, key_pos]
    mask = visible & (key_token >= 0)[:, :, None, :]

    pairs = (batch, layout.num_tiles)
    return _Tiles(
        sample=torch.arange(batch, device=device).repeat_interleave(layout.num_tiles),
        query_token=layout.slot_token.view(-1, *pairs[1:], layout.tile_size).expand(*pairs, -1).flatten(0, 1),
        query_valid=layout.slot_valid.view(-1, *pairs[1:], layout.tile_size).expand(*pairs, -1).flatten(0, 1),
        key_token=key_token.clamp(min=0).expand(*pairs, -1).flatten(0, 1),
        mask=mask.expand(*pairs, *mask.shape[2:]).flatten(0, 1))


def _first(keep: Tensor, length: int) -> Tensor:
    """Indices that put the True entries of ``keep`` (A, L) first, in order, cut to ``length``."""
    return torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :length]


def _compact(tiles: _Tiles, seen: Tensor) -> _Tiles:
    """Inside each tile keep only its present queries and the keys ``seen`` (A, K) by them, padded to
    the fullest tile (host sync for the sizes)."""
    num_q, num_k = int(tiles.query_valid.sum(-1).max()), int(seen.sum(-1).max())
    q_order, k_order = _first(tiles.query_valid, num_q), _first(seen, num_k)
    mask = tiles.mask.gather(2, k_order[:, None, :].expand(-1, tiles.mask.shape[1], -1))
    if mask.shape[1] > 1:
        mask = mask.gather(1, q_order[:, :, None].expand(-1, -1, num_k))
    return _Tiles(sample=tiles.sample, query_token=tiles.query_token.gather(1, q_order),
                  query_valid=tiles.query_valid.gather(1, q_order),
                  key_token=tiles.key_token.gather(1, k_order), mask=mask)


def _pruned_buckets(tiles: _Tiles, num_buckets: int = 4) -> list[_Tiles]:
    """Compacted groups of the tiles that hold a kept query, so shapes follow the kept tokens.

    Tiles are grouped by how many kept keys their kept queries see (bucket j: between 1/2^(j+1) and
    1/2^j of the most), so a few dense tiles do not pad every sparse tile to their size; within a bucket
    padding is under 2x, except in the last one.
    """
    seen = tiles.mask.any(dim=1) if tiles.mask.shape[1] == 1 else (
        tiles.mask & tiles.query_valid[:, :, None]).any(dim=1)
    counts = seen.sum(-1)
    active = tiles.query_valid.any(dim=-1)  # a present query always sees itself: counts >= 1
    level = torch.log2(counts.max() / counts.clamp(min=1)).floor().clamp(max=num_buckets - 1)
    buckets = []
    for j in level[active].unique().tolist():
        pick = active & (level == j)
        buckets.append(_compact(_Tiles(*(t[pick] for t in tiles)), seen[pick]))
    return buckets


def _problems(groups: list[_Tiles], num_tokens: int, num_global: int, per_sample: bool,
              batch: int) -> Iterator[TileProblem]:
    """The kernel's tile problems: the global keys appended to every tile, empty query slots writing to
    the spare output row N; pruned groups are split by sample (each sample gathers from its own rows)."""
    for group in groups:
        num_pairs = group.query_token.shape[0]
        mask = torch.cat([group.mask, group.mask.new_ones(*group.mask.shape[:2], num_global)], dim=-1)
        if num_global == 0:  # rows with no visible key only belong to empty slots; keep them finite
            mask |= ~mask.any(dim=-1, keepdim=True)
        global_ids = torch.arange(num_global, device=mask.device).expand(num_pairs, num_global)
        tables = (group.query_token, torch.where(group.query_valid, group.query_token, num_tokens),
                  torch.cat([group.key_token, global_ids], dim=-1), ~mask)
        # tiles that see every key they gather (e.g. inside the grid for 'block') skip the masking
        sees_all = mask.flatten(1).all(dim=1)
        for sample in range(batch) if per_sample else (None, ):
            for masked in (False, True):
                pick = sees_all != masked if sample is None else (sees_all != masked) & (group.sample == sample)
                if bool(pick.any()):
                    picked = tuple(t[pick] for t in tables)
                    yield TileProblem(sample, *picked[:3], picked[3] if masked else None)


def tile_problems(batch: int, num_tokens: int, grid_hw: tuple[int, int], num_global: int, window_size: int,
                  neighbourhood: Neighbourhood, patch_index: Optional[Tensor],
                  device: torch.device) -> list[TileProblem]:
    """The tile problems of a call: without pruning one set of tiles serves every sample; with it, each
    sample's compacted buckets."""
    layout = tile_layout(grid_hw, num_global, window_size, patch_index, device)
    if patch_index is None:
        groups = [_tiles(layout, 1, window_size, neighbourhood)]
    else:
        groups = _pruned_buckets(_tiles(layout, batch, window_size, neighbourhood))
    return list(_problems(groups, num_tokens, num_global, patch_index is not None, batch))


def gather_attention(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
                     window_size: int, neighbourhood: Neighbourhood, patch_index: Optional[Tensor],
                     scale: float) -> Tensor:
    """Sparse attention on validated arguments, (B, heads, G + M, dv)."""
    problems = tile_problems(q.shape[0], q.shape[2], grid_hw, num_global, window_size, neighbourhood, patch_index,
                             q.device)
    return tile_attention(q, k, v, problems, scale, num_global)


def _run(*args, automatic: bool) -> Tensor:
    """The table's entry point: gather takes every call, requested or automatic alike."""
    return gather_attention(*args)


def _why_not(q: Tensor, k: Tensor, v: Tensor, automatic: bool, num_slots: Optional[int] = None) -> None:
    """Gather runs wherever PyTorch does, with gradients."""
    return None


BACKEND = AttentionBackend(run=_run, why_not=_why_not)
