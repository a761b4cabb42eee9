"""Mask2Former's pixel decoder with its deformable encoder layers recomputed in the backward pass.

With the ViT blocks and the adapter interactions checkpointed, the pixel decoder holds the largest share of the
activations a SegPath train step keeps for backward (its six deformable-attention layers run over the stride
8-32 maps; docs/segpath_experiments.md). mmdet's own switch for this (``encoder.num_cp``) needs fairscale, an
archived project; this one uses ``torch.utils.checkpoint`` (non-reentrant, so autocast and keyword arguments
are replayed as they were). Parameter names are mmdet's, so weights load either way, and the forward pass and
the gradients are the plain decoder's (``tests/test_memory_levers.py``).
"""
from typing import Any

import torch
from mmdet.models.layers import MSDeformAttnPixelDecoder
from mmdet.models.layers.transformer import Mask2FormerTransformerEncoder
from mmseg.registry import MODELS
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class CheckpointedEncoder(Mask2FormerTransformerEncoder):
    """mmdet's pixel-decoder encoder, each layer run under ``checkpoint`` while gradients are recorded."""

    def forward(self, query: Tensor, **kwargs: Any) -> Tensor:
        for layer in self.layers:
            if torch.is_grad_enabled():
                query = checkpoint(layer, query=query, use_reentrant=False, **kwargs)
            else:
                query = layer(query=query, **kwargs)
        return query


@MODELS.register_module()
class CheckpointedPixelDecoder(MSDeformAttnPixelDecoder):
    """``mmdet.MSDeformAttnPixelDecoder`` (same arguments, same weights) with :class:`CheckpointedEncoder`.

    Memory lever ``decoder-cp``: ``model.decode_head.pixel_decoder.type='CheckpointedPixelDecoder'``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # mmdet builds its encoder by class name inside __init__; changing the class of that one instance (the
        # subclass adds a forward, no state) keeps its layers, so the same seed gives the plain decoder's weights.
        self.encoder.__class__ = CheckpointedEncoder
