"""FlexAttention backend: the sparse pattern as a block mask, compiled into a fused kernel.

Patch tokens are laid out tile-major (one window_size x window_size tile after another, empty slots
where the grid ends or tokens were pruned), followed by the global keys.  In that order the pattern is
block-sparse, so a ``BlockMask`` built directly from tile adjacency (never from an N x N mask) lets
the compiled kernel skip all far-away key blocks; ``mask_mod`` makes the kept blocks exact.  Global
query rows are computed densely beside it (G rows).
"""
import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..context import FLEX_COMPILE_CAP_ENV, context, log_once
from ..neighbourhood import Neighbourhood, TileLayout, tile_layout, tile_query_bounds, window_bounds
from .base import AttentionBackend, BackendRefusedError
from .global_rows import global_rows

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = flex_attention = None

FLEX_BLOCK_SIZE = 64  # kernel block; 64 matches an 8 x 8 tile, the paper's window
# torch.compile arguments the compile cap needs (torch 2.14 has them; without them flex is not used)
_CAPPED_COMPILE = {'recompile_limit', 'isolate_recompiles'} <= set(
    inspect.signature(torch.compile).parameters)


class FlexNotCompiledError(BackendRefusedError):
    """Compiled flex cannot take this input (compile cap reached, or torch.compile would skip it), and
    calling it anyway would run FlexAttention eagerly, materialising ``num_scores`` scores."""

    def __init__(self, reason: str, num_scores: int) -> None:
        super().__init__(reason)
        self.num_scores = num_scores


def why_not(q: Tensor, k: Tensor, v: Tensor, automatic: bool,
            num_slots: Optional[int] = None) -> Optional[str]:
    """Why the compiled flex path cannot (or, when ``automatic``, should not) run; None if it can.

    ``num_slots`` (default: the tokens of ``q``) is the size the kernel runs over: grid cells + global
    tokens, pruned or not, since pruned tokens are empty slots of the same compiled graph."""
    if flex_attention is None:
        return 'torch has no flex_attention'
    if not _CAPPED_COMPILE:
        return 'torch.compile takes no recompile_limit / isolate_recompiles (torch too old)'
    if q.device.type not in ('cpu', 'cuda'):
        return f'device type {q.device.type!r} unsupported'
    if q.device.type == 'cpu':
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return 'needs no grad on CPU (no CPU backward kernel)'
        num_slots = q.shape[2] if num_slots is None else num_slots
        if automatic and num_slots < context.flex_min_tokens_cpu:
            return f'{num_slots} tokens < {context.flex_min_tokens_cpu} on CPU, compile time not repaid'
    return None


def compile_failures() -> tuple[type[BaseException], ...]:
    """Errors meaning torch.compile cannot build the flex kernel in this process: inductor or its C++ /
    Triton toolchain failed (dynamo wraps them in ``BackendCompilerFailed``, of which ``InductorError`` is
    a subclass).  Imported when an error is raised: importing dynamo takes seconds."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError, GPUTooOldForTriton, InvalidCxxCompiler, TritonMissing
    return BackendCompilerFailed, InvalidCxxCompiler, CppCompileError, TritonMissing, GPUTooOldForTriton


@dataclass
class _Structure:
    """Everything about the block mask that depends only on (grid, G, window, pattern, device)."""
    needed: Tensor  # (q blocks, kv blocks) kernel block pairs holding any visible key
    q_bounds: tuple[Tensor, Tensor, Tensor, Tensor]  # (P,) each: lo_r, hi_r, lo_c, hi_c per query slot
    kv_rc: tuple[Tensor, Tensor]  # (P + G,) key coordinates (may lie past the grid); -1 for globals
    num_slots: int  # P; keys from here on are global


def _tile_adjacency(length: int, tile: int, num_tiles: int, window_size: int,
                    neighbourhood: Neighbourhood, device: torch.device) -> Tensor:
    """(tiles, tiles) along one axis: can any query of tile i see any key of tile j."""
    lo, hi = tile_query_bounds(length, tile, num_tiles, window_size, neighbourhood, device)
    start = torch.arange(num_tiles, device=device) * tile
    end = (start + tile).clamp(max=length)
    return (lo.amin(1)[:, None] < end[None]) & (start[None] < hi.amax(1)[:, None])


def _block_membership(num_slots: int, tile: int, length: int, device: torch.device) -> Tensor:
    """(kernel blocks over ``length`` indices, tiles) bool: which tiles' slots a kernel block holds."""
    slots = torch.arange(num_slots, device=device)
    member = torch.zeros(-(-length // FLEX_BLOCK_SIZE), num_slots // tile, dtype=torch.bool, device=device)
    member[slots // FLEX_BLOCK_SIZE, slots // tile] = True
    return member


def _structure(layout: TileLayout, num_global: int, window_size: int,
               neighbourhood: Neighbourhood) -> _Structure:
    (height, width), (th, tw), (nth, ntw) = layout.grid_hw, layout.tile_hw, layout.tiles_hw
    device = layout.pos_token.device
    num_slots = layout.num_tiles * layout.tile_size
    adj_r = _tile_adjacency(height, th, nth, window_size, neighbourhood, device)
    adj_c = _tile_adjacency(width, tw, ntw, window_size, neighbourhood, device)
    tile_adj = (adj_r[:, None, :, None] & adj_c[None, :, None, :]).reshape(layout.num_tiles, -1)
    q_member = _block_membership(num_slots, layout.tile_size, num_slots, device).float()
    kv_member = _block_membership(num_slots, layout.tile_size, num_slots + num_global, device).float()
    needed = (q_member @ tile_adj.float() @ kv_member.T) > 0
    if num_global:
        needed[:, num_slots // FLEX_BLOCK_SIZE:] = True  # kernel blocks holding global keys

    slot_r, slot_c = layout.slot_rc
    pad = slot_r.new_full((num_global, ), -1)
    lo_r, hi_r = window_bounds(slot_r.clamp(max=height - 1), height, window_size, neighbourhood)
    lo_c, hi_c = window_bounds(slot_c.clamp(max=width - 1), width, window_size, neighbourhood)
    return _Structure(needed=needed, q_bounds=(lo_r, hi_r, lo_c, hi_c),
                      kv_rc=(torch.cat([slot_r, pad]), torch.cat([slot_c, pad])), num_slots=num_slots)


def _mask_mod(structure: _Structure, kv_present: Tensor) -> Callable:
    """``mask_mod`` admitting present keys inside the query's window, and global keys.
    ``kv_present`` is (B', P + G); B' = 1 broadcasts over the batch.  Absent keys get row -1, which no
    window contains, so the kernel does six table look-ups per score and no dependent ones."""
    lo_r, hi_r, lo_c, hi_c = structure.q_bounds
    kv_c, num_slots = structure.kv_rc[1], structure.num_slots
    kv_r = torch.where(kv_present, structure.kv_rc[0], -1)
    per_sample = kv_present.shape[0] > 1

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        kr, kc = kv_r[b if per_sample else 0, kv_idx], kv_c[kv_idx]
        inside = (lo_r[q_idx] <= kr) & (kr < hi_r[q_idx]) & (lo_c[q_idx] <= kc) & (kc < hi_c[q_idx])
        return inside | (kv_idx >= num_slots)

    return mask_mod


def _full_blocks(mask_mod: Callable, needed: Tensor, num_queries: int, num_keys: int,
                 chunk: int = 256) -> Tensor:
    """Needed block pairs in which ``mask_mod`` admits every pair, so the kernel can skip evaluating it.
    Evaluated in chunks of block pairs: O(chunk * block^2) memory, once per cached structure."""
    q_blocks, kv_blocks = needed.nonzero(as_tuple=True)
    offsets = torch.arange(FLEX_BLOCK_SIZE, device=needed.device)
    full = torch.zeros_like(needed)
    for i in range(0, len(q_blocks), chunk):
        q_idx = q_blocks[i:i + chunk, None] * FLEX_BLOCK_SIZE + offsets
        kv_idx = kv_blocks[i:i + chunk, None] * FLEX_BLOCK_SIZE + offsets
        in_range = (q_idx < num_queries).all(1) & (kv_idx < num_keys).all(1)
        admitted = mask_mod(0, 0, q_idx.clamp(max=num_queries - 1)[:, :, None],
                            kv_idx.clamp(max=num_keys - 1)[:, None, :])
        full[q_blocks[i:i + chunk], kv_blocks[i:i + chunk]] = in_range & admitted.flatten(1).all(1)
    return full


def _kv_blocks(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """(q blocks, kv blocks) bool -> BlockMask's (1, 1, q blocks) counts and (1, 1, q, kv) indices."""
    indices = torch.argsort((~pairs).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return pairs.sum(-1, dtype=torch.int32)[None, None], indices[None, None]


def _block_mask(layout: TileLayout, num_global: int, window_size: int, neighbourhood: Neighbourhood,
                kv_present: Tensor, pruned: bool) -> 'BlockMask':
    """Block mask for this call.  Without pruning it is cached (``context.block_masks``, least recently
    used dropped) per (grid, G, window, pattern, device) and marks fully visible block pairs, so interior
    tiles run without ``mask_mod``."""
    key = (layout.grid_hw, num_global, window_size, neighbourhood, kv_present.device)
    if not pruned and key in context.block_masks:
        return context.block_masks.get(key)
    structure = _structure(layout, num_global, window_size, neighbourhood)
    mask_mod = _mask_mod(structure, kv_present)
    seq_lengths = (structure.num_slots, kv_present.shape[1])
    full = torch.zeros_like(structure.needed) if pruned else _full_blocks(mask_mod, structure.needed,
                                                                         *seq_lengths)
    block_mask = BlockMask.from_kv_blocks(*_kv_blocks(structure.needed & ~full), *_kv_blocks(full),
                                          BLOCK_SIZE=FLEX_BLOCK_SIZE, mask_mod=mask_mod,
                                          seq_lengths=seq_lengths)
    if not pruned:
        context.block_masks.put(key, block_mask)
    return block_mask


def _take_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B, h, N, d) at token ``index`` (B' , L) -> (B, h, L, d)."""
    if index.shape[0] == 1:
        return x.index_select(2, index[0])
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _compiled_flex(cap: int) -> Callable:
    """``flex_attention`` compiled in its own region (other compiles of it do not count against the cap)
    with ``recompile_limit=cap``.  ``fullgraph=True`` makes dynamo raise at the limit, or on a graph
    break, instead of running flex eagerly.  ``dynamic=False``: one static graph per input shape; on
    CPU in torch 2.14 inductor fails to compile (C++ errors) the flex kernel with ``dynamic=True``, and
    with automatic dynamic shapes once the batch of the pruning validity table varies."""
    backend = context.flex_compile_backend
    if context.flex_compiled is None or context.flex_compiled[:2] != (cap, backend):
        context.flex_refused.clear()
        context.flex_compiled = (cap, backend, torch.compile(flex_attention, fullgraph=True, dynamic=False,
                                                             backend=backend, recompile_limit=cap,
                                                             isolate_recompiles=True))
    return context.flex_compiled[2]


def _signature(q_s: Tensor, k_s: Tensor, v_s: Tensor, kv_batch: int, scale: float) -> tuple:
    """What a compiled graph may be specialised on.  Finer than dynamo's guards on purpose: a refused
    signature must never match an input dynamo would accept."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_s, k_s, v_s))
    return (q_s.shape, k_s.shape, v_s.shape, q_s.dtype, q_s.device, kv_batch, scale, grad,
            torch.is_autocast_enabled(q_s.device.type))


def _run_compiled(q_s: Tensor, k_s: Tensor, v_s: Tensor, block_mask: 'BlockMask', scale: float,
                  kv_batch: int) -> Tensor:
    """Compiled flex, or ``FlexNotCompiledError`` wherever dynamo would fall back to eager."""
    from torch._dynamo import config as dynamo_config  # imported on first use: ~1 s
    from torch._dynamo.exc import FailOnRecompileLimitHit
    num_scores = q_s.shape[0] * q_s.shape[1] * q_s.shape[2] * k_s.shape[2]
    if dynamo_config.disable:
        raise FlexNotCompiledError('torch.compile is disabled (TORCH_COMPILE_DISABLE)', num_scores)
    if is_in_torch_dispatch_mode(include_infra_modes=False):
        raise FlexNotCompiledError('a TorchDispatchMode is active, under which torch.compile does not run',
                                   num_scores)
    cap = context.compile_cap()
    compiled = _compiled_flex(cap)
    signature = _signature(q_s, k_s, v_s, kv_batch, scale)
    reason = (f'the flex compile cap of {cap} compiled graphs is reached (raise it with '
              f'set_flex_compile_cap(n) or {FLEX_COMPILE_CAP_ENV}=n)')
    if signature in context.flex_refused:
        raise FlexNotCompiledError(reason, num_scores)
    try:
        return compiled(q_s, k_s, v_s, block_mask=block_mask, scale=scale)
    except FailOnRecompileLimitHit as err:
        context.flex_refused.add(signature)
        raise FlexNotCompiledError(reason, num_scores) from err


def flex_attention_backend(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
                           window_size: int, neighbourhood: Neighbourhood,
                           patch_index: Optional[Tensor], scale: float,
                           compiled: bool = True) -> Tensor:
    """Sparse attention on validated arguments, (B, heads, G + M, dv).

    Raises ``FlexNotCompiledError`` instead of ever running flex eagerly by accident.  ``compiled=False``
    runs FlexAttention eagerly, which materialises the full score matrix: only for tests on small inputs
    and for small requested calls past the compile cap (``_run`` checks ``context.flex_eager_max_scores``).
    Every call is counted in ``context.flex_runs`` ('compiled', 'uncompiled', 'refused').
    """
    layout = tile_layout(grid_hw, num_global, window_size, patch_index, q.device)
    global_ids = torch.arange(num_global, device=q.device).expand(layout.slot_token.shape[0], -1)
    kv_token = torch.cat([layout.slot_token, global_ids], dim=1)
    kv_present = torch.cat([layout.slot_valid, torch.ones_like(global_ids, dtype=torch.bool)], dim=1)
    block_mask = _block_mask(layout, num_global, window_size, neighbourhood, kv_present,
                             pruned=patch_index is not None)

    q_s, k_s, v_s = _take_tokens(q, layout.slot_token), _take_tokens(k, kv_token), _take_tokens(v, kv_token)
    if compiled:
        try:
            out = _run_compiled(q_s, k_s, v_s, block_mask, scale, kv_present.shape[0])
        except FlexNotCompiledError:
            context.flex_runs['refused'] += 1
            raise
        context.flex_runs['compiled'] += 1
    else:
        context.flex_runs['uncompiled'] += 1
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='flex_attention called without torch.compile')
            out = flex_attention(q_s, k_s, v_s, block_mask=block_mask, scale=scale)
    patch_out = _take_tokens(out, layout.token_slot)
    return torch.cat([global_rows(q, k, v, num_global, scale), patch_out], dim=2)


def _run(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int, window_size: int,
         neighbourhood: Neighbourhood, patch_index: Optional[Tensor], scale: float,
         automatic: bool) -> Tensor:
    """Compiled flex.  Where it cannot compile, an automatic call is refused (never run eagerly: O(N^2)
    memory); a requested call runs uncompiled only while its dense scores are small, else it raises."""
    args = (q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    try:
        return flex_attention_backend(*args)
    except FlexNotCompiledError as err:
        if automatic:
            raise
        limit = context.flex_eager_max_scores
        if err.num_scores > limit:
            raise RuntimeError(
                f'sparse_attention backend "flex" was requested but cannot run compiled: {err.reason}; running '
                f'it uncompiled would materialise {err.num_scores} attention scores (limit '
                f'context.flex_eager_max_scores = {limit}). Use backend="gather" for this input.') from err
        log_once(logging.INFO, 'sparse_attention: using the flex backend (%s; small inputs run uncompiled)',
                 err.reason)
        return flex_attention_backend(*args, compiled=False)


BACKEND = AttentionBackend(run=_run, why_not=why_not, failures=compile_failures)
