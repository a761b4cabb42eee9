"""Gathered-tile backend: pure PyTorch, any device, differentiable.

Patch tokens are grouped tile-major; every tile gathers only the key region its queries can see (the
3 x 3 neighbour tiles for 'block', a (2w - 1)^2 patch for 'sliding') plus the global keys, and runs one
batched ``F.scaled_dot_product_attention``.  Memory is O(N * w^2) for patch rows and O(G * N) for
global rows; no N x N score matrix or mask is ever built.  With pruning the tiles are compacted: only
tiles holding a kept query take part, each with only its kept queries and the kept keys they can see,
padded to the fullest tile, so memory follows the kept tokens instead of the grid.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..neighbourhood import Neighbourhood, TileLayout, tile_layout, tile_query_bounds
from .base import AttentionBackend
from .global_rows import global_rows


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


def _attend(q_rows: Tensor, k_rows: Tensor, v_rows: Tensor, tiles: _Tiles, num_tokens: int,
            num_global: int, heads: int, scale: float) -> Tensor:
    """Attention of every tile's query slots, (A * Q, heads * dv), from (B * N, heads * d) token rows."""
    num_pairs, num_q = tiles.query_token.shape
    mask = torch.cat([tiles.mask, tiles.mask.new_ones(*tiles.mask.shape[:2], num_global)], dim=-1)
    if num_global == 0:  # rows with no visible key only belong to padding queries; keep them finite
        mask |= ~mask.any(dim=-1, keepdim=True)
    global_ids = torch.arange(num_global, device=q_rows.device).expand(num_pairs, num_global)
    token_base = tiles.sample[:, None] * num_tokens
    key_rows = (torch.cat([tiles.key_token, global_ids], dim=-1) + token_base).reshape(-1)
    q_t = q_rows.index_select(0, (tiles.query_token + token_base).reshape(-1)).view(num_pairs, num_q, heads, -1)
    k_t = k_rows.index_select(0, key_rows).view(num_pairs, mask.shape[-1], heads, -1)
    v_t = v_rows.index_select(0, key_rows).view(num_pairs, mask.shape[-1], heads, -1)
    out = F.scaled_dot_product_attention(q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2).reshape(num_pairs * num_q, -1)


def _token_rows(x: Tensor) -> Tensor:
    """(B, h, N, d) -> (B * N, h * d) so one ``index_select`` gathers all heads of a token at once."""
    batch, heads, num_tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch * num_tokens, heads * dim)


def gather_attention(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
                     window_size: int, neighbourhood: Neighbourhood, patch_index: Optional[Tensor],
                     scale: float) -> Tensor:
    """Sparse attention on validated arguments, (B, heads, G + M, dv)."""
    batch, heads, num_tokens, _ = q.shape
    num_patches = num_tokens - num_global
    layout = tile_layout(grid_hw, num_global, window_size, patch_index, q.device)
    tiles = _tiles(layout, batch, window_size, neighbourhood)
    groups = [tiles] if patch_index is None else _pruned_buckets(tiles)
    rows = tuple(_token_rows(x) for x in (q, k, v))

    # each present patch token fills exactly one query slot; ``token_rows`` points at its output row
    outs, offset = [], 0
    token_rows = torch.empty(batch * num_patches, dtype=torch.long, device=q.device)
    for group in groups:
        outs.append(_attend(*rows, group, num_tokens, num_global, heads, scale))
        slot_rows = offset + torch.arange(outs[-1].shape[0], device=q.device).view(group.query_token.shape)
        dest = group.sample[:, None] * num_patches + group.query_token - num_global
        token_rows[dest[group.query_valid]] = slot_rows[group.query_valid]
        offset += outs[-1].shape[0]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    del outs, rows
    patch_out = out.index_select(0, token_rows).view(batch, num_patches, heads, -1).transpose(1, 2)
    return torch.cat([global_rows(q, k, v, num_global, scale), patch_out], dim=2)


def _run(*args, automatic: bool) -> Tensor:
    """The table's entry point: gather takes every call, requested or automatic alike."""
    return gather_attention(*args)


def _why_not(q: Tensor, k: Tensor, v: Tensor, automatic: bool, num_slots: Optional[int] = None) -> None:
    """Gather runs wherever PyTorch does, with gradients."""
    return None


BACKEND = AttentionBackend(run=_run, why_not=_why_not)
