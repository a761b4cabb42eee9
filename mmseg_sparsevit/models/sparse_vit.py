"""SparseViT: a timm-compatible plain ViT backbone with windowed sparse attention and token pruning.

The module tree and parameter names equal timm's ``VisionTransformer`` (``cls_token``, ``reg_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``), so UNI-2 and other hub checkpoints load
without renaming. What changes is the attention kernel (dense SDPA, dense explicit "vanilla", or sparse
windows over the patch grid) and that every block receives the patch grid ``(H, W)``.

This file needs only torch, timm and mmengine; ``mmseg_sparsevit.models`` registers the class in mmseg.
"""
from functools import partial
from typing import List, Literal, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize
from timm.layers import PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models import named_apply
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import init_weights_vit_timm

from mmseg_sparsevit.ops.neighbourhood import Neighbourhood
from mmseg_sparsevit.ops.sparse_attention import Backend

from .layers import AttentionConfig, AttnMode, SparseViTBlock
from .pos_embed import resize_pos_embed
from .presets import GLOBAL_POOLS, GlobalPool, MlpKind, get_arch
from .pruning import num_kept_tokens, prune_tokens
from .weights import load_pretrained_weights

GridHW = Tuple[int, int]
Intermediate = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class TokenFeatures(NamedTuple):
    """Final tokens of ``SparseViT.forward_tokens``, with the grid positions of pruned patch tokens."""

    tokens: torch.Tensor  # (B, G + K, C) after the final norm: [CLS, registers, K patch tokens in grid order]
    grid_hw: GridHW  # patch grid (H, W) of the input
    kept_index: Optional[torch.Tensor]  # (B, K) row-major grid positions of the patch tokens; None: no pruning


def tokens_to_nchw(tokens: torch.Tensor, grid_hw: GridHW, num_prefix_tokens: int) -> torch.Tensor:
    """Drop the CLS and register tokens of (B, G + H*W, C) and reshape the patches to (B, C, H, W)."""
    H, W = grid_hw
    patches = tokens[:, num_prefix_tokens:]
    if patches.shape[1] != H * W:
        raise ValueError(f'{patches.shape[1]} patch tokens do not fill grid {tuple(grid_hw)} '
                         f'(tokens {tuple(tokens.shape)}, {num_prefix_tokens} prefix tokens)')
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, H, W).contiguous()


class SparseViT(BaseModule):
    """Plain ViT backbone (UNI-2, UNI, Virchow2, ViT-S/B/L) for high-resolution inputs.

    Methods follow timm's ``VisionTransformer`` plus mmseg's backbone contract: ``forward(x)`` NCHW maps at
    ``out_indices``; ``forward_features(x)`` final tokens; ``forward_tokens(x)`` the same with the grid and
    the kept positions of pruned tokens (``TokenFeatures``); ``pool(tokens)`` the tile embedding recipe;
    ``forward_intermediates(x, indices, ...)``; ``prepare_tokens`` and ``forward_blocks`` for models that
    run groups of blocks themselves (the ViT-Adapter).

    Args:
        arch: Preset name from ``ARCH_PRESETS`` (``'uni2-h'``, ``'uni'``, ``'virchow2'``, ``'vit-s'``, ...).
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, mlp_layer, init_values, reg_tokens,
            no_embed_class, global_pool: Override the preset (``None`` keeps it). ``img_size`` is the
            pretraining size that ``pos_embed`` is stored for; inputs may have any size that is a multiple
            of the patch. ``global_pool`` is the embedding recipe of ``pool`` (see ``ViTArch``).
        attn_mode: ``'dense'`` (all-to-all) or ``'sparse'`` (windowed, ``ops.SparseAttention``).
        window_size, neighbourhood, sparse_backend: The sparse pattern and backend (``None``: automatic).
        fused_attn: Dense mode kernel: SDPA (True) or the explicit softmax(QK^T)V path (False, "vanilla").
            The five attention arguments form one ``AttentionConfig``, checked here at build time.
        out_indices: Blocks whose outputs ``forward`` returns as NCHW maps (negative counts from the end).
        final_norm: Keep the final ``norm`` (timm features are normalised): it is applied to the map of
            the last block and to the tokens of ``forward_tokens`` / ``forward_features``. False makes it
            ``nn.Identity`` and checkpoint ``norm.*`` keys are ignored (e.g. the adapter, which reads
            tokens between blocks).
        token_pruning: Attention-guided token pruning after block ``prune_after`` (``forward_tokens``,
            ``forward_features``, NLC ``forward_intermediates``); NCHW maps exist only before it.
        prune_ratio: Fraction of patch tokens removed (``floor(ratio * M)``); used when pruning is on.
        prune_after: Prune after this many blocks (1-based, "after the 4th layer" is 4).
        drop_path_rate: Stochastic depth, linearly increasing over blocks as in timm.
        with_cp: Gradient checkpointing of every block (see ``set_grad_checkpointing``).
        frozen: Freeze all ViT parameters and keep the ViT in eval mode (adapter training).
        pretrained: Local timm / hub checkpoint; loaded by ``init_weights`` like
            ``init_cfg=dict(type='Pretrained', checkpoint=path)`` (give only one of the two).
        init_cfg: mmengine init config.
    """

    def __init__(
            self,
            arch: str = 'uni2-h',
            img_size: Optional[int] = None,
            patch_size: Optional[int] = None,
            embed_dim: Optional[int] = None,
            depth: Optional[int] = None,
            num_heads: Optional[int] = None,
            mlp_ratio: Optional[float] = None,
            mlp_layer: Optional[MlpKind] = None,
            init_values: Optional[float] = None,
            reg_tokens: Optional[int] = None,
            no_embed_class: Optional[bool] = None,
            global_pool: Optional[GlobalPool] = None,
            attn_mode: AttnMode = 'dense',
            window_size: int = 8,
            neighbourhood: Neighbourhood = 'block',
            sparse_backend: Optional[Backend] = None,
            fused_attn: bool = True,
            out_indices: Union[int, Sequence[int]] = -1,
            final_norm: bool = True,
            token_pruning: bool = False,
            prune_ratio: float = 0.6,
            prune_after: int = 4,
            drop_path_rate: float = 0.0,
            with_cp: bool = False,
            frozen: bool = False,
            pretrained: Optional[str] = None,
            init_cfg: Optional[Union[dict, List[dict]]] = None,
    ) -> None:
        if pretrained is not None and init_cfg is not None:
            raise ValueError('give either pretrained= or init_cfg=, not both')
        if pretrained is not None:
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.arch = get_arch(
            arch, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, mlp_layer=mlp_layer, init_values=init_values,
            reg_tokens=reg_tokens, no_embed_class=no_embed_class, global_pool=global_pool)
        self.attn_cfg = AttentionConfig(attn_mode=attn_mode, window_size=window_size, neighbourhood=neighbourhood,
                                        sparse_backend=sparse_backend, fused_attn=fused_attn)
        a = self.arch
        self.embed_dim = a.embed_dim
        self.depth = a.depth
        self.num_heads = a.num_heads
        self.patch_size = a.patch_size
        self.num_reg_tokens = a.reg_tokens
        self.num_prefix_tokens = a.num_prefix_tokens
        self.no_embed_class = a.no_embed_class
        self.global_pool = a.global_pool
        self.attn_mode = attn_mode
        self.out_indices = self._resolve_out_indices(out_indices)
        self.token_pruning = token_pruning
        self.prune_ratio = prune_ratio
        self.prune_after = prune_after
        if token_pruning:
            if not 1 <= prune_after < a.depth:
                raise ValueError(f'prune_after must be in [1, depth - 1 = {a.depth - 1}], got {prune_after}')
            num_kept_tokens(1, prune_ratio)  # validates the ratio up front
        self.grad_checkpointing = with_cp
        self.frozen = frozen

        self.patch_embed = PatchEmbed(
            img_size=a.img_size, patch_size=a.patch_size, in_chans=3, embed_dim=a.embed_dim,
            strict_img_size=False, output_fmt='NHWC')
        self.cls_token = nn.Parameter(torch.zeros(1, 1, a.embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, a.reg_tokens, a.embed_dim)) if a.reg_tokens else None
        num_pos = self.patch_embed.num_patches + a.num_pos_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, a.embed_dim))
        mlp_cls, act_cls = a.layers()
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, a.depth)
        self.blocks = nn.ModuleList([
            SparseViTBlock(
                a.embed_dim, a.num_heads, self.num_prefix_tokens, mlp_ratio=a.mlp_ratio, qkv_bias=a.qkv_bias,
                init_values=a.init_values, drop_path=drop_path_rates[i], mlp_layer=mlp_cls, act_layer=act_cls,
                attn_cfg=self.attn_cfg, norm_layer=a.norm_layer())
            for i in range(a.depth)])
        self.norm = a.norm_layer()(a.embed_dim) if final_norm else nn.Identity()
        self._init_timm_weights()
        if frozen:
            self.requires_grad_(False)

    def _resolve_out_indices(self, out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        if not indices:
            raise ValueError('out_indices must name at least one block')
        resolved = []
        for i in indices:
            if not -self.depth <= i < self.depth:
                raise ValueError(f'out_indices entry {i} out of range for depth {self.depth}')
            resolved.append(i % self.depth)
        return tuple(sorted(set(resolved)))

    def _init_timm_weights(self) -> None:
        """Random init following timm's default ViT scheme (used when no checkpoint is loaded)."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        named_apply(partial(init_weights_vit_timm, needs_reset=False), self)

    def init_weights(self) -> None:
        """Apply ``init_cfg``; ``Pretrained`` entries load strictly, with pos-embed resampling, last.

        mmengine's own ``PretrainedInit`` loads non-strictly and cannot read safetensors or resample the
        position embedding, so ``Pretrained`` configs are handled here; other entries go to mmengine's
        ``initialize``. Without any init config the timm initialisation from ``__init__`` is kept.
        """
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        others = [cfg for cfg in cfgs if cfg.get('type') != 'Pretrained']
        if others:
            initialize(self, others)
        for cfg in cfgs:
            if cfg.get('type') == 'Pretrained':
                load_pretrained_weights(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
        self._is_init = True

    def train(self, mode: bool = True) -> 'SparseViT':
        """A frozen ViT stays in eval mode (no drop path) while modules added by subclasses train."""
        super().train(mode)
        if self.frozen:
            for module in (self.patch_embed, self.blocks, self.norm):
                module.eval()
        return self

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token', 'reg_token'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def prepare_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridHW]:
        """Image (B, 3, H*p, W*p) -> tokens (B, G + H*W, C) ``[CLS, registers, patches]`` and grid (H, W).

        The position embedding is resized to the input grid by the arch's rule (``pos_embed_resize``; timm's
        dynamic-size ``_pos_embed`` for timm models) and added to the patches and to the prefix tokens it
        covers (``arch.num_pos_prefix_tokens``: none with ``no_embed_class``, CLS only for DINOv2 with
        registers, else CLS and registers).
        """
        if x.dim() != 4:
            raise ValueError(f'expected an image batch (B, C, H, W), got shape {tuple(x.shape)}')
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f'input size {tuple(x.shape[-2:])} is not a multiple of patch_size={self.patch_size}')
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        num_pos_prefix = self.arch.num_pos_prefix_tokens
        pos_embed = resize_pos_embed(self.pos_embed, (H, W), self.patch_embed.grid_size, num_pos_prefix,
                                     self.arch.pos_embed_resize)
        x = x.view(B, H * W, C) + pos_embed[:, num_pos_prefix:]
        prefix = [self.cls_token, self.reg_token] if self.reg_token is not None else [self.cls_token]
        prefix = torch.cat(prefix, dim=1)
        if num_pos_prefix:
            prefix = torch.cat([prefix[:, :num_pos_prefix] + pos_embed[:, :num_pos_prefix],
                                prefix[:, num_pos_prefix:]], dim=1)
        return torch.cat([prefix.expand(B, -1, -1), x], dim=1), (H, W)

    def forward_blocks(self, x: torch.Tensor, grid_hw: GridHW, start: int = 0, end: Optional[int] = None,
                       patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run ``blocks[start:end]`` on tokens from ``prepare_tokens`` (the adapter runs block groups).

        No pruning step here; ``patch_index`` (B, M) gives the grid positions of already pruned tokens.
        """
        for index in range(start, self.depth if end is None else end):
            x = self._run_block(index, x, grid_hw, patch_index)
        return x

    def _run_block(self, index: int, x: torch.Tensor, grid_hw: GridHW,
                   patch_index: Optional[torch.Tensor]) -> torch.Tensor:
        """``blocks[index]``, checkpointed when gradient checkpointing is on and gradients are needed."""
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, grid_hw, patch_index, use_reentrant=False)
        return block(x, grid_hw, patch_index)

    def _run(self, x: torch.Tensor, grid_hw: GridHW, last: int,
             take: Sequence[int] = ()) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[torch.Tensor]]:
        """Blocks ``0..last`` with the pruning step after block ``prune_after`` when pruning is on.

        Returns the tokens after block ``last``, the kept grid positions (None without pruning) and the
        outputs of the blocks in ``take`` (a block's own output, taken before the pruning step after it).
        """
        kept, patch_index, taken = None, None, []
        for index in range(last + 1):
            block_input = x
            x = self._run_block(index, x, grid_hw, patch_index)
            if index in take:
                taken.append(x)
            if self.token_pruning and index == self.prune_after - 1:
                x, kept, patch_index = prune_tokens(
                    self.blocks[index], block_input, x, self.prune_ratio, self.num_prefix_tokens)
        return x, kept, taken

    def _check_maps_exist(self, indices: Sequence[int]) -> None:
        if self.token_pruning and max(indices) >= self.prune_after:
            raise ValueError(
                f'token_pruning removes patch tokens after block {self.prune_after}, so NCHW feature maps of '
                f'blocks {sorted(indices)} (0-based) do not exist; take blocks below {self.prune_after}, '
                "tokens (forward_tokens, or forward_intermediates with output_fmt='NLC'), or token_pruning=False")

    def forward_tokens(self, x: torch.Tensor) -> TokenFeatures:
        """All blocks (with the pruning step when ``token_pruning``) and the final norm, as ``TokenFeatures``."""
        tokens, grid_hw = self.prepare_tokens(x)
        tokens, kept, _ = self._run(tokens, grid_hw, self.depth - 1)
        return TokenFeatures(self.norm(tokens), grid_hw, kept)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features``: tokens (B, G + K, C) after the final norm (``forward_tokens(x).tokens``)."""
        return self.forward_tokens(x).tokens

    def pool(self, x: torch.Tensor, pool_type: Optional[GlobalPool] = None) -> torch.Tensor:
        """Tile embedding from final tokens (B, G + K, C) by ``pool_type`` (default: the arch's ``global_pool``).

        ``'token'``: CLS (B, C); ``'avg'``: mean of the patch tokens present (B, C); ``'token+avg'``: both
        concatenated (B, 2C). Register tokens are never averaged.
        """
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type not in GLOBAL_POOLS:
            raise ValueError(f'pool_type must be one of {GLOBAL_POOLS}, got {pool_type!r}')
        if pool_type == 'token':
            return x[:, 0]
        patch_mean = x[:, self.num_prefix_tokens:].mean(dim=1)
        return patch_mean if pool_type == 'avg' else torch.cat([x[:, 0], patch_mean], dim=-1)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, Sequence[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: Literal['NCHW', 'NLC'] = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Intermediate], Tuple[torch.Tensor, List[Intermediate]]]:
        """Outputs of the blocks in ``indices``, with the arguments and results of timm's method.

        ``indices``: last n blocks (int), all (None) or these blocks (negative count from the end).
        Intermediates are patch tokens, as NCHW maps or (B, M, C), paired with the prefix tokens
        (B, G, C) when ``return_prefix_tokens``; ``norm`` applies the final norm to them. Unless
        ``intermediates_only`` the final tokens (B, G + K, C) after the norm come first; ``stop_early``
        runs only the blocks up to the last index. With ``token_pruning`` the blocks after
        ``prune_after`` hold only the kept tokens, so they exist as NLC only (their grid positions:
        ``forward_tokens``).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(self.depth, indices)
        if output_fmt == 'NCHW':
            self._check_maps_exist(take)
        tokens, grid_hw = self.prepare_tokens(x)
        tokens, _, taken = self._run(tokens, grid_hw, last if stop_early else self.depth - 1, take)
        G = self.num_prefix_tokens
        intermediates: List[Intermediate] = []
        for y in taken:
            y = self.norm(y) if norm else y
            patches = tokens_to_nchw(y, grid_hw, G) if output_fmt == 'NCHW' else y[:, G:]
            intermediates.append((patches, y[:, :G]) if return_prefix_tokens else patches)
        return intermediates if intermediates_only else (self.norm(tokens), intermediates)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """mmseg backbone contract: NCHW maps (B, C, H/p, W/p) of the blocks in ``out_indices``.

        The final norm is applied to the map of the last block only (timm's normalised features);
        only blocks up to ``max(out_indices)`` run.
        """
        self._check_maps_exist(self.out_indices)
        tokens, grid_hw = self.prepare_tokens(x)
        _, _, taken = self._run(tokens, grid_hw, self.out_indices[-1], self.out_indices)
        return tuple(tokens_to_nchw(self.norm(y) if index == self.depth - 1 else y, grid_hw, self.num_prefix_tokens)
                     for index, y in zip(self.out_indices, taken))
