"""Architecture presets for the pathology ViTs that SparseViT can load.

A preset names the architecture hyper-parameters of a published timm ``VisionTransformer`` so that its
state dict loads into :class:`~mmseg_sparsevit.models.sparse_vit.SparseViT` key for key. ``timm_kwargs``
gives the matching timm constructor arguments; tests use it to build the reference model.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple, Type

import torch.nn as nn
from timm.layers import Mlp, SwiGLUPacked

MlpKind = Literal['mlp', 'swiglu_packed']
# Tile embedding recipe: 'token' = CLS (UNI, UNI-2), 'avg' = mean of the patch tokens, 'token+avg' = CLS
# concatenated with the patch mean (Virchow, Virchow2). Register tokens never enter the mean.
GlobalPool = Literal['token', 'avg', 'token+avg']
GLOBAL_POOLS = ('token', 'avg', 'token+avg')


@dataclass(frozen=True)
class ViTArch:
    """Hyper-parameters of one plain ViT; names follow timm's ``VisionTransformer`` arguments."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int = 224
    mlp_ratio: float = 4.0
    mlp_layer: MlpKind = 'mlp'
    init_values: Optional[float] = None
    reg_tokens: int = 0
    no_embed_class: bool = False
    qkv_bias: bool = True
    global_pool: GlobalPool = 'token'

    def __post_init__(self) -> None:
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}')
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}')
        if self.img_size % self.patch_size:
            raise ValueError(f'img_size={self.img_size} is not a multiple of patch_size={self.patch_size}')
        if self.mlp_layer not in ('mlp', 'swiglu_packed'):
            raise ValueError(f"mlp_layer must be 'mlp' or 'swiglu_packed', got {self.mlp_layer!r}")
        for name in ('embed_dim', 'depth', 'num_heads', 'patch_size', 'img_size'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        if self.mlp_layer == 'swiglu_packed' and int(self.embed_dim * self.mlp_ratio) % 2:
            raise ValueError(f'swiglu_packed needs an even hidden width, but int(embed_dim={self.embed_dim} * '
                             f'mlp_ratio={self.mlp_ratio}) is odd')
        if self.reg_tokens < 0:
            raise ValueError(f'reg_tokens must be >= 0, got {self.reg_tokens}')

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens (the "global" tokens of sparse attention)."""
        return 1 + self.reg_tokens

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Patch grid of the pretraining resolution, i.e. the grid ``pos_embed`` is stored on."""
        side = self.img_size // self.patch_size
        return side, side

    def layers(self) -> Tuple[Type[nn.Module], Type[nn.Module]]:
        """``(mlp_layer, act_layer)`` classes, resolved the way the hub configs pass them to timm."""
        if self.mlp_layer == 'swiglu_packed':
            return SwiGLUPacked, nn.SiLU
        return Mlp, nn.GELU


ARCH_PRESETS: Dict[str, ViTArch] = {
    # UNI-2-h (MahmoodLab/UNI2-h): ViT-g/14 width 1536, SwiGLU, 8 registers without position embedding.
    'uni2-h': ViTArch(
        embed_dim=1536, depth=24, num_heads=24, patch_size=14, mlp_ratio=2.66667 * 2,
        mlp_layer='swiglu_packed', init_values=1e-5, reg_tokens=8, no_embed_class=True),
    # UNI (MahmoodLab/UNI): ViT-L/16 with layer scale; the position embedding covers the CLS token.
    'uni': ViTArch(embed_dim=1024, depth=24, num_heads=16, patch_size=16, init_values=1e-5),
    # Virchow2 (paige-ai/Virchow2): ViT-H/14, SwiGLU, 4 registers that share the position embedding.
    'virchow2': ViTArch(
        embed_dim=1280, depth=32, num_heads=16, patch_size=14, mlp_ratio=5.3375,
        mlp_layer='swiglu_packed', init_values=1e-5, reg_tokens=4),
    'vit-s': ViTArch(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    'vit-b': ViTArch(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    'vit-l': ViTArch(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
}

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ViTArch))


def get_arch(arch: str = 'uni2-h', **overrides: Any) -> ViTArch:
    """Resolve a preset name plus explicit overrides (``None`` values mean "keep the preset")."""
    key = arch.lower()
    if key not in ARCH_PRESETS:
        raise KeyError(f'unknown arch {arch!r}; available presets: {sorted(ARCH_PRESETS)}')
    unknown = set(overrides) - set(ARCH_FIELDS)
    if unknown:
        raise TypeError(f'unknown arch override(s) {sorted(unknown)}; allowed: {list(ARCH_FIELDS)}')
    return dataclasses.replace(ARCH_PRESETS[key], **{k: v for k, v in overrides.items() if v is not None})


def timm_kwargs(arch: ViTArch) -> Dict[str, Any]:
    """Arguments for ``timm.models.VisionTransformer`` that build the same network as ``arch``.

    The result matches the hub configs (e.g. UNI-2's ``timm.create_model`` kwargs) with the head
    removed, so a timm model built from it and a SparseViT share one state dict layout.
    """
    mlp_layer, act_layer = arch.layers()
    return dict(
        img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias,
        init_values=arch.init_values, reg_tokens=arch.reg_tokens, no_embed_class=arch.no_embed_class,
        mlp_layer=mlp_layer, act_layer=act_layer, num_classes=0, dynamic_img_size=True)
