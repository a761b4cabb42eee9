"""SparseViT and SparseViTAdapter backbones, registered in mmseg's ``MODELS``.

``SparseViT`` needs only torch, timm and mmengine (the class is registered here, not decorated);
the adapter and the registration need mmseg and mmcv ops, and are skipped when the package
reports them missing (``mmseg_sparsevit.MMSEG_AVAILABLE``, with a warning at import).
"""
from .presets import ARCH_PRESETS, ViTArch, get_arch, timm_kwargs
from .sparse_vit import SparseViT
from .weights import load_pretrained_weights

__all__ = ['ARCH_PRESETS', 'SparseViT', 'ViTArch', 'get_arch', 'load_pretrained_weights', 'timm_kwargs']

from .. import MMSEG_AVAILABLE  # noqa: E402  (set by the package before importing this module)

if MMSEG_AVAILABLE:
    from mmseg.registry import MODELS

    from .vit_adapter import SparseViTAdapter  # registers itself; needs mmcv.ops

    MODELS.register_module(module=SparseViT)
    __all__.append('SparseViTAdapter')
