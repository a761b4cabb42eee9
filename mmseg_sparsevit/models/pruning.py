"""Attention-guided token pruning for classification / feature extraction: its own step between blocks.

After block ``prune_after`` the patch tokens are scored by the attention the CLS token pays them in
that block (mean over heads) and only the top ``num_kept_tokens(M, ratio)`` survive, kept in their
original row-major grid order so that sparse attention can still find each token's neighbourhood.
The scores are recomputed from the block's input (``SparseViTBlock.global_attention``: one ``qkv``
projection and G x N scores, softmax in float32 through ``ops.global_attention_probs``), so the blocks
themselves return one tensor and dense and sparse models rank at the same precision.
"""
import math
from typing import NamedTuple, Optional

import torch

from .layers import SparseViTBlock


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


class PrunedTokens(NamedTuple):
    """Result of the pruning step: the surviving tokens and where their patches sit on the grid."""

    tokens: torch.Tensor  # (B, G + K, C): all prefix tokens, then the K kept patch tokens in grid order
    kept_index: torch.Tensor  # (B, K) row-major grid positions, ascending
    # ``patch_index`` for the blocks that follow: ``kept_index``, or None when nothing was removed, so that
    # they run exactly the unpruned computation.
    patch_index: Optional[torch.Tensor]


def prune_tokens(block: SparseViTBlock, block_input: torch.Tensor, block_output: torch.Tensor,
                 prune_ratio: float, num_prefix_tokens: int) -> PrunedTokens:
    """Keep the patch tokens of ``block_output`` that the CLS token attended to most inside ``block``.

    ``block_input`` / ``block_output`` (B, G + M, C) are the tokens entering and leaving the block; M must
    be the full grid. With nothing to remove the output passes unchanged (kept: every position).
    """
    batch, num_tokens, _ = block_output.shape
    num_patches = num_tokens - num_prefix_tokens
    num_keep = num_kept_tokens(num_patches, prune_ratio)
    if num_keep == num_patches:
        all_positions = torch.arange(num_patches, device=block_output.device).expand(batch, -1)
        return PrunedTokens(block_output, all_positions, None)
    with torch.no_grad():  # the scores only choose indices: no gradient flows through them, keep no graph
        kept = select_kept_tokens(block.global_attention(block_input), num_keep)
    return PrunedTokens(gather_kept_tokens(block_output, kept, num_prefix_tokens), kept, kept)
