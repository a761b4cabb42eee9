"""Attention rows of the global tokens, shared by every backend.

Global tokens (CLS + registers) attend to all N tokens.  They are only G rows, so a plain dense pass
costs O(G * N) and also yields the probabilities over patch tokens that token pruning ranks by.
"""
import torch
from torch import Tensor


def global_rows(q: Tensor, k: Tensor, v: Tensor, num_global: int,
                scale: float) -> tuple[Tensor, Tensor]:
    """Return the global tokens' outputs (B, h, G, dv) and their probabilities over patches (B, h, G, M)."""
    scores = (q[:, :, :num_global] @ k.transpose(-2, -1)) * scale
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return probs @ v, probs[..., num_global:]
