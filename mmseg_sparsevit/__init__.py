"""mmseg_sparsevit: sparse-attention ViT backbones for MMSegmentation 1.x.

Importing the package registers its datasets, transforms, metrics and models with
mmseg's registries, and makes mmengine checkpoints loadable under torch >= 2.6.
"""
from .checkpoint import register_safe_globals
from .version import __version__

register_safe_globals()

__all__ = ['__version__']
