"""The gather backend's recomputing backward (``backends/gather_autograd.py``): gradients against the dense
reference, against autograd through the same tiles (the previous path, which kept the gathered keys), in
float64 (gradcheck) and low precision; what it saves for backward (O(N * d)) and the size of its
temporaries (bounded by the chunk), both measured deterministically from tensor sizes."""
import pytest
import torch
import torch.nn.functional as F

from mmseg_sparsevit.ops import sparse_attention_reference
from mmseg_sparsevit.ops.backends import gather_autograd
from mmseg_sparsevit.ops.backends.gather import gather_attention, tile_problems
from mmseg_sparsevit.ops.backends.global_rows import global_rows
from sparse_attention_cases import CASES, LargestTensor, inputs


def _gather(q, k, v, grid, num_global, window, neighbourhood, patch_index, scale=None):
    scale = q.shape[-1]**-0.5 if scale is None else scale
    return gather_attention(q, k, v, grid, num_global, window, neighbourhood, patch_index, scale)


def _autograd_tiles(q, k, v, grid, num_global, window, neighbourhood, patch_index):
    """The same tiles through ordinary autograd and SDPA, as the gather backend ran before: autograd keeps
    every tile's gathered keys and values for backward."""
    batch, heads, num_tokens, _ = q.shape
    scale = q.shape[-1]**-0.5
    out = q.new_zeros(batch, heads, num_tokens + 1, v.shape[-1])
    for problem in tile_problems(batch, num_tokens, grid, num_global, window, neighbourhood, patch_index, q.device):
        rows = slice(None) if problem.sample is None else slice(problem.sample, problem.sample + 1)

        def take(x, tokens):
            return x[rows].index_select(2, tokens.reshape(-1)).unflatten(2, tokens.shape)

        mask = None if problem.hidden is None else ~problem.hidden
        tile_out = F.scaled_dot_product_attention(take(q, problem.query_token), take(k, problem.key_token),
                                                  take(v, problem.key_token), attn_mask=mask, scale=scale)
        updated = out[rows].index_copy(2, problem.query_dest.reshape(-1), tile_out.flatten(2, 3))
        out = torch.cat([out[:rows.start or 0], updated, out[rows.stop or batch:]]) if problem.sample is not None \
            else updated
    return torch.cat([global_rows(q, k, v, num_global, scale), out[:, :, num_global:num_tokens]], dim=2)


def _grads(fn, q, k, v, *args):
    out = fn(q, k, v, *args)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('grid,num_global,window,batch,keep', CASES)
def test_gradients_match_reference_and_autograd_tiles(neighbourhood, grid, num_global, window, batch, keep):
    """Odd grids, partial tiles, window >= grid, G = 0 / 1 / 9, batch > 1, pruned subsets (the shared cases)."""
    q, k, v, patch_index = inputs(hash((grid, window, batch)) % 1000, batch, num_global, grid, keep,
                                  requires_grad=True)
    args = (grid, num_global, window, neighbourhood, patch_index)
    got = _grads(_gather, q, k, v, *args)
    for oracle in (sparse_attention_reference, _autograd_tiles):
        for name, ref, value in zip(['out', 'dq', 'dk', 'dv'], _grads(oracle, q, k, v, *args), got):
            torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5, msg=f'{name} vs {oracle.__name__}')


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('num_global,keep', [(0, 1.0), (1, 1.0), (2, 0.6)])
def test_gradcheck_float64(neighbourhood, num_global, keep):
    """Partial tiles (3 x 5 grid, window 2), two samples (with different kept tokens when pruned)."""
    q, k, v, patch_index = inputs(4, 2, num_global, (3, 5), keep, heads=2, dim=3, dtype=torch.float64,
                                  requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: _gather(q, k, v, (3, 5), num_global, 2, neighbourhood, patch_index, 0.7), (q, k, v))


@pytest.mark.parametrize('dtype,tol', [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize('keep', [1.0, 0.5])
def test_low_precision_gradients_close_to_float32(dtype, tol, keep):
    """Statistics and sums run in float32: output and gradients stay within tol (of the largest value) of
    the float32 reference on the same rounded inputs, in the input dtype."""
    q, k, v, patch_index = inputs(2, 2, 9, (9, 10), keep, dtype=dtype, requires_grad=True)
    args = ((9, 10), 9, 4, 'block', patch_index)
    got = _grads(_gather, q, k, v, *args)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out32 = sparse_attention_reference(q32, k32, v32, *args)
    grad_out = torch.randn(out32.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).float()
    ref = (out32, *torch.autograd.grad(out32, (q32, k32, v32), grad_out))
    for name, value, expected in zip(['out', 'dq', 'dk', 'dv'], got, ref):
        assert value.dtype == dtype, name
        torch.testing.assert_close(value.float(), expected, atol=tol * expected.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize('keep', [1.0, 0.5])
def test_bf16_autocast_matches_float32(keep):
    """Under CPU bf16 autocast (as in training with ``--amp bf16``) the kernel computes in float32 on the
    inputs it is given: float32 inputs give the float32 result and gradients."""
    q, k, v, patch_index = inputs(3, 2, 9, (9, 10), keep, requires_grad=True)
    args = ((9, 10), 9, 4, 'sliding', patch_index)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = _grads(_gather, q, k, v, *args)
        with torch.no_grad():
            no_grad_out = _gather(q, k, v, *args)
    for name, value, expected in zip(['out', 'dq', 'dk', 'dv'], got, _grads(_gather, q, k, v, *args)):
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(no_grad_out, got[0], atol=1e-6, rtol=1e-5)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('keep', [1.0, 0.5])
def test_saved_for_backward_is_linear_in_tokens(neighbourhood, keep):
    """32 x 32 grid, 9 globals, 4 heads x 32, window 8: saved are q, k, v, the output, the log-sum-exp and
    the tile tables, under 1.5x q + k + v + out, while the gathered keys and values alone are over 5x q's
    size (about 7x for 'sliding', 18x for 'block'); autograd through the same tiles (the previous path)
    saves at least 3x more."""
    grid, num_global = (32, 32), 9
    q, k, v, patch_index = inputs(0, 1, num_global, grid, keep, heads=4, dim=32, requires_grad=True)
    args = (grid, num_global, 8, neighbourhood, patch_index)
    saved = _saved_bytes(lambda: _gather(q, k, v, *args))
    saved_by_autograd_tiles = _saved_bytes(lambda: _autograd_tiles(q, k, v, *args))
    qkv_out = 4 * q.numel() * q.element_size()
    problems = tile_problems(1, q.shape[2], grid, num_global, 8, neighbourhood, patch_index, q.device)
    gathered = 2 * sum(p.key_token.numel() for p in problems) * q.shape[1] * q.shape[3] * q.element_size()
    assert saved <= 1.5 * qkv_out
    assert gathered >= 5 * q.numel() * q.element_size()
    assert saved_by_autograd_tiles >= 3 * saved


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
def test_backward_temporaries_bounded_by_the_chunk(neighbourhood, monkeypatch):
    """With a small chunk, no buffer of forward + backward is bigger than the output (B x h x (N + 1) x d
    floats) or a tile table, while unchunked scores are over 5x the output (so the probe does see
    chunk-sized ones)."""
    q, k, v, _ = inputs(1, 1, 1, (32, 32), heads=2, dim=8, requires_grad=True)
    largest = {}
    for chunk_scores in (2**12, 2**30):
        monkeypatch.setattr(gather_autograd, 'CHUNK_SCORES', chunk_scores)
        monkeypatch.setattr(gather_autograd, 'CHUNK_OF_Q', 1.0 if chunk_scores < 2**30 else 1e6)
        with LargestTensor() as probe:
            out = _gather(q, k, v, (32, 32), 1, 4, neighbourhood, None)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        largest[chunk_scores] = probe.largest_bytes
    output_bytes = 2 * (q.shape[2] + 1) * 8 * q.element_size()
    tables = tile_problems(1, q.shape[2], (32, 32), 1, 4, neighbourhood, None, q.device)
    table_bytes = max(sum(t.numel() * t.element_size() for t in field if t is not None)  # before the split
                      for field in list(zip(*tables))[1:])
    assert largest[2**12] <= max(output_bytes, table_bytes)
    assert largest[2**30] >= 5 * output_bytes


@pytest.mark.parametrize('grad', [True, False])
def test_output_is_token_major_as_fused_sdpa(grad):
    """The ViT merges the heads with ``out.transpose(1, 2).reshape(B, N, C)`` for its projection. Fused SDPA's
    output (with gradients, from q, k, v that are views of one qkv projection) is stored token-major, so that is
    a view of the output it saves; the gather output must be too, or each sparse block keeps one more N x C
    tensor for backward than a dense one."""
    batch, tokens, heads, dim = 2, 1 + 6 * 6, 3, 8
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * dim, generator=gen, requires_grad=grad)
    q, k, v = qkv.view(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    with torch.set_grad_enabled(grad):
        for out in (F.scaled_dot_product_attention(q, k, v), _gather(q, k, v, (6, 6), 1, 2, 'block', None)):
            merged = out.transpose(1, 2).reshape(batch, tokens, heads * dim)
            assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, no copy
