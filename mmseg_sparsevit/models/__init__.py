"""SparseViT and SparseViTAdapter backbones (and a checkpointed Mask2Former pixel decoder), registered in
mmseg's ``MODELS``.

``SparseViT`` needs only torch, timm and mmengine (the class is registered here, not decorated);
the adapter and the registration need mmseg and mmcv ops, and are skipped when they do not import
(:func:`mmseg_sparsevit.openmmlab.mmseg_available`; the package root warns about it).
"""
from mmseg_sparsevit.openmmlab import mmseg_available

from .presets import ARCH_PRESETS, PRETRAINED, PretrainedModel, ViTArch, get_arch, timm_kwargs
from .sparse_vit import SparseViT
from .weights import load_pretrained_weights

__all__ = ['ARCH_PRESETS', 'PRETRAINED', 'PretrainedModel', 'SparseViT', 'ViTArch', 'get_arch', 'load_pretrained_weights',
           'timm_kwargs']

if mmseg_available():
    from mmseg.registry import MODELS

    from .pixel_decoder import CheckpointedPixelDecoder  # registers itself; needs mmdet
    from .vit_adapter import SparseViTAdapter  # registers itself; needs mmcv.ops

    MODELS.register_module(module=SparseViT)
    __all__ += ['CheckpointedPixelDecoder', 'SparseViTAdapter']
