"""Gathered-tile backend: pure PyTorch, any device, differentiable.

Patch tokens are grouped tile-major; every tile gathers only the key region its queries can see (the
3 x 3 neighbour tiles for 'block', a (2w - 1)^2 patch for 'sliding') plus the global keys, and runs one
batched ``F.scaled_dot_product_attention``.  Memory is O(N * w^2) for patch rows and O(G * N) for
global rows; no N x N score matrix or mask is ever built.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..neighbourhood import Neighbourhood, TileLayout, tile_layout, tile_query_bounds
from .global_rows import global_rows


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


def _keys_and_mask(layout: TileLayout, num_global: int, window_size: int,
                   neighbourhood: Neighbourhood) -> tuple[Tensor, Tensor]:
    """Token index of every key each tile sees, (B', tiles, K), and the attention mask (B', tiles, Q, K)
    with Q = 1 when all queries of a tile share their keys ('block') and Q = tile size otherwise."""
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

    batch = key_token.shape[0]
    global_ids = torch.arange(num_global, device=device).expand(batch, layout.num_tiles, num_global)
    key_token = torch.cat([key_token.clamp(min=0), global_ids], dim=-1)
    mask = torch.cat([mask, mask.new_ones(*mask.shape[:3], num_global)], dim=-1)
    if num_global == 0:  # rows with no visible key only belong to padding queries; keep them finite
        mask |= ~mask.any(dim=-1, keepdim=True)
    return key_token, mask


def _token_rows(x: Tensor) -> Tensor:
    """(B, h, N, d) -> (B * N, h * d) so one ``index_select`` gathers all heads of a token at once."""
    batch, heads, num_tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch * num_tokens, heads * dim)


def gather_attention(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
                     window_size: int, neighbourhood: Neighbourhood, patch_index: Tensor | None,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Sparse attention on validated arguments; returns (output, global probabilities over patches)."""
    batch, heads, num_tokens, _ = q.shape
    dim_v = v.shape[-1]
    layout = tile_layout(grid_hw, num_global, window_size, patch_index, q.device)
    key_token, mask = _keys_and_mask(layout, num_global, window_size, neighbourhood)
    num_tiles, tile = layout.num_tiles, layout.tile_size
    num_keys = key_token.shape[-1]

    token_base = torch.arange(batch, device=q.device)[:, None] * num_tokens
    key_rows = (key_token + token_base[:, :, None]).reshape(-1)
    query_rows = (layout.slot_token + token_base).reshape(-1)
    q_t = _token_rows(q).index_select(0, query_rows).view(batch * num_tiles, tile, heads, -1)
    k_t = _token_rows(k).index_select(0, key_rows).view(batch * num_tiles, num_keys, heads, -1)
    v_t = _token_rows(v).index_select(0, key_rows).view(batch * num_tiles, num_keys, heads, dim_v)
    mask = mask.expand(batch, *mask.shape[1:]).reshape(batch * num_tiles, 1, *mask.shape[2:])
    out = F.scaled_dot_product_attention(q_t.transpose(1, 2), k_t.transpose(1, 2), v_t.transpose(1, 2),
                                         attn_mask=mask, scale=scale)

    slot_rows = (layout.token_slot + torch.arange(batch, device=q.device)[:, None] * num_tiles * tile)
    out = out.transpose(1, 2).reshape(batch * num_tiles * tile, heads * dim_v)
    patch_out = out.index_select(0, slot_rows.reshape(-1)).view(batch, -1, heads, dim_v).transpose(1, 2)
    global_out, global_probs = global_rows(q, k, v, num_global, scale)
    return torch.cat([global_out, patch_out], dim=2), global_probs
