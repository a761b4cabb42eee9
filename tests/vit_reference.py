"""Helpers for tests that compare a SparseViT with a reference ViT (timm or transformers) sharing its weights."""
import torch
from torch import nn


def sharpen(model: nn.Module, gamma: str = '.gamma', query: str = 'attn.qkv.weight') -> None:
    """Raise layer-scale gammas (1e-5 at init) to O(1) and scale the query weights, so that the attention
    branch of every block, and thus any attention bug, visibly changes the output. ``gamma`` and ``query``
    are the parameter-name suffixes (timm's by default; transformers: ``lambda1`` and ``q_proj.weight``)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(gamma):
                param.uniform_(0.5, 1.5)
            elif name.endswith(query):
                param.mul_(4)
