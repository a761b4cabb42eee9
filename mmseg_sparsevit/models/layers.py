"""Attention layer and transformer block of SparseViT.

Parameter names equal timm's ``Attention`` / ``Block`` (``qkv``, ``proj``, ``norm1``, ``ls1``, ``mlp``, ...)
so that timm and hub state dicts load unchanged; only the attention kernel differs: dense (SDPA or the
explicit "vanilla" path) or windowed sparse attention over the patch grid.
"""
from typing import Any, Literal, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp

from mmseg_sparsevit.ops import sparse_attention

AttnMode = Literal['dense', 'sparse']
AttnOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def global_attention_probs(q: torch.Tensor, k: torch.Tensor, num_global: int, scale: float) -> torch.Tensor:
    """Softmax attention of the first ``num_global`` query rows, sliced to the patch-token columns.

    Dense-mode counterpart of ``sparse_attention(..., return_global_attn=True)``: global tokens see every
    token in both modes, so their rows are the same; costs only ``G x N`` scores.
    """
    probs = torch.softmax((q[:, :, :num_global] * scale) @ k.transpose(-2, -1), dim=-1)
    return probs[..., num_global:]


class SparseViTAttention(nn.Module):
    """Multi-head self-attention over ``[global tokens, patch tokens]`` with a dense or sparse kernel."""

    fused_attn: bool

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_prefix_tokens: int,
            qkv_bias: bool = True,
            attn_mode: AttnMode = 'dense',
            window_size: int = 8,
            neighbourhood: str = 'block',
            fused_attn: bool = True,
            sparse_backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if attn_mode not in ('dense', 'sparse'):
            raise ValueError(f"attn_mode must be 'dense' or 'sparse', got {attn_mode!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_mode = attn_mode
        self.window_size = window_size
        self.neighbourhood = neighbourhood
        self.fused_attn = fused_attn
        self.sparse_backend = sparse_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return attn.softmax(dim=-1) @ v

    def forward(
            self,
            x: torch.Tensor,
            grid_hw: Tuple[int, int],
            patch_index: Optional[torch.Tensor] = None,
            return_global_attn: bool = False,
    ) -> AttnOutput:
        """Attend over ``x`` (B, G + M, C); ``patch_index`` (B, M) gives kept grid positions when pruned.

        Dense mode ignores ``patch_index``: it attends among whatever tokens are present.
        """
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        global_attn = None
        if self.attn_mode == 'sparse':
            out = sparse_attention(
                q, k, v, grid_hw, self.num_prefix_tokens, window_size=self.window_size,
                neighbourhood=self.neighbourhood, patch_index=patch_index,
                return_global_attn=return_global_attn, scale=self.scale, backend=self.sparse_backend)
            if return_global_attn:
                out, global_attn = out
        else:
            out = self._dense(q, k, v)
            if return_global_attn:
                global_attn = global_attention_probs(q, k, self.num_prefix_tokens, self.scale)
        out = self.proj(out.transpose(1, 2).reshape(B, N, C))
        return (out, global_attn) if return_global_attn else out


class SparseViTBlock(nn.Module):
    """Pre-norm transformer block (timm ``Block`` layout) whose attention needs the patch grid."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_prefix_tokens: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            init_values: Optional[float] = None,
            drop_path: float = 0.0,
            mlp_layer: Type[nn.Module] = Mlp,
            act_layer: Type[nn.Module] = nn.GELU,
            **attn_kwargs: Any,
    ) -> None:
        """``attn_kwargs`` (attn_mode, window_size, neighbourhood, ...) go to ``SparseViTAttention``."""
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SparseViTAttention(dim, num_heads, num_prefix_tokens, qkv_bias=qkv_bias, **attn_kwargs)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
            self,
            x: torch.Tensor,
            grid_hw: Tuple[int, int],
            patch_index: Optional[torch.Tensor] = None,
            return_global_attn: bool = False,
    ) -> AttnOutput:
        """``x`` (B, G + M, C) -> same shape; with ``return_global_attn`` also (B, heads, G, M) probs."""
        attn = self.attn(self.norm1(x), grid_hw, patch_index, return_global_attn)
        global_attn = None
        if return_global_attn:
            attn, global_attn = attn
        x = x + self.drop_path1(self.ls1(attn))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, global_attn) if return_global_attn else x
