"""Attention-guided token pruning for classification / feature extraction.

After block ``prune_after`` the patch tokens are scored by the attention the CLS token pays them in
that block (mean over heads) and only the top ``num_kept_tokens(M, ratio)`` survive, kept in their
original row-major grid order so that sparse attention can still find each token's neighbourhood.
"""
import math

import torch


def num_kept_tokens(num_tokens: int, prune_ratio: float) -> int:
    """How many of ``num_tokens`` patch tokens survive pruning with ``prune_ratio``.

    ``floor(prune_ratio * M)`` tokens are removed, so ``ceil((1 - prune_ratio) * M)`` are kept (the
    small epsilon keeps e.g. ``0.7 * 10`` from flooring to 6); at least one token is always kept.
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f'prune_ratio must be in [0, 1), got {prune_ratio}')
    num_pruned = math.floor(prune_ratio * num_tokens + 1e-6)
    return max(1, num_tokens - num_pruned)


def select_kept_tokens(global_attn: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices (B, num_keep), ascending, of the patch tokens the CLS token attends to most.

    ``global_attn`` is (B, heads, G, M) with the CLS token in global row 0 (timm token order).
    """
    if global_attn.dim() != 4:
        raise ValueError(f'global_attn must be (B, heads, G, M), got shape {tuple(global_attn.shape)}')
    num_tokens = global_attn.shape[-1]
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f'num_keep must be in [1, {num_tokens}], got {num_keep}')
    scores = global_attn[:, :, 0].float().mean(dim=1)
    kept = scores.topk(num_keep, dim=-1, sorted=False).indices
    return kept.sort(dim=-1).values


def gather_kept_tokens(x: torch.Tensor, kept_index: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Keep all prefix tokens of ``x`` (B, G + M, C) and the patch tokens at ``kept_index`` (B, K)."""
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    if kept_index.shape[0] != x.shape[0] or kept_index.dim() != 2:
        raise ValueError(f'kept_index must be (B={x.shape[0]}, K), got shape {tuple(kept_index.shape)}')
    index = kept_index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.cat([prefix, patches.gather(1, index)], dim=1)
