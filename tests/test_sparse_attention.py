"""Windowed sparse attention: geometry, every backend against the dense reference, dispatch, checks.

The reference (dense boolean mask + softmax) is the source of truth; its geometry is itself checked
against brute-force loops written here independently.  Flex runs eagerly (unfused, small shapes) in
the sweep; one clearly marked test compiles it (~20 s cold on 2 CPU cores); the compile-cap tests let
dynamo hand its graphs to the cheap 'eager' backend.
"""
import ast
import contextlib
import functools
import importlib
import importlib.util
import json
import logging
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from mmseg_sparsevit.ops import (SparseAttention, global_attention_probs, neighbourhood_mask, select_backend,
                                 set_attention_backend, set_flex_compile_cap, sparse_attention,
                                 sparse_attention_reference, tile_layout, window_bounds)
from mmseg_sparsevit.ops.backends import flex
from mmseg_sparsevit.ops.backends import gather
from mmseg_sparsevit.ops.backends.gather import gather_attention
from mmseg_sparsevit.ops.sparse_attention import BACKEND_ENV

needs_flex = pytest.mark.skipif(flex.flex_attention is None, reason='torch has no flex_attention')


def _flex_eager(*args):
    return flex.flex_attention_backend(*args, compiled=False)


BACKENDS = {'gather': gather_attention, 'flex': pytest.param(_flex_eager, marks=needs_flex)}


# ---------------------------------------------------------------- geometry, by brute force ----------
def _brute_bounds(pos: int, length: int, w: int, neighbourhood: str) -> tuple[int, int]:
    if neighbourhood == 'block':
        keys = [k for k in range(length) if abs(k // w - pos // w) <= 1]
        return keys[0], keys[-1] + 1
    start = max(min(pos - w // 2, length - w), 0)
    return start, min(start + w, length)


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_window_bounds_match_brute_force(neighbourhood):
    for length in range(1, 14):
        for w in range(1, 10):
            lo, hi = window_bounds(torch.arange(length), length, w, neighbourhood)
            expected = [_brute_bounds(p, length, w, neighbourhood) for p in range(length)]
            assert list(zip(lo.tolist(), hi.tolist())) == expected, (length, w)


def test_sliding_window_clamps_inward_like_natten():
    lo, hi = window_bounds(torch.arange(10), 10, 4, 'sliding')
    assert lo.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 6]
    assert ((hi - lo) == 4).all()  # always a full window when the axis is long enough


def test_pruned_mask_is_full_mask_restricted_to_kept_tokens():
    grid, num_global = (7, 9), 2
    keep = torch.tensor([[0, 3, 4, 10, 11, 30, 31, 40, 62], [1, 2, 5, 8, 20, 21, 22, 50, 61]])
    full = neighbourhood_mask(grid, num_global, 3, 'sliding')[0]
    pruned = neighbourhood_mask(grid, num_global, 3, 'sliding', keep)
    for b in range(2):
        rows = torch.cat([torch.arange(num_global), keep[b] + num_global])
        assert torch.equal(pruned[b], full[rows][:, rows])


# ---------------------------------------------------------------- backends vs reference ------------
def _inputs(seed, batch, num_global, grid, keep=1.0, heads=2, dim=8, dtype=torch.float32,
            requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    cells = grid[0] * grid[1]
    patch_index = None
    num_patches = cells
    if keep < 1.0:
        num_patches = max(1, int(cells * keep))
        patch_index = torch.stack(
            [torch.randperm(cells, generator=gen)[:num_patches].sort().values for _ in range(batch)])
    q, k, v = (torch.randn(batch, heads, num_global + num_patches, dim, generator=gen, dtype=dtype)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, patch_index


# (grid, num_global, window, batch, keep fraction): odd grids, partial blocks, window >= grid,
# G = 0 / 1 / 9, batch > 1, pruned subsets.
HAND_PICKED = [
    ((5, 7), 1, 3, 1, 1.0),
    ((9, 4), 9, 4, 2, 1.0),
    ((13, 1), 0, 3, 1, 1.0),
    ((6, 6), 9, 8, 2, 1.0),
    ((8, 8), 9, 2, 2, 0.5),
    ((7, 9), 0, 3, 3, 0.3),
    ((11, 6), 1, 5, 2, 0.7),
    ((3, 3), 1, 1, 1, 0.12),
]
_rng = random.Random(0)
RANDOM_SWEEP = [((_rng.randint(1, 14), _rng.randint(1, 14)), _rng.choice([0, 1, 9]), _rng.randint(1, 9),
                 _rng.randint(1, 3), _rng.choice([1.0, 0.4, 0.8])) for _ in range(10)]


@pytest.mark.parametrize('backend', BACKENDS.values(), ids=BACKENDS.keys())
@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,window,batch,keep', HAND_PICKED + RANDOM_SWEEP)
def test_backend_matches_reference(backend, neighbourhood, grid, num_global, window, batch, keep):
    q, k, v, patch_index = _inputs(hash((grid, window, batch)) % 1000, batch, num_global, grid, keep)
    ref_out, ref_attn = sparse_attention_reference(q, k, v, grid, num_global, window, neighbourhood,
                                                   patch_index, return_global_attn=True)
    out, attn = backend(q, k, v, grid, num_global, window, neighbourhood, patch_index, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)
    assert attn.shape == (batch, q.shape[1], num_global, q.shape[2] - num_global)


@pytest.mark.parametrize('backend', BACKENDS.values(), ids=BACKENDS.keys())
@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('keep', [1.0, 0.5])
def test_window_covering_grid_is_dense_attention(backend, neighbourhood, keep):
    q, k, v, patch_index = _inputs(3, 2, 9, (6, 5), keep)
    out, _ = backend(q, k, v, (6, 5), 9, 6, neighbourhood, patch_index, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,keep', [((7, 10), 9, 1.0), ((9, 6), 0, 0.6), ((4, 4), 1, 0.25)])
def test_gather_gradients_match_reference(neighbourhood, grid, num_global, keep):
    q, k, v, patch_index = _inputs(7, 2, num_global, grid, keep, requires_grad=True)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (sparse_attention_reference, sparse_attention):
        out, attn = fn(q, k, v, grid, num_global, 3, neighbourhood, patch_index, return_global_attn=True,
                       backend='gather')
        loss = (out * grad_out).sum() + (attn * torch.linspace(0, 1, attn.shape[-1])).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for name, ref, got in zip('qkv', *grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f'd{name}')


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_gather_low_precision_close_to_reference(dtype, tol):
    q, k, v, _ = _inputs(5, 1, 9, (9, 10), dtype=dtype)
    out = sparse_attention(q, k, v, (9, 10), 9, 4, backend='gather')
    assert out.dtype == dtype
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, (9, 10), 9, 4), atol=tol, rtol=tol)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (elements, views included) and the largest storage
    (bytes actually allocated; expanded views share their base's storage)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out, ):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_gather_never_builds_attention_sized_tensors(neighbourhood):
    """56 x 56 grid, window 2, one head of dim 4: N^2 = 9.8M, gathered keys ~ N * (9 w^2 + G) * 4 = 0.5M."""
    q, k, v, _ = _inputs(0, 1, 1, (56, 56), heads=1, dim=4)
    num_tokens = q.shape[2]
    largest = []
    for fn in (sparse_attention_reference, sparse_attention):
        with torch.no_grad(), _LargestTensor() as probe:
            fn(q, k, v, (56, 56), 1, 2, neighbourhood, backend='gather')
        largest.append(probe.largest)
    assert largest[0] >= num_tokens**2  # the probe does see the reference's dense scores
    assert largest[1] <= num_tokens * (9 * 4 + 1) * 4 < num_tokens**2 / 16


def _kept_positions(pattern: str, grid: tuple[int, int]) -> Tensor:
    """About 40 % of the grid: scattered at random, one band of rows, or a dense corner + sparse rest."""
    height, width = grid
    cells = torch.arange(height * width)
    if pattern == 'random':
        return torch.randperm(height * width, generator=torch.Generator().manual_seed(0))[:410].sort().values
    if pattern == 'band':
        return cells[:410]
    dense_corner = (cells // width < 12) & (cells % width < 12)
    return cells[dense_corner | (cells % 3 == 0)]


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('pattern', ['random', 'band', 'corner'])
def test_gather_pruned_memory_follows_kept_tokens(neighbourhood, pattern):
    """Pruning must cut memory, not add to it: with ~40 % of a 32 x 32 grid kept, the largest buffer the
    pruned call allocates is at most half the unpruned call's, however the kept tokens are spread."""
    grid, num_global = (32, 32), 1
    patch_index = _kept_positions(pattern, grid)[None]
    assert 0.39 < patch_index.shape[1] / (grid[0] * grid[1]) < 0.44
    largest = []
    for index in (None, patch_index):
        num_patches = grid[0] * grid[1] if index is None else index.shape[1]
        q, k, v = torch.randn(3, 1, 2, num_global + num_patches, 8)
        with torch.no_grad(), _LargestTensor() as probe:
            out = sparse_attention(q, k, v, grid, num_global, 4, neighbourhood, patch_index=index,
                                   backend='gather')
        largest.append(probe.largest_bytes)
    assert out.shape == q.shape
    assert largest[1] <= largest[0] / 2


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_gather_pruned_tile_buckets_match_reference(neighbourhood):
    """Dense and sparse tiles land in different buckets (checked): outputs, global attention and
    gradients still equal the reference, per sample of a batch with different kept sets."""
    grid = (32, 32)
    corner, band = _kept_positions('corner', grid), _kept_positions('band', grid)
    patch_index = torch.stack([corner[:400], band[10:]])
    tiles = gather._tiles(tile_layout(grid, 1, 4, patch_index, torch.device('cpu')), 2, 4, neighbourhood)
    assert len(gather._pruned_buckets(tiles)) > 1
    q, k, v = (torch.randn(2, 2, 401, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
               for i in range(3))
    results = []
    for fn in (sparse_attention_reference, sparse_attention):
        out, attn = fn(q, k, v, grid, 1, 4, neighbourhood, patch_index, return_global_attn=True,
                       backend='gather')
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + attn[..., ::3].sum()
        results.append((out, attn, *torch.autograd.grad(loss, (q, k, v))))
    for name, ref, got in zip(['out', 'global attn', 'dq', 'dk', 'dv'], *results):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- compiled flex (expensive) --------
@needs_flex
@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_compiled_flex_matches_reference(neighbourhood):
    """EXPENSIVE: compiles FlexAttention (~20 s cold on this 2-core CPU, cached after; both patterns share
    the graphs, the pruned call adds one for its per-sample validity table).  Exercises the cached block
    mask with full blocks."""
    grid, num_global = (10, 13), 9
    for keep in (1.0, 1.0, 0.6):  # second unpruned call hits the block mask cache
        q, k, v, patch_index = _inputs(11, 2, num_global, grid, keep, heads=2, dim=16)
        with torch.no_grad():
            out, attn = sparse_attention(q, k, v, grid, num_global, 4, neighbourhood, patch_index,
                                         return_global_attn=True, backend='flex')
        ref_out, ref_attn = sparse_attention_reference(q, k, v, grid, num_global, 4, neighbourhood,
                                                       patch_index, return_global_attn=True)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- backend choice -------------------
@pytest.fixture
def clean_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    set_attention_backend(None)
    yield monkeypatch
    set_attention_backend(None)


def test_automatic_choice_logs_why_flex_said_no(clean_choice, caplog):
    q, k, v, _ = _inputs(0, 1, 1, (4, 4), requires_grad=True)
    with caplog.at_level(logging.INFO, logger='mmseg_sparsevit.ops.sparse_attention'):
        assert select_backend(q, k, v) == 'gather'
        select_backend(q, k, v)
    messages = [r.getMessage() for r in caplog.records]
    expected_reason = 'torch has no flex_attention' if flex.flex_attention is None else 'no grad on CPU'
    assert len(messages) == 1 and expected_reason in messages[0]


@needs_flex
def test_automatic_choice_keeps_small_cpu_inputs_on_gather(clean_choice):
    q, k, v, _ = _inputs(0, 1, 1, (4, 4))
    with torch.no_grad():
        assert select_backend(q, k, v) == 'gather'
        big = torch.empty(1, 1, flex.FLEX_MIN_TOKENS_CPU, 8)
        assert select_backend(big, big, big) == 'flex'


@needs_flex
def test_automatic_choice_sizes_pruned_calls_by_their_grid(clean_choice):
    """A pruned call runs on the grid's slots: it follows the unpruned call's choice for that grid."""
    few = torch.empty(1, 1, 1 + 100, 8)
    with torch.no_grad():
        assert select_backend(few, few, few) == 'gather'
        assert select_backend(few, few, few, grid_hw=(64, 64), num_global=1) == 'flex'
        assert select_backend(few, few, few, grid_hw=(10, 10), num_global=1) == 'gather'


def test_forcing_a_backend(clean_choice):
    q, k, v, _ = _inputs(0, 1, 1, (4, 4))
    clean_choice.setenv(BACKEND_ENV, 'gather')
    assert select_backend(q, k, v) == 'gather'
    clean_choice.setenv(BACKEND_ENV, 'bogus')
    with pytest.raises(ValueError, match=BACKEND_ENV):
        select_backend(q, k, v)
    set_attention_backend('gather')  # the function beats the environment variable
    assert select_backend(q, k, v) == 'gather'
    with pytest.raises(ValueError, match='backend'):
        set_attention_backend('dense')


@needs_flex
def test_automatic_flex_failure_falls_back_to_gather(clean_choice, caplog):
    def broken(*args):
        raise RuntimeError('no compiler')

    clean_choice.setattr(flex, 'flex_attention_backend', broken)
    clean_choice.setattr(flex, 'FLEX_MIN_TOKENS_CPU', 1)
    clean_choice.setattr(flex, 'failure', None)
    q, k, v, _ = _inputs(0, 1, 1, (4, 4))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        out = sparse_attention(q, k, v, (4, 4), 1, 2)
        assert 'no compiler' in caplog.text
        assert select_backend(q, k, v) == 'gather'
        with pytest.raises(RuntimeError, match='no compiler'):  # asked for by name: no silent fallback
            sparse_attention(q, k, v, (4, 4), 1, 2, backend='flex')
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, (4, 4), 1, 2))


@needs_flex
def test_requested_flex_that_cannot_run_raises(clean_choice):
    q, k, v, _ = _inputs(0, 1, 1, (4, 4), requires_grad=True)
    with pytest.raises(RuntimeError, match='no grad on CPU'):
        sparse_attention(q, k, v, (4, 4), 1, backend='flex')


# ---------------------------------------------------------------- flex compile cap -----------------
@pytest.fixture
def flex_region(clean_choice):
    """A fresh flex compile region whose graphs dynamo hands to its cheap 'eager' backend.  The cap is
    dynamo's own recompile limit, which does not depend on the backend, so no inductor compile runs.
    Records every ``flex_attention_backend`` call as (compiled, raised) in ``.calls``."""
    clean_choice.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    for name, value in [('_compiled', None), ('_refused', set()), ('_compile_cap', None), ('failure', None),
                        ('FLEX_MIN_TOKENS_CPU', 1)]:
        clean_choice.setattr(flex, name, value)
    clean_choice.setattr(importlib.import_module('mmseg_sparsevit.ops.sparse_attention'), '_logged_choices',
                         set())
    clean_choice.delenv(flex.FLEX_COMPILE_CAP_ENV, raising=False)
    real_backend, calls = flex.flex_attention_backend, []

    def recording_backend(*args, compiled=True):
        try:
            result = real_backend(*args, compiled=compiled)
        except flex.FlexNotCompiledError:
            calls.append((compiled, True))
            raise
        calls.append((compiled, False))
        return result

    clean_choice.setattr(flex, 'flex_attention_backend', recording_backend)
    clean_choice.calls = calls
    return clean_choice


def _matches_reference(grid, backend=None):
    q, k, v, _ = _inputs(1, 1, 1, grid)
    with torch.no_grad():
        out = sparse_attention(q, k, v, grid, 1, 2, backend=backend)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, grid, 1, 2), atol=1e-5, rtol=1e-5)


@needs_flex
def test_automatic_choice_past_the_compile_cap_uses_gather(flex_region, caplog):
    flex_region.setenv(flex.FLEX_COMPILE_CAP_ENV, '1')
    with caplog.at_level(logging.INFO, logger='mmseg_sparsevit.ops.sparse_attention'):
        for grid in [(4, 4), (6, 6), (6, 6), (4, 4)]:  # 6 x 6 would be a second graph: refused
            _matches_reference(grid)
    assert flex_region.calls == [(True, False), (True, True), (True, True), (True, False)]  # never eager
    cap_logs = [r.getMessage() for r in caplog.records if 'compile cap' in r.getMessage()]
    assert len(cap_logs) == 1 and 'gather backend' in cap_logs[0]
    assert 'cap of 1 ' in cap_logs[0] and flex.FLEX_COMPILE_CAP_ENV in cap_logs[0]


@needs_flex
def test_requested_flex_past_the_compile_cap_runs_small_inputs_uncompiled(flex_region, caplog):
    set_flex_compile_cap(0)  # refuses even the first graph
    with caplog.at_level(logging.INFO, logger='mmseg_sparsevit.ops.sparse_attention'):
        _matches_reference((4, 4), backend='flex')
    assert flex_region.calls == [(True, True), (False, False)]
    assert 'small inputs run uncompiled' in caplog.text


@needs_flex
def test_requested_flex_past_the_compile_cap_raises_for_large_inputs(flex_region):
    """'Large' here: a 4 x 4 grid's 1 x 2 x 16 x 17 = 544 eager scores against a limit of 100."""
    set_flex_compile_cap(0)
    flex_region.setattr(flex, 'FLEX_EAGER_MAX_SCORES', 100)
    with pytest.raises(RuntimeError, match=r'(?s)cap of 0 .*set_flex_compile_cap.*544.*gather'):
        _matches_reference((4, 4), backend='flex')
    assert flex_region.calls == [(True, True)]


@needs_flex
@pytest.mark.parametrize('skip', ['disabled', 'dispatch mode'])
def test_flex_never_runs_eagerly_where_compile_is_skipped(flex_region, caplog, skip):
    """torch.compile runs the function eagerly when dynamo is disabled or a TorchDispatchMode is active."""
    grid = (24, 24)
    q, k, v, _ = _inputs(2, 1, 1, grid, heads=1, dim=4)
    disabled = torch._dynamo.config.patch(disable=skip == 'disabled')
    with torch.no_grad(), caplog.at_level(logging.INFO), disabled:
        with _LargestTensor() if skip == 'dispatch mode' else contextlib.nullcontext() as probe:
            out = sparse_attention(q, k, v, grid, 1, 2)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, grid, 1, 2), atol=1e-5, rtol=1e-5)
    assert flex_region.calls == [(True, True)]
    if probe is not None:
        assert probe.largest < q.shape[2]**2 / 4  # no score matrix
    assert ('TORCH_COMPILE_DISABLE' if skip == 'disabled' else 'TorchDispatchMode') in caplog.text


def test_flex_compile_cap_rejects_bad_values(monkeypatch):
    for bad in (-1, 1.5, True, '8'):
        with pytest.raises(ValueError, match='cap must be'):
            set_flex_compile_cap(bad)
    monkeypatch.setenv(flex.FLEX_COMPILE_CAP_ENV, 'eight')
    with pytest.raises(ValueError, match=flex.FLEX_COMPILE_CAP_ENV):
        flex.compile_cap()
    monkeypatch.setenv(flex.FLEX_COMPILE_CAP_ENV, '3')
    assert flex.compile_cap() == 3


def test_module_calls_the_function():
    q, k, v, patch_index = _inputs(2, 2, 1, (5, 6), 0.5)
    layer = SparseAttention(window_size=2, neighbourhood='sliding', backend='gather')
    out, attn = layer(q, k, v, (5, 6), 1, patch_index=patch_index, return_global_attn=True)
    ref_out, ref_attn = sparse_attention_reference(q, k, v, (5, 6), 1, 2, 'sliding', patch_index,
                                                   return_global_attn=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)
    assert 'sliding' in repr(layer)


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,keep', [((5, 7), 1, 1.0), ((6, 6), 9, 0.5), ((4, 9), 3, 1.0)])
def test_global_attention_probs_are_the_references_global_rows(neighbourhood, grid, num_global, keep):
    """Global rows do not depend on the window, the pattern or pruning: they see every token."""
    q, k, v, patch_index = _inputs(6, 2, num_global, grid, keep)
    _, ref_attn = sparse_attention_reference(q, k, v, grid, num_global, 2, neighbourhood, patch_index,
                                             return_global_attn=True, scale=0.3)
    probs = global_attention_probs(q, k, num_global, 0.3)
    torch.testing.assert_close(probs, ref_attn, atol=1e-6, rtol=1e-5)
    dense = torch.softmax(q[:, :, :num_global] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    torch.testing.assert_close(global_attention_probs(q, k, num_global), dense[..., num_global:])


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_global_attention_probs_low_precision_close_to_reference(dtype, tol):
    """Low-precision inputs: probabilities within tol (of the largest) of float32, in the input dtype."""
    q, k, v, _ = _inputs(8, 1, 1, (16, 16), dim=16)
    ref = sparse_attention_reference(q, k, v, (16, 16), 1, 4, return_global_attn=True)[1]
    probs = global_attention_probs(q.to(dtype), k.to(dtype), 1)
    assert probs.dtype == dtype
    torch.testing.assert_close(probs.float(), ref, atol=tol * ref.max().item(), rtol=0)


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_global=-1), 'num_global'), (dict(num_global=13), 'num_global=13'), (dict(scale=float('inf')), 'scale'),
    (dict(k='k'), 'k must be a torch.Tensor'), (dict(k=torch.zeros(2, 2, 12, 8)), 'k shape'),
    (dict(q=torch.zeros(2, 2, 13, 8).double()), 'dtypes differ'),
])
def test_global_attention_probs_checks_arguments(kwargs, message):
    q, k, _, _ = _inputs(0, 2, 1, (3, 4))
    with pytest.raises((ValueError, TypeError), match=message):
        global_attention_probs(**{'q': q, 'k': k, 'num_global': 1, **kwargs})


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = _inputs(4, 1, 1, (3, 3), dim=16)
    explicit = sparse_attention(q, k, v, (3, 3), 1, backend='gather', scale=1 / math.sqrt(16))
    torch.testing.assert_close(sparse_attention(q, k, v, (3, 3), 1, backend='gather'), explicit)
    doubled = sparse_attention(q, k, v, (3, 3), 1, backend='gather', scale=0.5)
    assert not torch.allclose(doubled, explicit)


# ---------------------------------------------------------------- argument checks ------------------
def _bad_calls():
    q, k, v, _ = _inputs(0, 2, 1, (3, 4))
    good = dict(q=q, k=k, v=v, grid_hw=(3, 4), num_global=1)
    pruned = dict(good, q=q[:, :, :6], k=k[:, :, :6], v=v[:, :, :6])
    index = torch.tensor([[0, 2, 5, 7, 11], [1, 2, 3, 4, 5]])
    return [
        ('q', dict(good, q=q[0]), 'q must be'),
        ('k', dict(good, k=k[:, :1]), 'k shape'),
        ('v', dict(good, v=v[:, :, :3]), 'v shape'),
        ('dtype', dict(good, q=q.long()), 'q must be floating point'),
        ('mixed', dict(good, v=v.double()), 'dtypes differ'),
        ('grid', dict(good, grid_hw=(0, 12)), 'grid_hw'),
        ('grid3', dict(good, grid_hw=(3, 4, 1)), 'grid_hw'),
        ('count', dict(good, grid_hw=(4, 4)), 'grid_hw=(4, 4)'),
        ('window', dict(good, window_size=0), 'window_size'),
        ('global', dict(good, num_global=-1), 'num_global'),
        ('no patches', dict(good, num_global=13), 'num_global=13'),
        ('pattern', dict(good, neighbourhood='dilated'), 'neighbourhood'),
        ('scale', dict(good, scale=float('nan')), 'scale'),
        ('backend', dict(good, backend='dense'), 'backend'),
        ('flag', dict(good, return_global_attn='yes'), 'return_global_attn'),
        ('index dtype', dict(pruned, patch_index=index.int()), 'patch_index must be a torch.long'),
        ('index shape', dict(pruned, patch_index=index[:1]), 'patch_index shape'),
        ('index range', dict(pruned, patch_index=index + 1), 'patch_index values'),
        ('index order', dict(pruned, patch_index=index.flip(1)), 'strictly increasing'),
        ('index repeat', dict(pruned, patch_index=torch.tensor([[0, 2, 2, 7, 11], [1, 2, 3, 4, 5]])),
         'strictly increasing'),
    ]


_PUBLIC_ONLY = ('backend', 'flag')  # the reference ignores backend and takes the flag as a plain bool
CHECKED_CALLS = [pytest.param(fn, *case[1:], id=f'{fn.__name__}-{case[0]}') for case in _bad_calls()
                 for fn in (sparse_attention, sparse_attention_reference)
                 if fn is sparse_attention or case[0] not in _PUBLIC_ONLY]


@pytest.mark.parametrize('fn,kwargs,message', CHECKED_CALLS)
def test_bad_arguments_name_the_argument(fn, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace('(', r'\(').replace(')', r'\)')):
        fn(**kwargs)


# ---------------------------------------------------------------- packaging and tooling ------------
def test_ops_sources_import_torch_only():
    """The op must stay usable without mmseg/mmcv/mmengine: check every import statement under ops/."""
    ops_dir = Path(sparse_attention.__code__.co_filename).parent
    for path in ops_dir.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ''] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split('.')[0] not in ('mmseg', 'mmcv', 'mmdet', 'mmengine'), (path, name)


def _benchmark_tool():
    path = Path(__file__).parents[1] / 'tools' / 'benchmark_attention.py'
    spec = importlib.util.spec_from_file_location('benchmark_attention', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tool_measures_and_tabulates():
    tool = _benchmark_tool()
    spec = dict(grid=[4, 5], num_global=1, heads=2, head_dim=8, batch=1, window_size=2,
                neighbourhood='block', device='cpu', warmup=1, repeats=2)
    result = tool.measure('gather', spec)
    assert result['tokens'] == 21 and len(result['times_s']) == 2 and result['median_s'] > 0
    table = tool.markdown_table([dict(result, method='dense_sdpa', median_s=2.0, median_cpu_s=3.0),
                                 dict(result, median_s=0.5, median_cpu_s=1.0)])
    assert '| 4x5 | 1 | 21 | gather | 0.500 | 4.0x | 1.000 | 3.0x |' in table
    torch.testing.assert_close(tool.dense_eager(*_inputs(0, 1, 1, (2, 2))[:3]),
                               F.scaled_dot_product_attention(*_inputs(0, 1, 1, (2, 2))[:3]))


def test_benchmark_tool_prunes_with_keep(tmp_path, capsys):
    """The CLI end to end (one subprocess per point): keep=0.4 keeps int(0.4 * 20) = 8 of a 4 x 5 grid."""
    tool = _benchmark_tool()
    index = tool.kept_patch_index((4, 5), 0.4, 2, torch.device('cpu'))
    assert index.shape == (2, 8) and torch.equal(index[0], index[1]) and (index.diff() > 0).all()
    assert torch.equal(index, tool.kept_patch_index((4, 5), 0.4, 2, torch.device('cpu')))  # seeded
    out = tmp_path / 'bench.json'
    tool.main(['--grids', '4x5', '--methods', 'dense_sdpa', 'gather', '--keep', '0.4', '--num-global', '1',
               '--heads', '2', '--head-dim', '8', '--window-size', '2', '--warmup', '1', '--repeats', '2',
               '--timeout', '120', '--json', str(out)])
    results = json.loads(out.read_text())['results']
    assert [(r['keep'], r['method'], r.get('tokens')) for r in results] == [(0.4, 'dense_sdpa', 9),
                                                                            (0.4, 'gather', 9)]
    for r in results:
        assert r['median_s'] > 0 and r['median_cpu_s'] > 0 and r['process_peak_rss_bytes'] > 0, r
    printed = capsys.readouterr().out
    assert '| 4x5 | 0.4 | 9 | gather |' in printed and 'among the kept tokens only' in printed
    with pytest.raises(SystemExit):
        tool.parse_args(['--keep', '0'])
