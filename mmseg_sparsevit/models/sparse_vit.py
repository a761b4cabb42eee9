"""SparseViT: a timm-compatible plain ViT backbone with windowed sparse attention and token pruning.

The module tree and parameter names equal timm's ``VisionTransformer`` (``cls_token``, ``reg_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``), so UNI-2 and other hub checkpoints load
without renaming. What changes is the attention kernel (dense SDPA, dense explicit "vanilla", or sparse
windows over the patch grid) and that every block receives the patch grid ``(H, W)``.

This file needs only torch, timm and mmengine; ``mmseg_sparsevit.models`` registers the class in mmseg.
"""
from functools import partial
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from mmengine.model import BaseModule
from mmengine.model.weight_init import initialize
from timm.layers import LayerNorm, PatchEmbed, calculate_drop_path_rates, resample_abs_pos_embed, trunc_normal_
from timm.models import named_apply
from timm.models.vision_transformer import init_weights_vit_timm

from .layers import AttnMode, SparseViTBlock
from .presets import MlpKind, get_arch
from .pruning import gather_kept_tokens, num_kept_tokens, select_kept_tokens
from .weights import load_pretrained_weights

GridHW = Tuple[int, int]
FeatureOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class SparseViT(BaseModule):
    """Plain ViT backbone (UNI-2, UNI, Virchow2, ViT-S/B/L) for high-resolution inputs.

    Args:
        arch: Preset name from ``ARCH_PRESETS`` (``'uni2-h'``, ``'uni'``, ``'virchow2'``, ``'vit-s'``, ...).
        img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, mlp_layer, init_values, reg_tokens,
            no_embed_class: Override the preset (``None`` keeps it). ``img_size`` is the pretraining size
            that ``pos_embed`` is stored for; inputs may have any size that is a multiple of the patch.
        attn_mode: ``'dense'`` (all-to-all) or ``'sparse'`` (windowed, ``sparse_attention`` op).
        window_size, neighbourhood, sparse_backend: Passed to ``sparse_attention`` in sparse mode.
        fused_attn: Dense mode kernel: SDPA (True) or the explicit softmax(QK^T)V path (False, "vanilla").
        out_indices: Blocks whose outputs ``forward`` returns as NCHW maps (negative counts from the end).
        final_norm: Keep the final ``norm`` (timm features are normalised): it is applied to the map of
            the last block and in ``extract_features``. False makes it ``nn.Identity`` and checkpoint
            ``norm.*`` keys are ignored (e.g. the adapter, which reads tokens between blocks).
        return_global_tokens: ``forward`` returns ``(map, global_tokens)`` pairs instead of maps.
        token_pruning: Enable attention-guided token pruning in ``extract_features``.
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
            attn_mode: AttnMode = 'dense',
            window_size: int = 8,
            neighbourhood: str = 'block',
            sparse_backend: Optional[str] = None,
            fused_attn: bool = True,
            out_indices: Union[int, Sequence[int]] = -1,
            final_norm: bool = True,
            return_global_tokens: bool = False,
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
            reg_tokens=reg_tokens, no_embed_class=no_embed_class)
        a = self.arch
        self.embed_dim = a.embed_dim
        self.depth = a.depth
        self.num_heads = a.num_heads
        self.patch_size = a.patch_size
        self.num_reg_tokens = a.reg_tokens
        self.num_prefix_tokens = a.num_prefix_tokens
        self.no_embed_class = a.no_embed_class
        self.attn_mode = attn_mode
        self.out_indices = self._resolve_out_indices(out_indices)
        self.return_global_tokens = return_global_tokens
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
        num_pos = self.patch_embed.num_patches + (0 if a.no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, a.embed_dim))
        mlp_cls, act_cls = a.layers()
        drop_path_rates = calculate_drop_path_rates(drop_path_rate, a.depth)
        attn_kwargs = dict(attn_mode=attn_mode, window_size=window_size, neighbourhood=neighbourhood,
                           fused_attn=fused_attn, sparse_backend=sparse_backend)
        self.blocks = nn.ModuleList([
            SparseViTBlock(
                a.embed_dim, a.num_heads, self.num_prefix_tokens, mlp_ratio=a.mlp_ratio, qkv_bias=a.qkv_bias,
                init_values=a.init_values, drop_path=drop_path_rates[i], mlp_layer=mlp_cls, act_layer=act_cls,
                **attn_kwargs)
            for i in range(a.depth)])
        self.norm = LayerNorm(a.embed_dim) if final_norm else nn.Identity()
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

        The position embedding is resampled to the input grid exactly as timm's dynamic-size
        ``_pos_embed`` does; with ``no_embed_class`` the prefix tokens get no position embedding.
        """
        if x.dim() != 4:
            raise ValueError(f'expected an image batch (B, C, H, W), got shape {tuple(x.shape)}')
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f'input size {tuple(x.shape[-2:])} is not a multiple of patch_size={self.patch_size}')
        x = self.patch_embed(x)
        B, H, W, C = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens)
        x = x.view(B, H * W, C)
        prefix = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return x, (H, W)

    def run_block(self, index: int, x: torch.Tensor, grid_hw: GridHW, patch_index: Optional[torch.Tensor] = None,
                  return_global_attn: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Run ``blocks[index]``, checkpointed when gradient checkpointing is on and grads are needed."""
        block = self.blocks[index]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                block, x, grid_hw, patch_index, return_global_attn, use_reentrant=False)
        return block(x, grid_hw, patch_index, return_global_attn)

    def forward_blocks(self, x: torch.Tensor, grid_hw: GridHW, start: int = 0, end: Optional[int] = None,
                       patch_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run ``blocks[start:end]`` on tokens from ``prepare_tokens`` (the adapter runs block groups)."""
        for index in range(start, self.depth if end is None else end):
            x = self.run_block(index, x, grid_hw, patch_index)
        return x

    def tokens_to_map(self, x: torch.Tensor, grid_hw: GridHW) -> torch.Tensor:
        """Drop the CLS and register tokens of (B, G + H*W, C) and reshape the patches to (B, C, H, W)."""
        H, W = grid_hw
        patches = x[:, self.num_prefix_tokens:]
        if patches.shape[1] != H * W:
            raise ValueError(f'{patches.shape[1]} patch tokens do not fill grid {grid_hw} '
                             f'(tokens {tuple(x.shape)}, {self.num_prefix_tokens} prefix tokens)')
        return patches.transpose(1, 2).reshape(x.shape[0], -1, H, W).contiguous()

    def forward(self, x: torch.Tensor, return_global_tokens: Optional[bool] = None) -> Tuple[FeatureOutput, ...]:
        """NCHW feature maps (B, C, H/p, W/p) of the blocks in ``out_indices``.

        With ``return_global_tokens`` each entry is ``(map, global_tokens)`` with global tokens
        (B, 1 + reg_tokens, C). Only blocks up to ``max(out_indices)`` run.
        """
        if self.token_pruning and self.out_indices[-1] >= self.prune_after:
            raise ValueError(
                f'token_pruning removes patch tokens after block {self.prune_after}, so dense feature maps of '
                f'blocks {self.out_indices} do not exist; use extract_features() or token_pruning=False')
        with_global = self.return_global_tokens if return_global_tokens is None else return_global_tokens
        x, grid_hw = self.prepare_tokens(x)
        outs = []
        for index in range(self.out_indices[-1] + 1):
            x = self.run_block(index, x, grid_hw)
            if index in self.out_indices:
                y = self.norm(x) if index == self.depth - 1 else x
                feature_map = self.tokens_to_map(y, grid_hw)
                outs.append((feature_map, y[:, :self.num_prefix_tokens]) if with_global else feature_map)
        return tuple(outs)

    def forward_pruned(self, x: torch.Tensor, grid_hw: GridHW) -> Tuple[torch.Tensor, torch.Tensor]:
        """Blocks with token pruning after ``prune_after``; returns tokens (B, G + K, C) and kept (B, K)."""
        num_patches = grid_hw[0] * grid_hw[1]
        num_keep = num_kept_tokens(num_patches, self.prune_ratio)
        batch_index = torch.arange(num_patches, device=x.device).expand(x.shape[0], -1)
        if num_keep == num_patches:  # nothing to prune: the exact unpruned computation
            return self.forward_blocks(x, grid_hw), batch_index
        x = self.forward_blocks(x, grid_hw, 0, self.prune_after - 1)
        x, global_attn = self.run_block(self.prune_after - 1, x, grid_hw, return_global_attn=True)
        kept = select_kept_tokens(global_attn, num_keep)
        x = gather_kept_tokens(x, kept, self.num_prefix_tokens)
        return self.forward_blocks(x, grid_hw, self.prune_after, patch_index=kept), kept

    def extract_features(self, x: torch.Tensor) -> Dict[str, Union[torch.Tensor, GridHW, None]]:
        """Image-level features after the final norm, with token pruning when enabled.

        Returns ``cls`` (B, C), ``patch_mean`` (B, C) over the surviving patch tokens, ``kept_index``
        (B, K) grid positions of the survivors in row-major order (None without pruning) and ``grid_hw``.
        """
        x, grid_hw = self.prepare_tokens(x)
        kept = None
        if self.token_pruning:
            x, kept = self.forward_pruned(x, grid_hw)
        else:
            x = self.forward_blocks(x, grid_hw)
        x = self.norm(x)
        return dict(cls=x[:, 0], patch_mean=x[:, self.num_prefix_tokens:].mean(dim=1), kept_index=kept,
                    grid_hw=grid_hw)
