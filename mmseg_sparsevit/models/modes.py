"""How a SparseViT forward runs: the attention modes and the precisions the whole package speaks.

One name each, used by the backbone and op benchmarks, feature extraction, the sweeps and the config
generator:

* attention modes, and the ``SparseViT`` arguments that make each one (``mode_kwargs``), with the one rule of
  which other arguments act in which mode;
* precisions: the dtype of weights and input, and the ``torch.autocast`` dtype of the forward.

Torch only (no mmseg / mmcv), like the ops.
"""
from typing import Any, Dict, Mapping, NamedTuple, Optional

import torch

# Attention mode -> the SparseViT switches that make it. ``vanilla`` is timm's non-fused path (the full
# softmax(QK^T) matrix is materialised, the paper's "vanilla" attention), ``dense`` is all-to-all attention through
# ``scaled_dot_product_attention``, ``sparse`` the windowed sparse attention op, ``sparse+prune`` adds
# attention-guided token pruning.
ATTENTION_MODES: Dict[str, Dict[str, Any]] = {
    'vanilla': dict(attn_mode='dense', fused_attn=False, token_pruning=False),
    'dense': dict(attn_mode='dense', fused_attn=True, token_pruning=False),
    'sparse': dict(attn_mode='sparse', token_pruning=False),
    'sparse+prune': dict(attn_mode='sparse', token_pruning=True),
}
SPARSE_MODES = tuple(m for m, switches in ATTENTION_MODES.items() if switches['attn_mode'] == 'sparse')
DENSE_ONLY = ('fused_attn',)
SPARSE_ONLY = ('window_size', 'neighbourhood', 'sparse_backend')
PRUNING_ONLY = ('prune_ratio', 'prune_after')


def check_mode(mode: str) -> str:
    """``mode`` itself, or a ValueError naming the known modes."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f'attention mode must be one of {list(ATTENTION_MODES)}, got {mode!r}')
    return mode


def is_sparse(mode: str) -> bool:
    """Whether the mode uses the windowed sparse attention op (window options act)."""
    return ATTENTION_MODES[check_mode(mode)]['attn_mode'] == 'sparse'


def is_pruned(mode: str) -> bool:
    """Whether the mode prunes tokens (pruning options act)."""
    return ATTENTION_MODES[check_mode(mode)]['token_pruning']


def mode_kwargs(base: Mapping[str, Any], mode: str) -> Dict[str, Any]:
    """SparseViT arguments for ``mode``: its switches, then ``base`` without the options the mode does not use
    (window options outside sparse modes, pruning options without pruning, the dense kernel choice in sparse
    modes), so that a recorded or generated config says only what acts."""
    switches = ATTENTION_MODES[check_mode(mode)]
    unused = ((SPARSE_ONLY if not is_sparse(mode) else DENSE_ONLY)
              + (PRUNING_ONLY if not is_pruned(mode) else ()))
    return dict(switches, **{k: v for k, v in base.items() if k not in switches and k not in unused})


class Precision(NamedTuple):
    """Dtype of the weights and the input, and the ``torch.autocast`` dtype of the forward (None: none)."""

    weights: torch.dtype
    autocast: Optional[torch.dtype]


# ``amp-*`` keeps fp32 weights and autocasts the forward (as feature extraction does); ``bf16`` / ``fp16`` cast
# the model itself.
PRECISIONS: Dict[str, Precision] = {
    'fp32': Precision(torch.float32, None),
    'amp-bf16': Precision(torch.float32, torch.bfloat16),
    'amp-fp16': Precision(torch.float32, torch.float16),
    'bf16': Precision(torch.bfloat16, None),
    'fp16': Precision(torch.float16, None),
}
# ``auto``: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere.
AUTO_PRECISION = 'auto'
_SHORT = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}


def check_precision(precision: str) -> str:
    """``precision`` itself, or a ValueError naming the known precisions."""
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {list(PRECISIONS)}, got {precision!r}')
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """A ``PRECISIONS`` name: ``precision`` itself, or what ``'auto'`` means on ``device``."""
    if precision != AUTO_PRECISION:
        return check_precision(precision)
    if torch.device(device).type != 'cuda':
        return 'fp32'
    return 'amp-bf16' if torch.cuda.is_bf16_supported() else 'amp-fp16'


def describe_precision(precision: str) -> str:
    """Human-readable precision, e.g. ``'fp32 weights, bf16 autocast'``, for tables and logs."""
    weights, amp = PRECISIONS[check_precision(precision)]
    return f'{_SHORT[weights]} weights, ' + (f'{_SHORT[amp]} autocast' if amp else 'no autocast')


def autocast(precision: str, device_type: str) -> torch.autocast:
    """The ``torch.autocast`` context of ``precision`` on a device type (disabled when it has no autocast)."""
    amp = PRECISIONS[check_precision(precision)].autocast
    return torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None)
