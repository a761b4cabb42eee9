"""Up-front argument checks shared by ``sparse_attention`` and its reference.

Every message names the argument and the offending value, so a wrong call from a model layer points
straight at the culprit instead of failing deep inside a gather or a kernel.
"""
import math
from typing import Optional

import torch
from torch import Tensor

NEIGHBOURHOODS = ('block', 'sliding')


def check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')


def check_args(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
               window_size: int, neighbourhood: str, patch_index: Optional[Tensor],
               scale: Optional[float]) -> None:
    """Raise ``ValueError``/``TypeError`` naming the bad argument; return None when all is well."""
    _check_tensors(('q', q), ('k', k), ('v', v))
    if k.shape != q.shape:
        raise ValueError(f'k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}')
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f'v shape {tuple(v.shape)} must match q shape {tuple(q.shape)} '
                         'in (B, heads, tokens)')
    _check_same_dtype_device(q, k, v)

    if (not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in grid_hw)):
        raise ValueError(f'grid_hw must be a pair of positive ints (H, W), got {grid_hw!r}')
    check_int('window_size', window_size, 1)
    check_neighbourhood(neighbourhood)
    _check_global_and_scale(q, num_global, scale)

    batch, _, num_tokens, _ = q.shape
    num_patches = num_tokens - num_global
    grid_cells = grid_hw[0] * grid_hw[1]
    if patch_index is None:
        if num_patches != grid_cells:
            raise ValueError(f'{num_patches} patch tokens (q has {num_tokens} tokens, num_global='
                             f'{num_global}) do not fill grid_hw={tuple(grid_hw)} ({grid_cells} cells); '
                             'pass patch_index for pruned tokens')
        return
    _check_patch_index(patch_index, batch, num_patches, grid_hw, q.device)


def check_global_args(q: Tensor, k: Tensor, num_global: int, scale: Optional[float]) -> None:
    """Checks of ``global_attention_probs``: q and k as for ``sparse_attention``, any token layout."""
    _check_tensors(('q', q), ('k', k))
    if k.shape != q.shape:
        raise ValueError(f'k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}')
    _check_same_dtype_device(q, k)
    _check_global_and_scale(q, num_global, scale)


def check_neighbourhood(neighbourhood: str) -> None:
    if neighbourhood not in NEIGHBOURHOODS:
        raise ValueError(f'neighbourhood must be one of {NEIGHBOURHOODS}, got {neighbourhood!r}')


def _check_tensors(*named: tuple[str, Tensor]) -> None:
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f'{name} must be a torch.Tensor, got {type(t).__name__}')
        if t.dim() != 4:
            raise ValueError(f'{name} must be (B, heads, G + M, head_dim), got shape {tuple(t.shape)}')
        if not t.is_floating_point():
            raise TypeError(f'{name} must be floating point, got dtype {t.dtype}')


def _check_same_dtype_device(*tensors: Tensor) -> None:
    names = ', '.join('qkv'[:len(tensors)])
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f'{names} dtypes differ: {", ".join(str(t.dtype) for t in tensors)}')
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f'{names} devices differ: {", ".join(str(t.device) for t in tensors)}')


def _check_global_and_scale(q: Tensor, num_global: int, scale: Optional[float]) -> None:
    check_int('num_global', num_global, 0)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f'scale must be None or a finite number, got {scale!r}')
    num_tokens = q.shape[2]
    if num_tokens - num_global < 1:
        raise ValueError(f'num_global={num_global} leaves no patch tokens in {num_tokens} tokens (q shape '
                         f'{tuple(q.shape)})')


def _check_patch_index(patch_index: Tensor, batch: int, num_patches: int, grid_hw: tuple[int, int],
                       device: torch.device) -> None:
    if not isinstance(patch_index, Tensor) or patch_index.dtype != torch.long:
        raise TypeError(f'patch_index must be a torch.long tensor, got '
                        f'{getattr(patch_index, "dtype", type(patch_index).__name__)}')
    if tuple(patch_index.shape) != (batch, num_patches):
        raise ValueError(f'patch_index shape {tuple(patch_index.shape)} must be (B, M) = '
                         f'({batch}, {num_patches})')
    if patch_index.device != device:
        raise ValueError(f'patch_index is on {patch_index.device}, q on {device}')
    grid_cells = grid_hw[0] * grid_hw[1]
    lo, hi = int(patch_index.min()), int(patch_index.max())
    if lo < 0 or hi >= grid_cells:
        raise ValueError(f'patch_index values must lie in [0, {grid_cells}) for grid_hw={tuple(grid_hw)}, '
                         f'got range [{lo}, {hi}]')
    if num_patches > 1 and not bool((patch_index[:, 1:] > patch_index[:, :-1]).all()):
        raise ValueError('patch_index must be strictly increasing along each row (sorted ascending, '
                         'no repeats)')
