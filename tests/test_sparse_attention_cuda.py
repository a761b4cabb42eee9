"""The sparse attention backends on CUDA (compiled flex trains there) against the dense reference.

Skipped on machines without a GPU; the same comparisons run on CPU in tests/ops/.
"""
import pytest
import torch

from mmseg_sparsevit.ops import (global_attention_probs, sparse_attention, sparse_attention_reference,
                                 sparse_attention_reference_probs)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.mark.parametrize('backend', ['gather', 'flex', None])  # None: the measured choice
@pytest.mark.parametrize('grid_hw, num_global, window_size, keep', [
    ((24, 20), 9, 8, 1.0),    # partial blocks, registers
    ((17, 23), 1, 4, 0.4),    # odd grid, pruned
])
def test_cuda_backend_matches_reference_with_gradients(backend, grid_hw, num_global, window_size, keep):
    gen = torch.Generator(device='cuda').manual_seed(0)
    cells = grid_hw[0] * grid_hw[1]
    patch_index = None
    num_patches = cells
    if keep < 1.0:
        num_patches = int(cells * keep)
        patch_index = torch.stack([torch.randperm(cells, device='cuda', generator=gen)[:num_patches].sort().values
                                   for _ in range(2)])
    shape = (2, 4, num_global + num_patches, 32)
    q, k, v = (torch.randn(shape, device='cuda', generator=gen, requires_grad=True) for _ in range(3))
    kwargs = dict(grid_hw=grid_hw, num_global=num_global, window_size=window_size, patch_index=patch_index)
    out = sparse_attention(q, k, v, backend=backend, **kwargs)
    global_attn = global_attention_probs(q, k, num_global)
    ref_out = sparse_attention_reference(q, k, v, **kwargs)
    ref_global = sparse_attention_reference_probs(q, k, **kwargs)[:, :, :num_global, num_global:]
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(global_attn, ref_global, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(out.square().sum() + global_attn[..., ::3].sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref_out.square().sum() + ref_global[..., ::3].sum(), (q, k, v))
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-3, rtol=1e-3)
