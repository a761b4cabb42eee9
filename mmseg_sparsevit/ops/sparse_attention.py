"""Public windowed sparse attention: argument checks, backend choice, dispatch.

Patch tokens on an H x W grid attend to a local 2-D neighbourhood plus all global tokens; global
tokens (CLS + registers) attend to everything.  This is the BigBird / Longformer recipe (local window +
global tokens) laid out in 2-D like NATTEN, with token pruning handled through ``patch_index``.
"""
import logging
import os
from typing import Literal, Optional, Union

from torch import Tensor, nn

from .backends import flex
from .backends.gather import gather_attention
from .checks import check_args
from .neighbourhood import Neighbourhood

Backend = Literal['gather', 'flex']
BACKENDS = ('gather', 'flex')
BACKEND_ENV = 'SPARSEVIT_ATTN_BACKEND'

logger = logging.getLogger(__name__)
_forced_backend: Optional[str] = None
_logged_choices: set[tuple[str, tuple[str, ...]]] = set()


def _check_backend(name: str, value: Optional[str]) -> None:
    if value is not None and value not in BACKENDS:
        raise ValueError(f'{name} must be None or one of {BACKENDS}, got {value!r}')


def set_attention_backend(backend: Optional[Backend]) -> None:
    """Force ``backend`` for calls that pass none (None restores the automatic choice).

    The ``SPARSEVIT_ATTN_BACKEND`` environment variable does the same without code changes; this
    function takes precedence over it.
    """
    global _forced_backend
    _check_backend('backend', backend)
    _forced_backend = backend


def _log_once(choice: str, reasons: tuple[str, ...]) -> None:
    if (choice, reasons) not in _logged_choices:
        _logged_choices.add((choice, reasons))
        why = f' ({"; ".join(reasons)})' if reasons else ''
        logger.info('sparse_attention: using the %s backend%s', choice, why)


def _requested_backend(backend: Optional[str]) -> Optional[str]:
    _check_backend('backend', backend)
    requested = backend or _forced_backend
    if requested is None:
        requested = os.environ.get(BACKEND_ENV) or None
        _check_backend(f'environment variable {BACKEND_ENV}', requested)
    return requested


def select_backend(q: Tensor, k: Tensor, v: Tensor, backend: Optional[Backend] = None,
                   grid_hw: Optional[tuple[int, int]] = None, num_global: int = 0) -> Backend:
    """Resolve the backend: explicit argument, then ``set_attention_backend``, then the environment
    variable, then the fastest path that accepts these inputs.  A requested backend that cannot run
    raises instead of silently falling back.

    With ``grid_hw`` the size rule counts the whole grid (+ ``num_global``), not the tokens present:
    a pruned call then takes the same backend as the unpruned call on that grid, and on flex it
    reuses that call's compiled graph (its memory is the unpruned call's, below gather's)."""
    requested = _requested_backend(backend)
    if requested == 'flex':
        reason = flex.why_not(q, k, v, automatic=False)
        if reason is not None:
            raise RuntimeError(f'sparse_attention backend "flex" was requested but cannot run: {reason}')
    if requested is not None:
        _log_once(requested, ('requested',))
        return requested
    num_slots = None if grid_hw is None else grid_hw[0] * grid_hw[1] + num_global
    reason = flex.why_not(q, k, v, automatic=True, num_slots=num_slots)
    if reason is None:
        _log_once('flex', ())
        return 'flex'
    _log_once('gather', (f'flex: {reason}', ))
    return 'gather'


def _uncompiled_flex_fallback(err: flex.FlexNotCompiledError, args: tuple,
                              requested: bool) -> tuple[Tensor, Tensor]:
    """Compiled flex refused this input.  Never let the automatic choice run eager flex (O(N^2)
    memory): it takes gather.  A requested flex runs eagerly only while its dense scores are small."""
    if not requested:
        _log_once('gather', (f'flex: {err.reason}', ))
        return gather_attention(*args)
    if err.num_scores > flex.FLEX_EAGER_MAX_SCORES:
        raise RuntimeError(
            f'sparse_attention backend "flex" was requested but cannot run compiled: {err.reason}; running '
            f'it uncompiled would materialise {err.num_scores} attention scores (limit '
            f'FLEX_EAGER_MAX_SCORES = {flex.FLEX_EAGER_MAX_SCORES}). Use backend="gather" for this input.'
        ) from err
    _log_once('flex', (f'{err.reason}; small inputs run uncompiled', ))
    return flex.flex_attention_backend(*args, compiled=False)


def sparse_attention(
        q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
        window_size: int = 8, neighbourhood: Neighbourhood = 'block',
        patch_index: Optional[Tensor] = None, return_global_attn: bool = False,
        scale: Optional[float] = None,
        backend: Optional[Backend] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Windowed sparse attention of ``q`` over ``k``/``v``, each (B, heads, G + M, head_dim).

    The first ``num_global`` tokens are global; the other M are patches on the row-major ``grid_hw``
    grid, or at the positions ``patch_index`` (B, M) when tokens were pruned.  A patch attends to the
    present patches of its neighbourhood ('block': its window_size block and the 8 around it;
    'sliding': the window_size x window_size window centred on it, shifted inward at borders) and to
    all global tokens; a global token attends to all tokens.  ``return_global_attn`` also returns the
    global tokens' softmax probabilities over the patch tokens (B, heads, G, M), from the same pass.
    """
    check_args(q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    if not isinstance(return_global_attn, bool):
        raise TypeError(f'return_global_attn must be a bool, got {return_global_attn!r}')
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    args = (q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    if select_backend(q, k, v, backend, grid_hw, num_global) == 'flex':
        requested = _requested_backend(backend) is not None
        try:
            out, global_attn = flex.flex_attention_backend(*args)
        except flex.FlexNotCompiledError as err:
            out, global_attn = _uncompiled_flex_fallback(err, args, requested)
        except Exception as err:  # e.g. no C++ compiler for inductor: degrade only if chosen for you
            if requested:
                raise
            flex.failure = f'failed earlier with {type(err).__name__}: {err}'
            logger.warning('sparse_attention: flex backend %s; using gather from now on', flex.failure)
            out, global_attn = gather_attention(*args)
    else:
        out, global_attn = gather_attention(*args)
    return (out, global_attn) if return_global_attn else out


class SparseAttention(nn.Module):
    """Module wrapper holding the pattern settings, for attention layers that prefer a submodule."""

    def __init__(self, window_size: int = 8, neighbourhood: Neighbourhood = 'block',
                 backend: Optional[Backend] = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.neighbourhood = neighbourhood
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
                patch_index: Optional[Tensor] = None,
                return_global_attn: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        return sparse_attention(q, k, v, grid_hw, num_global, self.window_size, self.neighbourhood,
                                patch_index=patch_index, return_global_attn=return_global_attn,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return (f'window_size={self.window_size}, neighbourhood={self.neighbourhood!r}, '
                f'backend={self.backend!r}')
