"""The geometry, the dense reference, every backend against it, and the global rows.

The reference's geometry is checked against brute-force loops written here independently; each backend
(its validated-argument function; flex uncompiled, on small shapes) is compared with the reference over
hand-picked and seeded random cases.
"""
import pytest
import torch
import torch.nn.functional as F

from mmseg_sparsevit.ops import (global_attention_probs, neighbourhood_mask, sparse_attention_reference,
                                 sparse_attention_reference_probs, window_bounds)
from mmseg_sparsevit.ops.backends.gather import gather_attention
from sparse_attention_cases import CASES, flex_eager, inputs, needs_flex


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


def test_reference_output_is_its_probabilities_times_v():
    q, k, v, patch_index = inputs(9, 2, 3, (5, 6), 0.6)
    probs = sparse_attention_reference_probs(q, k, (5, 6), 3, 2, 'sliding', patch_index)
    torch.testing.assert_close(sparse_attention_reference(q, k, v, (5, 6), 3, 2, 'sliding', patch_index), probs @ v)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert probs.shape == (2, 2, q.shape[2], q.shape[2])


def test_pruned_mask_is_full_mask_restricted_to_kept_tokens():
    grid, num_global = (7, 9), 2
    keep = torch.tensor([[0, 3, 4, 10, 11, 30, 31, 40, 62], [1, 2, 5, 8, 20, 21, 22, 50, 61]])
    full = neighbourhood_mask(grid, num_global, 3, 'sliding')[0]
    pruned = neighbourhood_mask(grid, num_global, 3, 'sliding', keep)
    for b in range(2):
        rows = torch.cat([torch.arange(num_global), keep[b] + num_global])
        assert torch.equal(pruned[b], full[rows][:, rows])


# ---------------------------------------------------------------- every backend vs the reference ---
# The backends' validated-argument functions; a new backend adds its entry here.
BACKEND_FUNCTIONS = {'gather': gather_attention, 'flex': pytest.param(flex_eager, marks=needs_flex)}


@pytest.mark.parametrize('backend_fn', BACKEND_FUNCTIONS.values(), ids=BACKEND_FUNCTIONS.keys())
@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,window,batch,keep', CASES)
def test_backend_matches_reference(backend_fn, neighbourhood, grid, num_global, window, batch, keep):
    q, k, v, patch_index = inputs(hash((grid, window, batch)) % 1000, batch, num_global, grid, keep)
    ref_out = sparse_attention_reference(q, k, v, grid, num_global, window, neighbourhood, patch_index)
    out = backend_fn(q, k, v, grid, num_global, window, neighbourhood, patch_index, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    assert out.shape == q.shape


@pytest.mark.parametrize('backend_fn', BACKEND_FUNCTIONS.values(), ids=BACKEND_FUNCTIONS.keys())
@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('keep', [1.0, 0.5])
def test_window_covering_grid_is_dense_attention(backend_fn, neighbourhood, keep):
    q, k, v, patch_index = inputs(3, 2, 9, (6, 5), keep)
    out = backend_fn(q, k, v, (6, 5), 9, 6, neighbourhood, patch_index, q.shape[-1] ** -0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- global rows -----------------------
@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,keep', [((5, 7), 1, 1.0), ((6, 6), 9, 0.5), ((4, 9), 3, 1.0)])
def test_global_attention_probs_are_the_references_global_rows(neighbourhood, grid, num_global, keep):
    """Global rows do not depend on the window, the pattern or pruning: they see every token."""
    q, k, v, patch_index = inputs(6, 2, num_global, grid, keep)
    ref_probs = sparse_attention_reference_probs(q, k, grid, num_global, 2, neighbourhood, patch_index, scale=0.3)
    ref_attn = ref_probs[:, :, :num_global, num_global:]
    probs = global_attention_probs(q, k, num_global, 0.3)
    torch.testing.assert_close(probs, ref_attn, atol=1e-6, rtol=1e-5)
    dense = torch.softmax(q[:, :, :num_global] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    torch.testing.assert_close(global_attention_probs(q, k, num_global), dense[..., num_global:])


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_global_attention_probs_low_precision_close_to_reference(dtype, tol):
    """Low-precision inputs: probabilities within tol (of the largest) of float32, in the input dtype."""
    q, k, _, _ = inputs(8, 1, 1, (16, 16), dim=16)
    ref = sparse_attention_reference_probs(q, k, (16, 16), 1, 4)[:, :, :1, 1:]
    probs = global_attention_probs(q.to(dtype), k.to(dtype), 1)
    assert probs.dtype == dtype
    torch.testing.assert_close(probs.float(), ref, atol=tol * ref.max().item(), rtol=0)
