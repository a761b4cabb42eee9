"""Time and peak memory of SparseViT forwards, one fresh process per point (CPU RSS / CUDA allocator peak).

``measure_point(model_kwargs, size, settings)`` takes any SparseViT arguments; ``MeasureSettings`` says on
which device, at which precision (``PRECISIONS``) and how often. ``tools/benchmark_backbone.py`` and the
classification sweep are thin users of this package. Registers nothing.
"""
from .measure import (MODES, PRECISIONS, MeasureSettings, describe_precision, largest_fitting_side, measure_point,
                      mode_kwargs, resolved_arch)
from .report import growth_ratios, machine_info, markdown, mode_ratios, write_reports

__all__ = [
    'MODES', 'PRECISIONS', 'MeasureSettings', 'describe_precision', 'largest_fitting_side', 'measure_point',
    'mode_kwargs', 'resolved_arch', 'growth_ratios', 'machine_info', 'markdown', 'mode_ratios', 'write_reports'
]
