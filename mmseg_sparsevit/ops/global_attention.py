"""Public access to the global tokens' attention probabilities, which token pruning ranks patches by."""
from typing import Optional

from torch import Tensor

from .backends.global_rows import global_probs
from .checks import check_global_args


def global_attention_probs(q: Tensor, k: Tensor, num_global: int, scale: Optional[float] = None) -> Tensor:
    """Softmax probabilities of the ``num_global`` global queries over the patch tokens, (B, heads, G, M).

    ``q``, ``k``: (B, heads, G + M, head_dim), global tokens first; ``scale`` defaults to head_dim ** -0.5.
    Global tokens see every token in both dense and sparse attention, so these are the patch columns of
    their attention rows in either mode (rows sum to 1 over globals + patches).  The softmax runs in at
    least float32; the result has q's dtype.  Same rows as every ``sparse_attention`` backend computes.
    """
    check_global_args(q, k, num_global, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return global_probs(q, k, num_global, scale)[..., num_global:]
