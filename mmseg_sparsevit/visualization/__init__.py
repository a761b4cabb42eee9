"""Figures of what SparseViT does: the allowed-attention pattern of the sparse op and the tokens pruning keeps."""
from .sparsity import (attention_pattern_figure, kept_patch_tokens, pruned_tokens_figure, pruned_tokens_image,
                       query_keys_image, synthetic_tile)

__all__ = ['attention_pattern_figure', 'kept_patch_tokens', 'pruned_tokens_figure', 'pruned_tokens_image',
           'query_keys_image', 'synthetic_tile']
