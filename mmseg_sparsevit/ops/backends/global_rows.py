"""Attention rows of the global tokens: the one implementation in the package.

Global tokens (CLS + registers) attend to all N tokens in every attention mode, dense or sparse.  They
are only G rows, so a plain dense pass costs O(G * N); every sparse backend uses it for its global
outputs, and token pruning ranks patches by the same probabilities (``global_attention_probs``).  The
softmax runs in at least float32 so that low-precision inputs rank tokens like float32 ones.
"""
import torch
from torch import Tensor


def global_probs(q: Tensor, k: Tensor, num_global: int, scale: float) -> Tensor:
    """Softmax probabilities of the first ``num_global`` queries over all keys, (B, h, G, N), in q's dtype."""
    scores = (q[:, :, :num_global] @ k.transpose(-2, -1)) * scale
    return scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)


def global_rows(q: Tensor, k: Tensor, v: Tensor, num_global: int, scale: float) -> Tensor:
    """The global tokens' attention outputs, (B, h, G, dv)."""
    return global_probs(q, k, num_global, scale) @ v
