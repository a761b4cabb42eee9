"""Building blocks of the ViT-Adapter (Chen et al., ICLR 2023) around a plain/sparse ViT.

The adapter keeps two token sets side by side: the ViT's patch tokens on the ViT's own grid
(``H/p x W/p``, p = 14 or 16) and "spatial prior" tokens from a small conv net at strides
8, 16 and 32. An injector lets ViT tokens sample the prior tokens, an extractor lets prior
tokens sample the ViT tokens; both use mmcv's multi-scale deformable attention, so the two
token sets may live on unrelated grids (locations are normalised to [0, 1]).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmcv.ops import MultiScaleDeformableAttention
from timm.layers import DropPath, trunc_normal_

Shape = Tuple[int, int]


@dataclass
class DeformInputs:
    """Where the queries sit and how the values are laid out, for one attention direction."""

    reference_points: torch.Tensor  # (1, num_queries, 1, 2), normalised (x, y)
    spatial_shapes: torch.Tensor  # (num_levels, 2) long, (h, w) per value level
    level_start_index: torch.Tensor  # (num_levels,) long


def reference_points(shapes: Sequence[Shape], device: torch.device) -> torch.Tensor:
    """Pixel-centre locations of every token of ``shapes`` (row-major, levels concatenated).

    Returned as (1, N, 1, 2) with (x, y) in [0, 1]; the singleton level axis broadcasts over
    all value levels inside :class:`MultiScaleDeformableAttention`.
    """
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
        points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(points, dim=0)[None, :, None, :]


def deform_inputs(query_shapes: Sequence[Shape], value_shapes: Sequence[Shape],
                  device: torch.device) -> DeformInputs:
    """Reference points for ``query_shapes`` and the level layout of ``value_shapes``."""
    spatial_shapes = torch.as_tensor(list(value_shapes), dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(dim=1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    return DeformInputs(reference_points(query_shapes, device), spatial_shapes, level_start_index)


def deform_attention(dim: int, num_heads: int, n_levels: int, n_points: int,
                     deform_ratio: float) -> MultiScaleDeformableAttention:
    """mmcv deformable attention in the adapter's setting (batch first, no dropout)."""
    value_dim = int(dim * deform_ratio)
    if value_dim % num_heads:
        raise ValueError(f'deform_ratio={deform_ratio} gives a value width of {value_dim} for '
                         f'embed_dim={dim}, not divisible by deform_num_heads={num_heads}')
    return MultiScaleDeformableAttention(
        embed_dims=dim, num_heads=num_heads, num_levels=n_levels, num_points=n_points,
        dropout=0., batch_first=True, value_proj_ratio=deform_ratio)


def _attend(attn: MultiScaleDeformableAttention, query: torch.Tensor, value: torch.Tensor,
            identity: torch.Tensor, inputs: DeformInputs) -> torch.Tensor:
    return attn(query=query, value=value, identity=identity,
                reference_points=inputs.reference_points, spatial_shapes=inputs.spatial_shapes,
                level_start_index=inputs.level_start_index)


class SpatialPriorModule(nn.Module):
    """Conv stem + three stride-2 stages giving c1 (1/4) and c2..c4 (1/8, 1/16, 1/32).

    Every level is projected to ``embed_dim`` by a 1x1 conv (c1, which only reaches the output, to
    ``c1_channels`` if given). Sizes follow the convolutions (``ceil`` of the stride), so inputs need not be
    multiples of 32.
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 768,
                 norm_cfg: Optional[Dict] = None, c1_channels: Optional[int] = None) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN')

        def conv(c_in: int, c_out: int, stride: int) -> ConvModule:
            return ConvModule(c_in, c_out, 3, stride=stride, padding=1, norm_cfg=norm_cfg)

        self.stem = nn.Sequential(
            conv(3, inplanes, 2), conv(inplanes, inplanes, 1), conv(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        widths = (inplanes, 2 * inplanes, 4 * inplanes, 4 * inplanes)
        self.stages = nn.ModuleList(conv(c_in, c_out, 2) for c_in, c_out in zip(widths, widths[1:]))
        outs = (c1_channels or embed_dim,) + (embed_dim,) * 3
        self.projs = nn.ModuleList(nn.Conv2d(c, out, kernel_size=1) for c, out in zip(widths, outs))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return [proj(f) for proj, f in zip(self.projs, feats)]


class ConvFFN(nn.Module):
    """Token MLP with a depthwise 3x3 conv applied per level (one conv shared by the levels)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, shapes: Sequence[Shape]) -> torch.Tensor:
        x = self.fc1(x)
        levels = x.split([h * w for h, w in shapes], dim=1)
        x = torch.cat([
            self.dwconv(level.transpose(1, 2).unflatten(2, shape)).flatten(2).transpose(1, 2)
            for level, shape in zip(levels, shapes)
        ], dim=1)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class Injector(nn.Module):
    """ViT patch tokens query the spatial-prior tokens: ``x + gamma * attn(LN(x), LN(c))``."""

    def __init__(self, dim: int, num_heads: int, n_points: int = 4, n_levels: int = 3,
                 deform_ratio: float = 1.0, init_values: float = 0.) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = deform_attention(dim, num_heads, n_levels, n_points, deform_ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, inputs: DeformInputs) -> torch.Tensor:
        # mmcv adds ``identity`` itself; the residual must come after the gamma scaling.
        no_residual = x.new_zeros(())
        return x + self.gamma * _attend(self.attn, self.query_norm(x), self.feat_norm(c),
                                        no_residual, inputs)


class Extractor(nn.Module):
    """Spatial-prior tokens query the ViT tokens, then a ConvFFN: ``c + attn; c + FFN(LN(c))``."""

    def __init__(self, dim: int, num_heads: int, n_points: int = 4, deform_ratio: float = 1.0,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, drop: float = 0.,
                 drop_path: float = 0.) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = deform_attention(dim, num_heads, 1, n_points, deform_ratio)
        if with_cffn:
            self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio), drop=drop)
            self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        else:
            self.ffn = None

    def forward(self, c: torch.Tensor, x: torch.Tensor, inputs: DeformInputs,
                c_shapes: Sequence[Shape]) -> torch.Tensor:
        c = _attend(self.attn, self.query_norm(c), self.feat_norm(x), c, inputs)
        if self.ffn is not None:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))
        return c


@dataclass
class InteractionInputs:
    """Per-image geometry shared by every interaction block of one forward pass."""

    grid_hw: Shape  # ViT patch grid
    c_shapes: List[Shape]  # spatial-prior levels (1/8, 1/16, 1/32)
    num_prefix_tokens: int  # CLS + registers, kept out of the adapter's reach
    injector: DeformInputs  # ViT-grid queries over the three prior levels
    extractor: DeformInputs  # prior-level queries over the ViT grid


class InteractionBlock(nn.Module):
    """Injector -> a group of ViT blocks -> extractor (+ optional extra extractors).

    Global tokens (CLS, registers) go through the ViT blocks with the patch tokens but are
    neither changed by the injector nor read by the extractor.
    """

    def __init__(self, dim: int, num_heads: int, n_points: int = 4, init_values: float = 0.,
                 deform_ratio: float = 1.0, with_cffn: bool = True, cffn_ratio: float = 0.25,
                 drop: float = 0., drop_path: float = 0., num_extra_extractors: int = 0) -> None:
        super().__init__()
        self.injector = Injector(dim, num_heads, n_points, n_levels=3, deform_ratio=deform_ratio,
                                 init_values=init_values)
        self.extractors = nn.ModuleList(
            Extractor(dim, num_heads, n_points, deform_ratio=deform_ratio, with_cffn=with_cffn,
                      cffn_ratio=cffn_ratio, drop=drop, drop_path=drop_path)
            for _ in range(1 + num_extra_extractors))

    def forward(self, tokens: torch.Tensor, c: torch.Tensor,
                vit_blocks: Callable[[torch.Tensor], torch.Tensor],
                geo: InteractionInputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """``vit_blocks`` runs this group's ViT blocks on the full token sequence."""
        prefix, x = tokens.split([geo.num_prefix_tokens, tokens.shape[1] - geo.num_prefix_tokens],
                                 dim=1)
        tokens = vit_blocks(torch.cat((prefix, self.injector(x, c, geo.injector)), dim=1))
        x = tokens[:, geo.num_prefix_tokens:]
        for extractor in self.extractors:
            c = extractor(c, x, geo.extractor, geo.c_shapes)
        return tokens, c


def init_adapter_weights(module: nn.Module) -> None:
    """ViT-Adapter's init for its own layers; mmcv's deformable attention keeps its own init."""
    if isinstance(module, MultiScaleDeformableAttention):
        return
    for m in module.children():
        init_adapter_weights(m)
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0., (2.0 / (fan_out // module.groups)) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
