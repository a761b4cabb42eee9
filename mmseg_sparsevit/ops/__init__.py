"""Windowed sparse attention (torch only; importing this never pulls in mmseg or mmcv)."""
from .backends.flex import set_flex_compile_cap
from .global_attention import global_attention_probs
from .neighbourhood import TileLayout, tile_layout, window_bounds
from .reference import neighbourhood_mask, sparse_attention_reference
from .sparse_attention import SparseAttention, select_backend, set_attention_backend, sparse_attention

__all__ = [
    'SparseAttention', 'TileLayout', 'global_attention_probs', 'neighbourhood_mask', 'select_backend',
    'set_attention_backend', 'set_flex_compile_cap', 'sparse_attention', 'sparse_attention_reference', 'tile_layout',
    'window_bounds'
]
