"""mmseg_sparsevit: sparse-attention ViT backbones for MMSegmentation 1.x.

Importing the package registers its datasets, transforms, metrics and models with
mmseg's registries (so a config needs only ``custom_imports``), and makes mmengine
checkpoints loadable under torch >= 2.6 (see :mod:`mmseg_sparsevit.checkpoint`).

Where MMSegmentation / mmcv cannot be imported (e.g. a GPU machine with only torch, timm and
mmengine, used to benchmark the backbone), the package says so with a warning and offers its
torch-level parts only: ``ops``, ``SparseViT`` (``models``) and ``benchmark``; nothing is registered.
"""
import warnings

from .checkpoint import register_safe_globals
from .version import __version__

register_safe_globals()

try:
    import mmcv.ops  # noqa: F401  (mmseg imports it unguarded; mmcv-lite is not enough)
    import mmseg  # noqa: F401
except ImportError as err:
    MMSEG_AVAILABLE = False
    warnings.warn(
        f'mmseg_sparsevit: MMSegmentation with mmcv ops is not importable ({err}); only the torch-level '
        'parts (mmseg_sparsevit.ops, SparseViT, mmseg_sparsevit.benchmark) are usable and nothing is '
        'registered with mmseg. Run `make env` for the full plugin.', stacklevel=2)
else:
    MMSEG_AVAILABLE = True

from . import models, ops  # noqa: E402  (models registers itself when mmseg is available)

if MMSEG_AVAILABLE:
    from . import datasets, evaluation  # noqa: E402,F401  (registration side effects)

__all__ = ['MMSEG_AVAILABLE', '__version__', 'models', 'ops']
