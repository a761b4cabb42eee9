"""The flex backend beyond the shared sweep of ``test_reference.py`` (where its block mask runs uncompiled on
small shapes): one compiled check against the reference, the compile cap for calls that request flex, and
the bounded block-mask cache.

One clearly marked test compiles flex with inductor (~20 s cold on 2 CPU cores); the compile-cap tests let
dynamo hand its graphs to the cheap 'eager' backend.
"""
import pytest
import torch

from mmseg_sparsevit.ops import set_flex_compile_cap, sparse_attention, sparse_attention_reference
from mmseg_sparsevit.ops.context import BLOCK_MASK_CACHE_SIZE, FLEX_COMPILE_CAP_ENV, LruCache
from sparse_attention_cases import flex_eager, inputs, needs_flex

pytestmark = needs_flex


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_compiled_flex_matches_reference(neighbourhood, ops_context):
    """EXPENSIVE: compiles FlexAttention (~20 s cold on this 2-core CPU, cached after; both patterns share
    the graphs, the pruned call adds one for its per-sample validity table).  Exercises the cached block
    mask with full blocks."""
    grid, num_global = (10, 13), 9
    for keep in (1.0, 1.0, 0.6):  # second unpruned call hits the block mask cache
        q, k, v, patch_index = inputs(11, 2, num_global, grid, keep, heads=2, dim=16)
        with torch.no_grad():
            out = sparse_attention(q, k, v, grid, num_global, 4, neighbourhood, patch_index, backend='flex')
        ref_out = sparse_attention_reference(q, k, v, grid, num_global, 4, neighbourhood, patch_index)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert ops_context.flex_runs == {'compiled': 3}
    assert len(ops_context.block_masks) == 1


# ---------------------------------------------------------------- compile cap, flex requested -------
def _matches_reference(grid, backend=None):
    q, k, v, _ = inputs(1, 1, 1, grid)
    with torch.no_grad():
        out = sparse_attention(q, k, v, grid, 1, 2, backend=backend)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, grid, 1, 2), atol=1e-5, rtol=1e-5)


def test_requested_flex_past_the_compile_cap_runs_small_inputs_uncompiled(cheap_flex, caplog):
    set_flex_compile_cap(0)  # refuses even the first graph
    with caplog.at_level('INFO', logger='mmseg_sparsevit.ops'):
        _matches_reference((4, 4), backend='flex')
        assert cheap_flex.flex_runs == {'refused': 1, 'uncompiled': 1}
        _matches_reference((4, 4), backend='flex')  # the refused signature skips dynamo
    assert cheap_flex.flex_runs == {'refused': 2, 'uncompiled': 2}
    assert caplog.text.count('small inputs run uncompiled') == 1


def test_requested_flex_past_the_compile_cap_raises_for_large_inputs(cheap_flex):
    """'Large' here: a 4 x 4 grid's 1 x 2 x 16 x 17 = 544 eager scores against a limit of 100."""
    set_flex_compile_cap(0)
    cheap_flex.flex_eager_max_scores = 100
    with pytest.raises(RuntimeError, match=r'(?s)cap of 0 .*set_flex_compile_cap.*544.*gather'):
        _matches_reference((4, 4), backend='flex')
    assert cheap_flex.flex_runs == {'refused': 1}


def test_flex_compile_cap_rejects_bad_values(ops_context, monkeypatch):
    for bad in (-1, 1.5, True, '8'):
        with pytest.raises(ValueError, match='cap must be'):
            set_flex_compile_cap(bad)
    monkeypatch.setenv(FLEX_COMPILE_CAP_ENV, 'eight')
    with pytest.raises(ValueError, match=FLEX_COMPILE_CAP_ENV):
        ops_context.compile_cap()
    monkeypatch.setenv(FLEX_COMPILE_CAP_ENV, '3')
    assert ops_context.compile_cap() == 3
    set_flex_compile_cap(5)  # the function beats the environment variable
    assert ops_context.compile_cap() == 5


# ---------------------------------------------------------------- block-mask cache ------------------
def test_lru_cache_drops_the_least_recently_used():
    cache = LruCache(2)
    cache.put('a', 1)
    cache.put('b', 2)
    assert cache.get('a') == 1  # 'a' is now the most recently used
    cache.put('c', 3)
    assert len(cache) == 2 and 'b' not in cache and cache.get('a') == 1 and cache.get('c') == 3
    assert cache.get('b') is None


def test_block_mask_cache_is_bounded(ops_context):
    """One entry per unpruned grid, at most BLOCK_MASK_CACHE_SIZE; pruned calls are not cached."""
    grids = [(2, width) for width in range(1, BLOCK_MASK_CACHE_SIZE + 3)]
    for grid in grids:
        q, k, v, _ = inputs(0, 1, 1, grid)
        flex_eager(q, k, v, grid, 1, 2, 'block', None, 1.0)
    assert len(ops_context.block_masks) == BLOCK_MASK_CACHE_SIZE
    cached = {key[0] for key in ops_context.block_masks.keys()}
    assert cached == set(grids[2:])  # the two oldest were dropped
    q, k, v, patch_index = inputs(0, 1, 1, (5, 5), keep=0.5)
    flex_eager(q, k, v, (5, 5), 1, 2, 'block', patch_index, 1.0)
    assert (5, 5) not in {key[0] for key in ops_context.block_masks.keys()}
