"""Time and peak memory of SparseViT forwards and of the attention op, one fresh process per point (CPU RSS /
CUDA allocator peak).

``measure_point(model_kwargs, size, settings)`` takes any SparseViT arguments (``models.modes.mode_kwargs`` makes
them for an attention mode); ``MeasureSettings`` says on which device, at which precision
(``models.modes.PRECISIONS``) and how often. The op benchmark is :mod:`.attention` (not imported here: it is also
its own worker module). ``tools/benchmark_backbone.py``, ``tools/benchmark_attention.py`` and the classification
sweep are thin users of this package. Registers nothing.
"""
from .measure import MeasureSettings, largest_fitting_side, measure_point, resolved_arch
from .report import growth_ratios, machine_info, markdown, mode_ratios, write_reports

__all__ = [
    'MeasureSettings', 'largest_fitting_side', 'measure_point', 'resolved_arch', 'growth_ratios', 'machine_info',
    'markdown', 'mode_ratios', 'write_reports'
]
