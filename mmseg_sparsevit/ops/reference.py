"""Dense reference for windowed sparse attention: an explicit boolean mask and a plain softmax.

It materialises the N x N mask and scores, so it is the source of truth for tests and is never chosen
automatically by :func:`~mmseg_sparsevit.ops.sparse_attention`.
"""
from typing import Optional, Union

import torch
from torch import Tensor

from .checks import check_args
from .neighbourhood import Neighbourhood, positions_of_tokens, window_bounds


def neighbourhood_mask(grid_hw: tuple[int, int], num_global: int, window_size: int = 8,
                       neighbourhood: Neighbourhood = 'block', patch_index: Optional[Tensor] = None,
                       device: Union[str, torch.device, None] = None) -> Tensor:
    """Boolean (B or 1, G + M, G + M) mask, True where query row may attend to key column."""
    if device is None:
        device = patch_index.device if patch_index is not None else 'cpu'
    height, width = grid_hw
    pos = positions_of_tokens(grid_hw, patch_index, torch.device(device))
    rows, cols = torch.div(pos, width, rounding_mode='floor'), pos % width
    lo_r, hi_r = window_bounds(rows, height, window_size, neighbourhood)
    lo_c, hi_c = window_bounds(cols, width, window_size, neighbourhood)
    row_ok = (lo_r[:, :, None] <= rows[:, None, :]) & (rows[:, None, :] < hi_r[:, :, None])
    col_ok = (lo_c[:, :, None] <= cols[:, None, :]) & (cols[:, None, :] < hi_c[:, :, None])
    num_tokens = num_global + pos.shape[1]
    mask = torch.ones(pos.shape[0], num_tokens, num_tokens, dtype=torch.bool, device=pos.device)
    mask[:, num_global:, num_global:] = row_ok & col_ok
    return mask


def _probs(q: Tensor, k: Tensor, grid_hw: tuple[int, int], num_global: int, window_size: int,
           neighbourhood: Neighbourhood, patch_index: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """The masked softmax, (B, heads, N, N), in at least float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = neighbourhood_mask(grid_hw, num_global, window_size, neighbourhood, patch_index, q.device)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-2, -1)) * scale
    return scores.masked_fill(~mask[:, None], float('-inf')).softmax(dim=-1)


def sparse_attention_reference(
        q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
        window_size: int = 8, neighbourhood: Neighbourhood = 'block',
        patch_index: Optional[Tensor] = None, scale: Optional[float] = None,
        backend: Optional[str] = None) -> Tensor:
    """Same contract as ``sparse_attention``; ``backend`` is accepted for signature parity and ignored."""
    check_args(q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    probs = _probs(q, k, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    return (probs @ v.to(probs.dtype)).to(q.dtype)


def sparse_attention_reference_probs(
        q: Tensor, k: Tensor, grid_hw: tuple[int, int], num_global: int, window_size: int = 8,
        neighbourhood: Neighbourhood = 'block', patch_index: Optional[Tensor] = None,
        scale: Optional[float] = None) -> Tensor:
    """The reference's attention probabilities, (B, heads, N, N) in q's dtype; rows ``:num_global`` are
    the global tokens' rows that ``global_attention_probs`` returns (its columns ``num_global:``)."""
    check_args(q, k, k, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)  # k stands in for v
    return _probs(q, k, grid_hw, num_global, window_size, neighbourhood, patch_index, scale).to(q.dtype)
