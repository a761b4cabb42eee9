"""Loading timm / hub ViT state dicts (``pytorch_model.bin``, ``.pth``, ``.safetensors``) into SparseViT.

SparseViT keeps timm's parameter names, so loading is a plain strict ``load_state_dict`` after stateless
adaptations: resolve a hub name (``hf-hub:org/name``, :mod:`.hub`) to a cached file, unwrap training
containers, strip an optional key prefix, rename a ``transformers``-layout checkpoint to timm's (:mod:`.convert`),
drop a classifier head or switched-off final norm, and resample ``pos_embed`` when the checkpoint was stored for
a different grid than the model's ``img_size``.
"""
import math
import os
import pickle
from typing import Dict, Optional

import torch
import torch.nn as nn
from mmengine.logging import print_log

from .convert import to_timm_layout
from .hub import download_weights, is_hub_name, parse_hub_name
from .pos_embed import resize_pos_embed
from .presets import preset_for_hub_id

StateDict = Dict[str, torch.Tensor]

CONTAINER_KEYS = ('state_dict', 'model')
# Modules a backbone may lack (classifier head, or a final norm switched off with ``final_norm=False``
# or replaced by ``nn.Identity``): their checkpoint keys are dropped when the model has none under them.
OPTIONAL_PREFIXES = ('head.', 'fc_norm.', 'norm.')


def _load_file(path: str):
    """The raw object in ``path``; a damaged file raises a ValueError that names it.

    torch.load and safetensors raise many types on damaged bytes (EOFError on an empty file, RuntimeError on a
    truncated zip, IndexError or UnpicklingError on garbage, SafetensorError on a bad header), all turned into
    one message; a pickle of objects other than tensors stays an UnpicklingError (refused, not damaged).
    """
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if 'Unsupported global' in str(error):
            raise pickle.UnpicklingError(f'{path}: refused to unpickle objects other than tensors ({error})') from None
        failure: Exception = error
    except Exception as error:  # noqa: BLE001  (see docstring: any parse failure means a damaged file)
        failure = error
    raise ValueError(f'{path} ({os.path.getsize(path)} bytes): cannot read weights ({type(failure).__name__}: '
                     f'{str(failure) or "no detail"}); the file is empty, truncated or not a checkpoint; download '
                     'it again') from failure


def read_state_dict(path: str) -> StateDict:
    """Read a state dict from ``path`` without unpickling arbitrary objects (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'pretrained weights file not found: {path}')
    state = _load_file(path)
    while isinstance(state, dict):
        container = next((k for k in CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
        if container is None:
            break
        state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f'{path} does not hold a state dict of tensors (looked inside {CONTAINER_KEYS})')
    return state


def resample_pos_embed_for(model: nn.Module, pos_embed: torch.Tensor, path: str = '<state dict>') -> torch.Tensor:
    """Resample a checkpoint ``pos_embed`` (1, L, C) to ``model.pos_embed``'s grid (square grids only).

    Uses the model's own resize rule (``arch.pos_embed_resize``) and prefix positions (``arch``), timm's for a
    model without ``arch``.
    """
    target = model.pos_embed
    if pos_embed.shape == target.shape:
        return pos_embed
    arch = getattr(model, 'arch', None)
    if arch is not None:
        num_prefix, mode = arch.num_pos_prefix_tokens, arch.pos_embed_resize
    else:
        num_prefix, mode = (0 if model.no_embed_class else model.num_prefix_tokens), 'timm'
    num_old = pos_embed.shape[1] - num_prefix
    side = math.isqrt(max(num_old, 0))
    if pos_embed.dim() != 3 or side * side != num_old or pos_embed.shape[-1] != target.shape[-1]:
        raise ValueError(
            f'{path}: pos_embed of shape {tuple(pos_embed.shape)} cannot be resampled to '
            f'{tuple(target.shape)} ({num_prefix} prefix positions, square grid expected)')
    new_size = model.patch_embed.grid_size
    print_log(f'{path}: resampling pos_embed from grid {(side, side)} to {tuple(new_size)}', logger='current')
    return resize_pos_embed(pos_embed, new_size, (side, side), num_prefix, mode)


def adapt_state_dict(state: StateDict, model: nn.Module, prefix: Optional[str] = None,
                     path: str = '<state dict>') -> StateDict:
    """Checkpoint filter: select ``prefix``, rename a ``transformers`` layout to timm's, drop keys of absent
    optional modules, resample ``pos_embed``."""
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f'{path}: no keys start with prefix {prefix!r}')
    state, converted_away = to_timm_layout(state)
    if converted_away:
        print_log(f'{path}: transformers checkpoint renamed to timm layout; ignoring {converted_away}',
                  logger='current')
    own = model.state_dict()
    absent = tuple(p for p in OPTIONAL_PREFIXES if not any(k.startswith(p) for k in own))
    dropped = sorted(k for k in state if k.startswith(absent)) if absent else []
    if dropped:
        print_log(f'{path}: ignoring keys of modules the backbone does not have: {dropped}', logger='current')
    state = {k: v for k, v in state.items() if k not in dropped}
    if 'pos_embed' in state and getattr(model, 'pos_embed', None) is not None:
        state['pos_embed'] = resample_pos_embed_for(model, state['pos_embed'], path)
    return state


def check_state_dict(state: StateDict, model: nn.Module, path: str = '<state dict>', hint: str = '') -> None:
    """Raise one error listing every missing, unexpected and wrongly shaped key, naming ``path``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise KeyError(
            f'{path} does not match {type(model).__name__}: missing keys {missing}; unexpected keys '
            f'{unexpected}; shape mismatches {mismatched}. {hint or "Check arch / reg_tokens / no_embed_class."}')


def load_pretrained_weights(model: nn.Module, checkpoint: str, prefix: Optional[str] = None) -> None:
    """Strictly load ``checkpoint`` into ``model`` (a SparseViT): a local timm / ``transformers`` file, or hub
    weights named ``hf-hub:<org>/<name>`` (downloaded once into the Hugging Face cache)."""
    hint = ''
    path = checkpoint
    if is_hub_name(checkpoint):
        path = download_weights(checkpoint)
        preset = preset_for_hub_id(parse_hub_name(checkpoint)[0])
        if preset:
            hint = f"{checkpoint} is the weights of arch='{preset}': build the model with that preset."
    state = adapt_state_dict(read_state_dict(path), model, prefix=prefix, path=path)
    check_state_dict(state, model, path, hint)
    model.load_state_dict(state, strict=True)
    print_log(f'loaded pretrained weights from {checkpoint}', logger='current')
