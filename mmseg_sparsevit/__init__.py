"""mmseg_sparsevit: sparse-attention ViT backbones for MMSegmentation 1.x.

Importing the package registers its datasets, transforms, metrics and models with
mmseg's registries (so a config needs only ``custom_imports``), and makes mmengine
checkpoints loadable under torch >= 2.6 (see :mod:`mmseg_sparsevit.checkpoint`).

Where MMSegmentation / mmcv cannot be imported (e.g. a GPU machine with only torch, timm and
mmengine, used to benchmark the backbone), the package says so with a warning and offers its
torch-level parts only: ``ops``, ``SparseViT`` (``models``), ``benchmark`` and ``classification``; nothing
is registered (:mod:`mmseg_sparsevit.openmmlab` says whether the stack imports).
"""
import warnings

from .checkpoint import register_safe_globals
from .openmmlab import mmseg_import_error
from .version import __version__

register_safe_globals()

MMSEG_AVAILABLE = mmseg_import_error() is None
if not MMSEG_AVAILABLE:
    warnings.warn(
        f'mmseg_sparsevit: MMSegmentation with mmcv ops is not importable ({mmseg_import_error()}); only the '
        'torch-level parts (mmseg_sparsevit.ops, SparseViT, mmseg_sparsevit.benchmark, '
        'mmseg_sparsevit.classification) are usable and nothing is registered with mmseg. '
        'Run `make env` for the full plugin.', stacklevel=2)

from . import models, ops  # noqa: E402  (models registers itself when mmseg is available)
from . import engine  # noqa: E402,F401  (AtomicCheckpointHook, CPUDistributedDataParallel; mmengine only)

if MMSEG_AVAILABLE:
    from . import datasets, evaluation  # noqa: E402,F401  (registration side effects)

__all__ = ['MMSEG_AVAILABLE', '__version__', 'models', 'ops']
