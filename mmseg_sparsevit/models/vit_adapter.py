"""ViT-Adapter (Chen et al., ICLR 2023) around :class:`SparseViT`, for dense prediction heads.

The plain ViT gives one feature map at its patch stride; segmentation heads such as
Mask2Former want a pyramid at strides 4/8/16/32. The adapter adds a conv "spatial prior"
branch and lets it exchange information with the ViT through deformable attention between
groups of ViT blocks, without changing the ViT (so pretrained weights, and the ViT's sparse
windowed attention, are used as they are).

Differences from the original implementation, on purpose:
* the ViT level of the deformable attention is the ViT's own patch grid (``H/14`` for UNI-2),
  not an assumed ``H/16``; prior levels follow the conv strides (``ceil``), so inputs only
  need to be multiples of the patch size;
* the global tokens (CLS + registers) stay in the sequence through every ViT block; the
  injector and extractor only touch patch tokens.
"""
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch.utils.checkpoint import checkpoint

from .adapter_modules import (InteractionBlock, InteractionInputs, SpatialPriorModule,
                              deform_inputs, init_adapter_weights)
from .sparse_vit import SparseViT

STRIDES = (4, 8, 16, 32)


def even_interaction_indexes(depth: int, num_interactions: int = 4) -> List[List[int]]:
    """``[[first, last], ...]`` block groups splitting ``depth`` blocks as evenly as possible.

    depth 12 -> [[0, 2], [3, 5], [6, 8], [9, 11]], depth 24 -> [[0, 5], ..., [18, 23]], as in
    ViT-Adapter's B and L settings.
    """
    if not 1 <= num_interactions <= depth:
        raise ValueError(f'num_interactions must be in [1, depth={depth}], got {num_interactions}')
    bounds = [round(i * depth / num_interactions) for i in range(num_interactions + 1)]
    return [[start, end - 1] for start, end in zip(bounds, bounds[1:])]


def check_interaction_indexes(indexes: Sequence[Sequence[int]], depth: int) -> None:
    """Groups must be ``[first, last]`` pairs that run through all ``depth`` blocks in order."""
    expected_start = 0
    for group in indexes:
        if len(group) != 2 or group[0] != expected_start or group[1] < group[0]:
            raise ValueError(
                f'interaction_indexes={list(map(list, indexes))} must be consecutive [first, last] '
                f'block groups covering blocks 0..{depth - 1}; group {list(group)} should start '
                f'at block {expected_start}')
        expected_start = group[1] + 1
    if expected_start != depth:
        raise ValueError(f'interaction_indexes={list(map(list, indexes))} end at block '
                         f'{expected_start - 1}, but the ViT has {depth} blocks')


def _reject_vit_options(vit_cfg: Dict) -> None:
    """Options of SparseViT that cannot work under the adapter, refused up front."""
    if vit_cfg.get('token_pruning') or vit_cfg.get('prune_ratio'):
        raise ValueError(
            'SparseViTAdapter: token pruning (vit_cfg token_pruning='
            f"{vit_cfg.get('token_pruning')!r}, prune_ratio={vit_cfg.get('prune_ratio')!r}) drops "
            'patch tokens, but dense prediction needs the full patch grid; disable it')


@MODELS.register_module()
class SparseViTAdapter(BaseModule):
    """SparseViT + ViT-Adapter returning four maps at strides 4, 8, 16, 32, ``embed_dim`` wide (or ``out_channels``).

    Args:
        vit_cfg: keyword arguments of :class:`SparseViT` (``arch``, ``attn_mode``,
            ``window_size``, ``pretrained``, ``drop_path_rate``, explicit dims, ...). Token
            pruning is refused. ``drop_path_rate`` is also used in the extractors' ConvFFN.
        conv_inplane: width of the spatial prior stem (64 in ViT-Adapter).
        n_points: sampling points per head and level of the deformable attention.
        deform_num_heads: heads of the deformable attention; ``None`` = the ViT's heads.
        deform_ratio: value width of the deformable attention relative to ``embed_dim``.
        init_values: initial injector gamma (0 starts with the ViT's own features).
        interaction_indexes: ``[[first, last], ...]`` ViT block groups, one interaction each;
            ``None`` = ``num_interactions`` even groups.
        with_cffn / cffn_ratio: ConvFFN after each extractor, hidden ``embed_dim * cffn_ratio``.
        use_extra_extractor: two more extractors after the last group.
        add_vit_feature: add each group's ViT map, resized to the four strides.
        norm_cfg: norm of the spatial prior convs and of the four outputs (SyncBN in configs).
        with_cp: gradient checkpointing of every interaction (injector, ViT blocks, extractor).
        freeze_vit: keep the ViT's weights fixed (SparseViT ``frozen``: no gradients, blocks in
            eval mode); the adapter and the head train. ``vit_cfg['frozen']`` means the same.
        out_channels: width of the four output maps; ``None`` = ``embed_dim`` (ViT-Adapter). A narrower width
            is a memory lever that changes the model: the stride-4 prior ``c1`` and the up-convolution are built
            at this width, the three interaction levels and the four ViT maps get 1x1 projections (the ViT maps
            are projected on the ViT grid, before resizing), so no ``embed_dim``-wide map exists above the ViT
            grid's resolution outside the interactions. The head's ``in_channels`` must match.
    """

    def __init__(self,
                 vit_cfg: Dict,
                 conv_inplane: int = 64,
                 n_points: int = 4,
                 deform_num_heads: Optional[int] = None,
                 deform_ratio: float = 0.5,
                 init_values: float = 0.,
                 interaction_indexes: Optional[Sequence[Sequence[int]]] = None,
                 num_interactions: int = 4,
                 with_cffn: bool = True,
                 cffn_ratio: float = 0.25,
                 use_extra_extractor: bool = True,
                 add_vit_feature: bool = True,
                 norm_cfg: Optional[Dict] = None,
                 with_cp: bool = False,
                 freeze_vit: bool = False,
                 out_channels: Optional[int] = None,
                 init_cfg: Optional[Dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        _reject_vit_options(vit_cfg)
        self.freeze_vit = freeze_vit or bool(vit_cfg.get('frozen', False))
        # The adapter reads tokens between blocks, never after the final norm: without it every
        # parameter gets a gradient (DDP needs no find_unused_parameters). A frozen SparseViT
        # still passes gradients through to the injectors; only its own weights stay fixed.
        self.vit = SparseViT(**{**vit_cfg, 'frozen': self.freeze_vit, 'final_norm': False})

        dim = self.vit.embed_dim
        depth = len(self.vit.blocks)
        if interaction_indexes is None:
            interaction_indexes = even_interaction_indexes(depth, num_interactions)
        check_interaction_indexes(interaction_indexes, depth)
        if add_vit_feature and len(interaction_indexes) != len(STRIDES):
            raise ValueError(f'add_vit_feature=True adds one ViT map per output stride, so it needs '
                             f'{len(STRIDES)} interactions, got {len(interaction_indexes)}')
        self.interaction_indexes = [list(group) for group in interaction_indexes]
        self.add_vit_feature = add_vit_feature
        self.with_cp = with_cp
        norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)
        deform_num_heads = deform_num_heads or self.vit.num_heads

        out = out_channels or dim
        self.out_channels = out
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim, norm_cfg=norm_cfg, c1_channels=out)
        last = len(self.interaction_indexes) - 1
        self.interactions = nn.ModuleList(
            InteractionBlock(
                dim, deform_num_heads, n_points, init_values=init_values,
                deform_ratio=deform_ratio, with_cffn=with_cffn, cffn_ratio=cffn_ratio,
                drop_path=vit_cfg.get('drop_path_rate', 0.),
                num_extra_extractors=2 if (use_extra_extractor and i == last) else 0)
            for i in range(len(self.interaction_indexes)))
        self.up = nn.ConvTranspose2d(dim, out, 2, 2)
        narrow = out != dim
        # Narrow outputs: 1x1 projections of the interaction levels (strides 8-32) and of the ViT maps.
        self.level_projs = nn.ModuleList(nn.Conv2d(dim, out, 1) for _ in STRIDES[1:]) if narrow else None
        self.vit_projs = nn.ModuleList(nn.Conv2d(dim, out, 1) for _ in STRIDES) if narrow and add_vit_feature else None
        self.out_norms = nn.ModuleList(build_norm_layer(norm_cfg, out)[1] for _ in STRIDES)

        for module in (self.spm, self.interactions, self.up, self.level_projs, self.vit_projs):
            if module is not None:
                init_adapter_weights(module)
        nn.init.normal_(self.level_embed)

    def _check_input(self, x: torch.Tensor) -> None:
        patch = self.vit.patch_size
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f'SparseViTAdapter expects (B, 3, H, W) images, got shape {tuple(x.shape)}')
        if x.shape[2] % patch or x.shape[3] % patch:
            raise ValueError(
                f'SparseViTAdapter: input shape {tuple(x.shape)} has H={x.shape[2]}, W={x.shape[3]} '
                f'not divisible by the ViT patch size {patch}; pad or resize the batch '
                f'(e.g. SegDataPreProcessor(size_divisor={patch}, test_cfg=dict(size_divisor={patch})))')

    def _interact(self, layer: InteractionBlock, first: int, last: int, tokens: torch.Tensor,
                  c: torch.Tensor, geo: InteractionInputs) -> Tuple[torch.Tensor, torch.Tensor]:
        # forward_blocks keeps the ViT's own per-block checkpointing (vit_cfg with_cp) working.
        vit_blocks = partial(self.vit.forward_blocks, grid_hw=geo.grid_hw, start=first, end=last + 1)
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(layer, tokens, c, vit_blocks, geo, use_reentrant=False)
        return layer(tokens, c, vit_blocks, geo)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        self._check_input(x)
        c1, *priors = self.spm(x)
        c_shapes = [tuple(p.shape[-2:]) for p in priors]
        c = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i]
                       for i, p in enumerate(priors)], dim=1)

        tokens, grid_hw = self.vit.prepare_tokens(x)
        grid_hw = tuple(grid_hw)
        geo = InteractionInputs(
            grid_hw=grid_hw, c_shapes=c_shapes, num_prefix_tokens=self.vit.num_prefix_tokens,
            injector=deform_inputs([grid_hw], c_shapes, x.device),
            extractor=deform_inputs(c_shapes, [grid_hw], x.device))

        vit_maps = []
        for layer, (first, last) in zip(self.interactions, self.interaction_indexes):
            tokens, c = self._interact(layer, first, last, tokens, c, geo)
            patches = tokens[:, geo.num_prefix_tokens:]
            vit_maps.append(patches.transpose(1, 2).unflatten(2, grid_hw))

        levels = [level.transpose(1, 2).unflatten(2, shape) for level, shape in
                  zip(c.split([h * w for h, w in c_shapes], dim=1), c_shapes)]
        # c1 is at ceil(H/4); 2 * ceil(H/8) may be one larger, so crop the upsampled c2.
        maps = [c1 + self.up(levels[0])[..., :c1.shape[2], :c1.shape[3]]]
        maps += levels if self.level_projs is None else [proj(m) for proj, m in zip(self.level_projs, levels)]
        if self.vit_projs is not None:  # a 1x1 conv commutes with bilinear resizing: project on the small grid
            vit_maps = [proj(v) for proj, v in zip(self.vit_projs, vit_maps)]
        if self.add_vit_feature:
            maps = [m + F.interpolate(v, size=m.shape[-2:], mode='bilinear', align_corners=False)
                    for m, v in zip(maps, vit_maps)]
        return tuple(norm(m) for norm, m in zip(self.out_norms, maps))
