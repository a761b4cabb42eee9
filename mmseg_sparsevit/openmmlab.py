"""Whether MMSegmentation with mmcv's compiled ops can be imported.

The torch-level parts (ops, SparseViT, benchmark, classification) work without it, e.g. on a GPU machine
that has only torch, timm and mmengine; registering with mmseg's registries needs it. The package root
(for its warning) and :mod:`mmseg_sparsevit.models` (for the registration) both ask here, so neither
depends on the other having run first.
"""
import functools
from typing import Optional


@functools.lru_cache(maxsize=None)
def mmseg_import_error() -> Optional[ImportError]:
    """``None`` when ``mmcv.ops`` and ``mmseg`` import, else the ``ImportError`` (tried once per process)."""
    try:
        import mmcv.ops  # noqa: F401  (mmseg imports it unguarded; mmcv-lite is not enough)
        import mmseg  # noqa: F401
    except ImportError as err:
        return err
    return None


def mmseg_available() -> bool:
    """True when mmseg and mmcv ops import, so components can be registered."""
    return mmseg_import_error() is None
