"""Loading timm / hub ViT state dicts (``pytorch_model.bin``, ``.pth``, ``.safetensors``) into SparseViT.

SparseViT keeps timm's parameter names, so loading is a plain strict ``load_state_dict`` after three
stateless adaptations: unwrap training containers, strip an optional key prefix and drop a classifier
head or switched-off final norm, and resample ``pos_embed`` with timm's ``resample_abs_pos_embed`` when the checkpoint was stored
for a different grid than the model's ``img_size``.
"""
import math
import os
from typing import Dict, Optional

import torch
import torch.nn as nn
from mmengine.logging import print_log
from timm.layers import resample_abs_pos_embed

StateDict = Dict[str, torch.Tensor]

CONTAINER_KEYS = ('state_dict', 'model')
# Modules a backbone may lack (classifier head, or a final norm switched off with ``final_norm=False``
# or replaced by ``nn.Identity``): their checkpoint keys are dropped when the model has none under them.
OPTIONAL_PREFIXES = ('head.', 'fc_norm.', 'norm.')


def read_state_dict(path: str) -> StateDict:
    """Read a state dict from ``path`` without unpickling arbitrary objects (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'pretrained weights file not found: {path}')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path, device='cpu')
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    while isinstance(state, dict):
        container = next((k for k in CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
        if container is None:
            break
        state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f'{path} does not hold a state dict of tensors (looked inside {CONTAINER_KEYS})')
    return state


def resample_pos_embed_for(model: nn.Module, pos_embed: torch.Tensor, path: str = '<state dict>') -> torch.Tensor:
    """Resample a checkpoint ``pos_embed`` (1, L, C) to ``model.pos_embed``'s grid (square grids only)."""
    target = model.pos_embed
    if pos_embed.shape == target.shape:
        return pos_embed
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    num_old = pos_embed.shape[1] - num_prefix
    side = math.isqrt(max(num_old, 0))
    if pos_embed.dim() != 3 or side * side != num_old or pos_embed.shape[-1] != target.shape[-1]:
        raise ValueError(
            f'{path}: pos_embed of shape {tuple(pos_embed.shape)} cannot be resampled to '
            f'{tuple(target.shape)} ({num_prefix} prefix positions, square grid expected)')
    new_size = model.patch_embed.grid_size
    print_log(f'{path}: resampling pos_embed from grid {(side, side)} to {tuple(new_size)}', logger='current')
    return resample_abs_pos_embed(pos_embed, new_size=new_size, old_size=(side, side), num_prefix_tokens=num_prefix)


def adapt_state_dict(state: StateDict, model: nn.Module, prefix: Optional[str] = None,
                     path: str = '<state dict>') -> StateDict:
    """Checkpoint filter: select ``prefix``, drop keys of absent optional modules, resample ``pos_embed``."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f'{path}: no keys start with prefix {prefix!r}')
    own = model.state_dict()
    absent = tuple(p for p in OPTIONAL_PREFIXES if not any(k.startswith(p) for k in own))
    dropped = sorted(k for k in state if k.startswith(absent)) if absent else []
    if dropped:
        print_log(f'{path}: ignoring keys of modules the backbone does not have: {dropped}', logger='current')
    state = {k: v for k, v in state.items() if k not in dropped}
    if 'pos_embed' in state and getattr(model, 'pos_embed', None) is not None:
        state['pos_embed'] = resample_pos_embed_for(model, state['pos_embed'], path)
    return state


def check_state_dict(state: StateDict, model: nn.Module, path: str = '<state dict>') -> None:
    """Raise one error listing every missing, unexpected and wrongly shaped key, naming ``path``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise KeyError(
            f'{path} does not match {type(model).__name__}: missing keys {missing}; unexpected keys '
            f'{unexpected}; shape mismatches {mismatched}. Check arch / reg_tokens / no_embed_class.')


def load_pretrained_weights(model: nn.Module, path: str, prefix: Optional[str] = None) -> None:
    """Strictly load the timm / hub checkpoint at ``path`` into ``model`` (a SparseViT)."""
    state = adapt_state_dict(read_state_dict(path), model, prefix=prefix, path=path)
    check_state_dict(state, model, path)
    model.load_state_dict(state, strict=True)
    print_log(f'loaded pretrained weights from {path}', logger='current')
