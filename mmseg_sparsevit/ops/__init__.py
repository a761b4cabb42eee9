"""Windowed sparse attention (torch only; importing this never pulls in mmseg or mmcv)."""
from .checks import NEIGHBOURHOODS
from .context import reset, set_attention_backend, set_flex_compile_cap
from .dispatch import backend_candidates
from .global_attention import global_attention_probs
from .neighbourhood import TileLayout, tile_layout, window_bounds
from .reference import neighbourhood_mask, sparse_attention_reference, sparse_attention_reference_probs
from .sparse_attention import BACKENDS, SparseAttention, sparse_attention

__all__ = [
    'BACKENDS', 'NEIGHBOURHOODS', 'SparseAttention', 'TileLayout', 'backend_candidates', 'global_attention_probs',
    'neighbourhood_mask', 'reset', 'set_attention_backend', 'set_flex_compile_cap', 'sparse_attention',
    'sparse_attention_reference', 'sparse_attention_reference_probs', 'tile_layout', 'window_bounds'
]
