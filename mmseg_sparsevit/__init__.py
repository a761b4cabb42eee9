"""mmseg_sparsevit: sparse-attention ViT backbones for MMSegmentation 1.x.

Importing the package registers its datasets, transforms, metrics and models with
mmseg's registries (so a config needs only ``custom_imports``), and makes mmengine
checkpoints loadable under torch >= 2.6 (see :mod:`mmseg_sparsevit.checkpoint`).
"""
from .checkpoint import register_safe_globals
from .version import __version__

register_safe_globals()

from . import datasets, evaluation, models, ops  # noqa: E402,F401  (registration side effects)

__all__ = ['__version__', 'datasets', 'evaluation', 'models', 'ops']
