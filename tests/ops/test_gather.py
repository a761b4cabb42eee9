"""The gather backend against the dense reference beyond the shared sweep of ``test_reference.py``:
gradients (through the outputs and the global attention), low precision, memory (no attention-sized
tensor; pruned calls follow the kept tokens) and the pruned tile buckets."""
import pytest
import torch

from mmseg_sparsevit.ops import (global_attention_probs, sparse_attention, sparse_attention_reference,
                                 sparse_attention_reference_probs, tile_layout)
from mmseg_sparsevit.ops.backends import gather
from sparse_attention_cases import LargestTensor, inputs, kept_positions


def _reference_global_rows(q, k, grid, num_global, window, neighbourhood, patch_index):
    probs = sparse_attention_reference_probs(q, k, grid, num_global, window, neighbourhood, patch_index)
    return probs[:, :, :num_global, num_global:]


def _global_probs(q, k, grid, num_global, *pattern):
    return global_attention_probs(q, k, num_global)


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,keep', [((7, 10), 9, 1.0), ((9, 6), 0, 0.6), ((4, 4), 1, 0.25)])
def test_gather_gradients_match_reference(neighbourhood, grid, num_global, keep):
    """Through the outputs, and through the global attention that pruning ranks by (for the op: the
    reference's global rows; for the model: ``global_attention_probs``)."""
    q, k, v, patch_index = inputs(7, 2, num_global, grid, keep, requires_grad=True)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    grads = []
    for fn, attn_fn in ((sparse_attention_reference, _reference_global_rows), (sparse_attention, _global_probs)):
        out = fn(q, k, v, grid, num_global, 3, neighbourhood, patch_index, backend='gather')
        attn = attn_fn(q, k, grid, num_global, 3, neighbourhood, patch_index)
        loss = (out * grad_out).sum() + (attn * torch.linspace(0, 1, attn.shape[-1])).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for name, ref, got in zip('qkv', *grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f'd{name}')


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_gather_low_precision_close_to_reference(dtype, tol):
    q, k, v, _ = inputs(5, 1, 9, (9, 10), dtype=dtype)
    out = sparse_attention(q, k, v, (9, 10), 9, 4, backend='gather')
    assert out.dtype == dtype
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, (9, 10), 9, 4), atol=tol, rtol=tol)


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_gather_never_builds_attention_sized_tensors(neighbourhood):
    """56 x 56 grid, window 2, one head of dim 4: N^2 = 9.8M, gathered keys ~ N * (9 w^2 + G) * 4 = 0.5M."""
    q, k, v, _ = inputs(0, 1, 1, (56, 56), heads=1, dim=4)
    num_tokens = q.shape[2]
    largest = []
    for fn in (sparse_attention_reference, sparse_attention):
        with torch.no_grad(), LargestTensor() as probe:
            fn(q, k, v, (56, 56), 1, 2, neighbourhood, backend='gather')
        largest.append(probe.largest)
    assert largest[0] >= num_tokens**2  # the probe does see the reference's dense scores
    assert largest[1] <= num_tokens * (9 * 4 + 1) * 4 < num_tokens**2 / 16


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('pattern', ['random', 'band', 'corner'])
def test_gather_pruned_memory_follows_kept_tokens(neighbourhood, pattern):
    """Pruning must cut memory, not add to it: with ~40 % of a 32 x 32 grid kept, the pruned call gathers
    at most 60 % of the unpruned one's key slots (what its chunks' buffers are made of) and allocates no
    larger buffer, however the kept tokens are spread."""
    grid, num_global = (32, 32), 1
    patch_index = kept_positions(pattern, grid)[None]
    assert 0.39 < patch_index.shape[1] / (grid[0] * grid[1]) < 0.44
    largest, key_slots = [], []
    for index in (None, patch_index):
        num_patches = grid[0] * grid[1] if index is None else index.shape[1]
        q, k, v = torch.randn(3, 1, 2, num_global + num_patches, 8)
        with torch.no_grad(), LargestTensor() as probe:
            out = sparse_attention(q, k, v, grid, num_global, 4, neighbourhood, patch_index=index,
                                   backend='gather')
        largest.append(probe.largest_bytes)
        problems = gather.tile_problems(1, q.shape[2], grid, num_global, 4, neighbourhood, index, q.device)
        key_slots.append(sum(problem.key_token.numel() for problem in problems))
    assert out.shape == q.shape
    assert key_slots[1] <= 0.6 * key_slots[0]
    assert largest[1] <= largest[0]


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_gather_pruned_tile_buckets_match_reference(neighbourhood):
    """Dense and sparse tiles land in different buckets (checked): outputs, global attention and
    gradients still equal the reference, per sample of a batch with different kept sets."""
    grid = (32, 32)
    corner, band = kept_positions('corner', grid), kept_positions('band', grid)
    patch_index = torch.stack([corner[:400], band[10:]])
    tiles = gather._tiles(tile_layout(grid, 1, 4, patch_index, torch.device('cpu')), 2, 4, neighbourhood)
    assert len(gather._pruned_buckets(tiles)) > 1
    q, k, v = (torch.randn(2, 2, 401, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
               for i in range(3))
    results = []
    for fn, attn_fn in ((sparse_attention_reference, _reference_global_rows), (sparse_attention, _global_probs)):
        out = fn(q, k, v, grid, 1, 4, neighbourhood, patch_index, backend='gather')
        attn = attn_fn(q, k, grid, 1, 4, neighbourhood, patch_index)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + attn[..., ::3].sum()
        results.append((out, attn, *torch.autograd.grad(loss, (q, k, v))))
    for name, ref, got in zip(['out', 'global attn', 'dq', 'dk', 'dv'], *results):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)
