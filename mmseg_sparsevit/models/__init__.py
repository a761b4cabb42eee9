"""SparseViT and SparseViTAdapter backbones, registered in mmseg's ``MODELS``.

``sparse_vit.py`` itself needs only torch, timm and mmengine (the class is registered here, not
decorated), so the model code stays plain PyTorch; mmseg is a hard dependency of the package.
"""
from mmseg.registry import MODELS

from .presets import ARCH_PRESETS, ViTArch, get_arch, timm_kwargs
from .sparse_vit import SparseViT
from .vit_adapter import SparseViTAdapter  # registers itself; needs mmcv.ops
from .weights import load_pretrained_weights

MODELS.register_module(module=SparseViT)

__all__ = ['ARCH_PRESETS', 'SparseViT', 'SparseViTAdapter', 'ViTArch', 'get_arch', 'load_pretrained_weights',
           'timm_kwargs']
