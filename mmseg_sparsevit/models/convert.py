"""Hugging Face ``transformers`` ViT / DINOv2 state dicts -> timm layout, key by key.

Phikon (``ViTModel``), Phikon-v2 (``Dinov2Model``) and Hibou (DINOv2 with registers) publish their weights in
``transformers``' layout: separate ``query`` / ``key`` / ``value`` projections, ``layernorm_before`` or
``norm1``, ``layer_scale1.lambda1``, ``embeddings.position_embeddings``. SparseViT keeps timm's names, so such a
checkpoint is renamed here, with the three projections concatenated into timm's ``qkv`` (rows in q, k, v
order). Keys no rule knows are passed through unchanged so that the strict loader names them; the mask token
(masked-image-modelling pretraining) and the pooler head are not part of the backbone and are dropped.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

PATCH_PROJECTION = 'embeddings.patch_embeddings.projection.weight'
TOP_LEVEL = {
    'embeddings.cls_token': 'cls_token',
    'embeddings.register_tokens': 'reg_token',
    'embeddings.position_embeddings': 'pos_embed',
    'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    'layernorm.weight': 'norm.weight',
    'layernorm.bias': 'norm.bias',
}
# Not part of a feature backbone: dropped (and reported).
DROPPED = ('embeddings.mask_token', 'pooler.')
# Block submodule (after ``encoder.layer.N.``) -> timm submodule (after ``blocks.N.``), ViT and DINOv2 names.
BLOCK_RENAMES = {
    'layernorm_before': 'norm1', 'norm1': 'norm1',
    'attention.output.dense': 'attn.proj',
    'layernorm_after': 'norm2', 'norm2': 'norm2',
    'intermediate.dense': 'mlp.fc1', 'output.dense': 'mlp.fc2',
    'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
    'mlp.weights_in': 'mlp.fc1', 'mlp.weights_out': 'mlp.fc2',
}
LAYER_SCALE = re.compile(r'^layer_scale([12])\.lambda1$')
QKV = re.compile(r'^attention\.attention\.(query|key|value)\.(weight|bias)$')
BLOCK = re.compile(r'^encoder\.layer\.(\d+)\.(.+)$')


def transformers_prefix(state: StateDict) -> Optional[str]:
    """The key prefix of a ``transformers``-layout ViT in ``state`` (``''``, ``'vit.'``, ...), or None for timm."""
    for key in state:
        if key.endswith(PATCH_PROJECTION):
            return key[:-len(PATCH_PROJECTION)]
    return None


def _rename_block_key(rest: str) -> Optional[str]:
    """timm name (after ``blocks.N.``) of one block key (after ``encoder.layer.N.``), or None if unknown."""
    match = LAYER_SCALE.match(rest)
    if match:
        return f'ls{match[1]}.gamma'
    module, _, param = rest.rpartition('.')
    renamed = BLOCK_RENAMES.get(module)
    return f'{renamed}.{param}' if renamed else None


def transformers_to_timm(state: StateDict, prefix: str = '') -> Tuple[StateDict, List[str]]:
    """Rename a ``transformers`` ViT / DINOv2 state dict (keys under ``prefix``) to timm's layout.

    Returns the converted state dict and the sorted list of dropped keys. Keys outside ``prefix`` and keys no
    rule knows keep their names (the strict loader reports them); a block with some but not all of
    ``query`` / ``key`` / ``value`` raises a KeyError naming the block and the missing parts.
    """
    out: StateDict = {}
    dropped: List[str] = []
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        name = key[len(prefix):]
        if name.startswith(DROPPED):
            dropped.append(key)
        elif name in TOP_LEVEL:
            out[TOP_LEVEL[name]] = value
        elif BLOCK.match(name):
            index, rest = BLOCK.match(name).groups()
            part = QKV.match(rest)
            if part:
                qkv.setdefault((index, part[2]), {})[part[1]] = value
                continue
            renamed = _rename_block_key(rest)
            out[f'blocks.{index}.{renamed}' if renamed else key] = value
        else:
            out[key] = value
    for (index, param), parts in sorted(qkv.items()):
        missing = [p for p in ('query', 'key', 'value') if p not in parts]
        if missing:
            raise KeyError(f'encoder.layer.{index} has the attention {param} of {sorted(parts)} but not of {missing}; '
                           f'cannot build blocks.{index}.attn.qkv.{param}')
        out[f'blocks.{index}.attn.qkv.{param}'] = torch.cat([parts['query'], parts['key'], parts['value']], dim=0)
    return out, sorted(dropped)


def to_timm_layout(state: StateDict) -> Tuple[StateDict, List[str]]:
    """``state`` in timm's layout: converted when it is a ``transformers`` checkpoint, else unchanged.

    Returns the state dict and the keys dropped by the conversion (empty for timm checkpoints).
    """
    prefix = transformers_prefix(state)
    if prefix is None:
        return state, []
    return transformers_to_timm(state, prefix)
