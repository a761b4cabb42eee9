"""Attention layer and transformer block of SparseViT.

Parameter names equal timm's ``Attention`` / ``Block`` (``qkv``, ``proj``, ``norm1``, ``ls1``, ``mlp``, ...)
so that timm and hub state dicts load unchanged; only the attention kernel differs: dense (SDPA, or the
explicit softmax(QK^T)V path when ``fused_attn`` is False, as in timm) or windowed sparse attention over
the patch grid (``ops.SparseAttention``, a parameter-free submodule). Every layer returns one tensor.
"""
from dataclasses import dataclass
from typing import Literal, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp

from mmseg_sparsevit.ops import SparseAttention, global_attention_probs
from mmseg_sparsevit.ops.neighbourhood import Neighbourhood
from mmseg_sparsevit.ops.sparse_attention import Backend

AttnMode = Literal['dense', 'sparse']
ATTN_MODES = ('dense', 'sparse')


@dataclass(frozen=True)
class AttentionConfig:
    """How every attention layer of a SparseViT attends, checked once when the model is built.

    Field names are the ``SparseViT`` arguments, so an error names the config key at fault.

    Args:
        attn_mode: ``'dense'`` (all-to-all) or ``'sparse'`` (windowed, ``ops.SparseAttention``).
        window_size, neighbourhood, sparse_backend: the sparse pattern and backend (``None``: automatic);
            validated in every mode by ``ops.SparseAttention``, so a bad value fails at build time.
        fused_attn: dense kernel: SDPA (True) or the explicit softmax(QK^T)V path (False, "vanilla").
    """

    attn_mode: AttnMode = 'dense'
    window_size: int = 8
    neighbourhood: Neighbourhood = 'block'
    sparse_backend: Optional[Backend] = None
    fused_attn: bool = True

    def __post_init__(self) -> None:
        if self.attn_mode not in ATTN_MODES:
            raise ValueError(f'attn_mode must be one of {ATTN_MODES}, got {self.attn_mode!r}')
        if not isinstance(self.fused_attn, bool):
            raise TypeError(f'fused_attn must be a bool, got {self.fused_attn!r}')
        self.sparse_kernel()  # ops.SparseAttention checks window_size, neighbourhood and the backend

    def sparse_kernel(self) -> SparseAttention:
        """The sparse attention module with this pattern (it holds no parameters)."""
        return SparseAttention(self.window_size, self.neighbourhood, self.sparse_backend)


class SparseViTAttention(nn.Module):
    """Multi-head self-attention over ``[global tokens, patch tokens]`` with a dense or sparse kernel.

    ``sparse_attn`` is the kernel seam (timm's ``attn_layer`` idea): an ``ops.SparseAttention`` in sparse
    mode, ``None`` in dense mode, where ``fused_attn`` picks SDPA or the explicit path.
    """

    fused_attn: bool

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_prefix_tokens: int,
            qkv_bias: bool = True,
            attn_cfg: Optional[AttentionConfig] = None,
    ) -> None:
        super().__init__()
        attn_cfg = attn_cfg or AttentionConfig()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.fused_attn = attn_cfg.fused_attn
        self.sparse_attn = attn_cfg.sparse_kernel() if attn_cfg.attn_mode == 'sparse' else None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return attn.softmax(dim=-1) @ v

    def forward(self, x: torch.Tensor, grid_hw: Tuple[int, int],
                patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend over ``x`` (B, G + M, C); ``patch_index`` (B, M) gives kept grid positions when pruned.

        Dense mode ignores ``grid_hw`` and ``patch_index``: it attends among whatever tokens are present.
        """
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        if self.sparse_attn is not None:
            out = self.sparse_attn(q, k, v, grid_hw, self.num_prefix_tokens, patch_index=patch_index)
        else:
            out = self._dense(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def global_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, heads, G, M) of the global tokens over the patch tokens of ``x`` (B, G + M, C).

        The same rows in dense and sparse mode (global tokens see every token), from
        ``ops.global_attention_probs`` (softmax in float32); costs one ``qkv`` projection and G x N scores.
        """
        q, k, _ = self._qkv(x)
        return global_attention_probs(q, k, self.num_prefix_tokens, self.scale)


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
            attn_cfg: Optional[AttentionConfig] = None,
            norm_layer: Type[nn.Module] = LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SparseViTAttention(dim, num_heads, num_prefix_tokens, qkv_bias=qkv_bias, attn_cfg=attn_cfg)
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid_hw: Tuple[int, int],
                patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, G + M, C) -> same shape."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid_hw, patch_index)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def global_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The global tokens' attention (B, heads, G, M) inside this block, for the block input ``x``."""
        return self.attn.global_attention(self.norm1(x))
