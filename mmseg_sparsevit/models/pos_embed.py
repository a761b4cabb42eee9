"""Resizing a learned position embedding to another patch grid, the way each model family's own code does it.

Models were trained and are used with different resize rules, and a feature extractor only reproduces a
model's published outputs at a new input size when it uses the same rule:

* ``'timm'``: bicubic to the target size with antialiasing (timm's ``resample_abs_pos_embed``, used by timm
  models with ``dynamic_img_size``);
* ``'bicubic'``: bicubic to the target size without antialiasing (``transformers``' ViT and DINOv2 in
  transformers 5; older releases and the original DINOv2 code used other rules, see the docs).

Stateless, torch and timm only; serves both checkpoint loading and the per-input resize.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from .presets import POS_EMBED_RESIZES, PosEmbedResize


def resize_pos_embed(pos_embed: torch.Tensor, new_size: Sequence[int], old_size: Sequence[int],
                     num_prefix_tokens: int, mode: PosEmbedResize = 'timm') -> torch.Tensor:
    """``pos_embed`` (1, P + h*w, C) stored for grid ``old_size`` (h, w) -> (1, P + H*W, C) for ``new_size``.

    The first ``num_prefix_tokens`` (P) rows belong to prefix tokens and are kept as they are.
    """
    if mode not in POS_EMBED_RESIZES:
        raise ValueError(f'pos_embed resize mode must be one of {POS_EMBED_RESIZES}, got {mode!r}')
    new_size, old_size = tuple(int(s) for s in new_size), tuple(int(s) for s in old_size)
    if pos_embed.shape[1] != num_prefix_tokens + old_size[0] * old_size[1]:
        raise ValueError(f'pos_embed of shape {tuple(pos_embed.shape)} does not hold {num_prefix_tokens} prefix '
                         f'positions plus a {old_size} grid')
    if mode == 'timm':
        return resample_abs_pos_embed(pos_embed, new_size=new_size, old_size=old_size,
                                      num_prefix_tokens=num_prefix_tokens)
    if new_size == old_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
