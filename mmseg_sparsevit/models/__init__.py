"""SparseViT backbone (and, when mmseg is installed, its registration in mmseg's MODELS registry).

The model modules need only torch, timm and mmengine; registration is skipped when mmseg is absent so
that ``mmseg_sparsevit.models.sparse_vit`` stays usable for feature extraction without mmseg/mmcv.
"""
from .presets import ARCH_PRESETS, ViTArch, get_arch, timm_kwargs
from .sparse_vit import SparseViT
from .weights import load_pretrained_weights

try:
    from mmseg.registry import MODELS
except ImportError:  # mmseg not installed: plain-PyTorch use only
    MODELS = None
else:
    MODELS.register_module(module=SparseViT)
    from .vit_adapter import SparseViTAdapter  # noqa: F401,E402  (registers itself; needs mmcv.ops)

__all__ = ['ARCH_PRESETS', 'SparseViT', 'ViTArch', 'get_arch', 'load_pretrained_weights', 'timm_kwargs']
