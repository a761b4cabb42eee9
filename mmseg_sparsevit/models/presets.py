"""Architecture presets for the pathology ViTs that SparseViT can load, and where their weights live.

A preset names the architecture hyper-parameters of a published ViT so that its state dict (timm layout, or
Hugging Face ``transformers`` layout after :mod:`~mmseg_sparsevit.models.convert`) loads into
:class:`~mmseg_sparsevit.models.sparse_vit.SparseViT` key for key. ``timm_kwargs`` gives the matching timm
constructor arguments. ``PRETRAINED`` records, per preset, the hub repository, its weights file, licence and
gating, and the input normalisation the authors use. Each entry cites the public source it was taken from;
models whose architecture could not be pinned down from public sources are left out (see
``docs/foundation_models.md``).
"""
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Literal, Optional, Tuple, Type

import torch.nn as nn
from timm.layers import LayerNorm, Mlp, SwiGLUPacked

MlpKind = Literal['mlp', 'swiglu_packed']
# Tile embedding recipe: 'token' = CLS (UNI, UNI-2), 'avg' = mean of the patch tokens, 'token+avg' = CLS
# concatenated with the patch mean (Virchow, Virchow2). Register tokens never enter the mean.
GlobalPool = Literal['token', 'avg', 'token+avg']
GLOBAL_POOLS = ('token', 'avg', 'token+avg')
# How ``pos_embed`` is resized to an input grid other than the stored one (see ``models/pos_embed.py``).
PosEmbedResize = Literal['timm', 'bicubic']
POS_EMBED_RESIZES = ('timm', 'bicubic')

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTArch:
    """Hyper-parameters of one plain ViT; names follow timm's ``VisionTransformer`` arguments.

    Beyond timm's names: ``norm_eps`` is the LayerNorm epsilon (1e-12 in ``transformers``' ViT), and
    ``reg_pos_embed=False`` means the registers are inserted after the position embedding was added, so
    ``pos_embed`` covers the class token and the patches only (DINOv2 with registers in ``transformers``).
    ``pos_embed_resize`` is how ``pos_embed`` is resized to another input grid: ``'timm'`` (bicubic,
    antialiased) or ``'bicubic'`` (bicubic without antialiasing, ``transformers``' ViT and DINOv2).
    """

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
    norm_eps: float = 1e-6
    reg_pos_embed: bool = True
    pos_embed_resize: PosEmbedResize = 'timm'

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
        if not self.norm_eps > 0:
            raise ValueError(f'norm_eps must be > 0, got {self.norm_eps}')
        if self.no_embed_class and not self.reg_pos_embed:
            raise ValueError('reg_pos_embed=False (registers without position embedding while the class token '
                             'has one) contradicts no_embed_class=True (no prefix token has one)')
        if self.pos_embed_resize not in POS_EMBED_RESIZES:
            raise ValueError(f'pos_embed_resize must be one of {POS_EMBED_RESIZES}, got {self.pos_embed_resize!r}')

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens (the "global" tokens of sparse attention)."""
        return 1 + self.reg_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Leading prefix tokens that ``pos_embed`` covers: none, the class token, or class token + registers."""
        if self.no_embed_class:
            return 0
        return self.num_prefix_tokens if self.reg_pos_embed else 1

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

    def norm_layer(self) -> Type[nn.Module]:
        """LayerNorm class with this architecture's epsilon (timm's ``norm_layer`` argument)."""
        return partial(LayerNorm, eps=self.norm_eps)


# SwiGLU widths: timm's SwiGLUPacked has one fc1 of width int(embed_dim * mlp_ratio) holding both halves, so a
# DINOv2 SwiGLU with hidden width h is mlp_ratio = 2 * h / embed_dim (rounded up so that int() gives 2 * h).
ARCH_PRESETS: Dict[str, ViTArch] = {
    # UNI-2-h: MahmoodLab/UNI2-h model card (timm kwargs of vit_giant_patch14_224): ViT-g/14 width 1536, SwiGLU
    # hidden 4096, layer scale, 8 registers without position embedding (no_embed_class).
    'uni2-h': ViTArch(
        embed_dim=1536, depth=24, num_heads=24, patch_size=14, mlp_ratio=2.66667 * 2,
        mlp_layer='swiglu_packed', init_values=1e-5, reg_tokens=8, no_embed_class=True),
    # UNI: MahmoodLab/UNI model card (vit_large_patch16_224, init_values=1e-5); pos_embed covers the CLS token.
    'uni': ViTArch(embed_dim=1024, depth=24, num_heads=16, patch_size=16, init_values=1e-5),
    # Virchow: paige-ai/Virchow config.json + model card (vit_huge_patch14_224, mlp_ratio 5.3375, SwiGLUPacked,
    # SiLU, init_values 1e-5); no registers.
    'virchow': ViTArch(
        embed_dim=1280, depth=32, num_heads=16, patch_size=14, mlp_ratio=5.3375,
        mlp_layer='swiglu_packed', init_values=1e-5, global_pool='token+avg'),
    # Virchow2: paige-ai/Virchow2 config.json + model card: as Virchow plus 4 registers that share the
    # position embedding (timm default no_embed_class=False).
    'virchow2': ViTArch(
        embed_dim=1280, depth=32, num_heads=16, patch_size=14, mlp_ratio=5.3375,
        mlp_layer='swiglu_packed', init_values=1e-5, reg_tokens=4, global_pool='token+avg'),
    # H-optimus-0 / H-optimus-1: bioptimus config.json (architecture vit_giant_patch14_reg4_dinov2, input
    # 224 with fixed_input_size) and model card (init_values=1e-5): ViT-g/14, 40 blocks, SwiGLU hidden 4096,
    # 4 registers, no_embed_class.
    'h-optimus-0': ViTArch(
        embed_dim=1536, depth=40, num_heads=24, patch_size=14, mlp_ratio=2.66667 * 2,
        mlp_layer='swiglu_packed', init_values=1e-5, reg_tokens=4, no_embed_class=True),
    'h-optimus-1': ViTArch(
        embed_dim=1536, depth=40, num_heads=24, patch_size=14, mlp_ratio=2.66667 * 2,
        mlp_layer='swiglu_packed', init_values=1e-5, reg_tokens=4, no_embed_class=True),
    # Prov-GigaPath tile encoder: prov-gigapath/prov-gigapath config.json (vit_giant_patch14_dinov2 with
    # model_args patch_size 16, embed_dim 1536, depth 40, num_heads 24, init_values 1e-5, mlp_ratio 5.33334);
    # the architecture keeps timm's SwiGLUPacked + SiLU of that name; pos_embed covers the CLS token.
    'gigapath': ViTArch(
        embed_dim=1536, depth=40, num_heads=24, patch_size=16, mlp_ratio=5.33334,
        mlp_layer='swiglu_packed', init_values=1e-5),
    # Phikon: owkin/phikon config.json (transformers ViTModel: hidden 768, 12 layers, 12 heads, intermediate
    # 3072, layer_norm_eps 1e-12, patch 16, image 224, qkv_bias); no layer scale; transformers' ViT resizes
    # pos_embed bicubic without antialiasing.
    'phikon': ViTArch(
        embed_dim=768, depth=12, num_heads=12, patch_size=16, norm_eps=1e-12, pos_embed_resize='bicubic'),
    # Phikon-v2: owkin/phikon-v2 model card (transformers Dinov2Model, ViT-L/16, no registers, no SwiGLU) and
    # Filiot et al. 2024 (224 px global crops, so a 14 x 14 pos_embed grid); DINOv2 blocks carry layer scale;
    # transformers' DINOv2 resizes pos_embed bicubic without antialiasing.
    'phikon-v2': ViTArch(
        embed_dim=1024, depth=24, num_heads=16, patch_size=16, init_values=1e-5, pos_embed_resize='bicubic'),
    # Hibou-B: histai/hibou-b config.json (Dinov2ModelWithRegisters: hidden 768, 12 layers, 12 heads, patch 14,
    # image 224, 4 registers, use_swiglu_ffn, mlp_ratio 4 -> SwiGLU hidden 2048, layer_norm_eps 1e-6) and
    # github.com/HistAI/hibou (registers inserted after the position embedding; pos_embed resized by size with
    # antialiasing, interpolate_offset=0, as timm does).
    'hibou-b': ViTArch(
        embed_dim=768, depth=12, num_heads=12, patch_size=14, mlp_ratio=5.3334, mlp_layer='swiglu_packed',
        init_values=1e-5, reg_tokens=4, reg_pos_embed=False),
    'vit-s': ViTArch(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    'vit-b': ViTArch(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    'vit-l': ViTArch(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
}

ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ViTArch))


@dataclass(frozen=True)
class PretrainedModel:
    """Where a preset's published weights live and how its authors feed it.

    ``weights_file`` is the file the hub repository holds (loading by name tries it first); ``mean`` / ``std``
    are the RGB normalisation constants on the 0-1 scale; ``licence`` and ``gated`` are as the model card
    states them (``gated``: access must be requested on the hub and ``HF_TOKEN`` set).
    """

    hub_id: str
    weights_file: str
    licence: str
    gated: bool
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    source: str = ''

    @property
    def url(self) -> str:
        return f'https://huggingface.co/{self.hub_id}'


HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)

PRETRAINED: Dict[str, PretrainedModel] = {
    'uni2-h': PretrainedModel(
        'MahmoodLab/UNI2-h', 'pytorch_model.bin', 'CC-BY-NC-ND-4.0', True,
        source='model card (timm kwargs, ImageNet transform); TRIDENT uni_v2'),
    'uni': PretrainedModel(
        'MahmoodLab/UNI', 'pytorch_model.bin', 'CC-BY-NC-ND-4.0', True,
        source='model card; TRIDENT uni_v1'),
    'virchow': PretrainedModel(
        'paige-ai/Virchow', 'pytorch_model.bin', 'Apache-2.0 (with additional terms)', True,
        source='config.json, model card; TRIDENT virchow'),
    'virchow2': PretrainedModel(
        'paige-ai/Virchow2', 'pytorch_model.bin', 'CC-BY-NC-ND-4.0', True,
        source='config.json, model card; TRIDENT virchow2'),
    'h-optimus-0': PretrainedModel(
        'bioptimus/H-optimus-0', 'pytorch_model.bin', 'Apache-2.0', True, HOPTIMUS_MEAN, HOPTIMUS_STD,
        source='config.json (architecture, input size, mean/std), model card; TRIDENT hoptimus0'),
    'h-optimus-1': PretrainedModel(
        'bioptimus/H-optimus-1', 'pytorch_model.bin', 'see model card', True, HOPTIMUS_MEAN, HOPTIMUS_STD,
        source='model card; TRIDENT hoptimus1 (same architecture and constants as H-optimus-0)'),
    'gigapath': PretrainedModel(
        'prov-gigapath/prov-gigapath', 'pytorch_model.bin', 'Apache-2.0', True,
        source='config.json model_args, gigapath demo/load_tile_encoder.py (ImageNet transform); TRIDENT gigapath'),
    'phikon': PretrainedModel(
        'owkin/phikon', 'pytorch_model.bin', 'see model card', False,
        source='config.json (transformers ViTModel); TRIDENT phikon (ImageNet constants, CLS token)'),
    'phikon-v2': PretrainedModel(
        'owkin/phikon-v2', 'model.safetensors', 'Owkin non-commercial (LICENSE.pdf)', False,
        source='model card (transformers Dinov2Model), Filiot et al. 2024; TRIDENT phikon_v2 (ImageNet, CLS)'),
    'hibou-b': PretrainedModel(
        'histai/hibou-b', 'model.safetensors', 'Apache-2.0', False, HIBOU_MEAN, HIBOU_STD,
        source='config.json, github.com/HistAI/hibou; TRIDENT hibou constants and pooler_output (CLS)'),
}


def preset_for_hub_id(repo_id: str) -> Optional[str]:
    """Preset name whose ``PRETRAINED`` entry is the hub repository ``repo_id`` (case-insensitive), or None."""
    wanted = repo_id.lower()
    return next((name for name, card in PRETRAINED.items() if card.hub_id.lower() == wanted), None)


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
    removed, so a timm model built from it and a SparseViT share one state dict layout. Architectures timm's
    ViT cannot express (registers without position embedding while the class token has one) raise.
    """
    if not arch.reg_pos_embed and arch.reg_tokens:
        raise ValueError('timm VisionTransformer cannot express reg_pos_embed=False (registers without position '
                         'embedding while the class token has one)')
    mlp_layer, act_layer = arch.layers()
    return dict(
        img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
        num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, qkv_bias=arch.qkv_bias,
        init_values=arch.init_values, reg_tokens=arch.reg_tokens, no_embed_class=arch.no_embed_class,
        mlp_layer=mlp_layer, act_layer=act_layer, norm_layer=arch.norm_layer(), num_classes=0,
        dynamic_img_size=True)
