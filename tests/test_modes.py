"""The one vocabulary of attention modes and precisions: what SparseViT gets for each mode, which options act in
which mode, and what each precision name means for weights and autocast."""
import pytest
import torch

from mmseg_sparsevit.models import SparseViT
from mmseg_sparsevit.models.modes import (ATTENTION_MODES, PRECISIONS, SPARSE_MODES, autocast, describe_precision,
                                          is_pruned, is_sparse, mode_kwargs, resolve_precision)

BASE = dict(arch='vit-s', depth=3, embed_dim=32, num_heads=2, window_size=2, neighbourhood='sliding',
            sparse_backend='gather', fused_attn=True, prune_ratio=0.5, prune_after=2)


def test_mode_kwargs_keep_only_options_that_act():
    dense, vanilla = mode_kwargs(BASE, 'dense'), mode_kwargs(BASE, 'vanilla')
    sparse, pruned = mode_kwargs(BASE, 'sparse'), mode_kwargs(BASE, 'sparse+prune')
    for kwargs in (dense, vanilla):
        assert not {'window_size', 'neighbourhood', 'sparse_backend', 'prune_ratio', 'prune_after'} & set(kwargs)
    assert dense['fused_attn'] is True and vanilla['fused_attn'] is False  # the mode wins over the base
    assert 'fused_attn' not in sparse and 'prune_ratio' not in sparse and sparse['window_size'] == 2
    assert pruned['token_pruning'] and pruned['prune_after'] == 2 and pruned['neighbourhood'] == 'sliding'
    assert list(pruned)[:2] == ['attn_mode', 'token_pruning']  # the mode's switches first, for generated configs
    assert all(kwargs['arch'] == 'vit-s' and kwargs['depth'] == 3 for kwargs in (dense, vanilla, sparse, pruned))
    with pytest.raises(ValueError, match="attention mode must be one of .* got 'sdpa'"):
        mode_kwargs(BASE, 'sdpa')


@pytest.mark.parametrize('mode', list(ATTENTION_MODES))
def test_each_mode_builds_the_model_it_names(mode):
    model = SparseViT(**mode_kwargs(BASE, mode))
    assert model.attn_mode == ('sparse' if is_sparse(mode) else 'dense')
    assert model.token_pruning == is_pruned(mode) == (mode == 'sparse+prune')
    assert (mode in SPARSE_MODES) == is_sparse(mode) == mode.startswith('sparse')


def test_precisions():
    assert PRECISIONS['amp-bf16'] == (torch.float32, torch.bfloat16) and PRECISIONS['bf16'] == (torch.bfloat16, None)
    assert describe_precision('amp-fp16') == 'fp32 weights, fp16 autocast'
    assert describe_precision('bf16') == 'bf16 weights, no autocast'
    assert resolve_precision('auto', torch.device('cpu')) == 'fp32' and resolve_precision('fp16', 'cpu') == 'fp16'
    with pytest.raises(ValueError, match="precision must be one of .* got 'float32'"):
        resolve_precision('float32', 'cpu')
    x = torch.ones(2, 2)
    with autocast('amp-bf16', 'cpu'):
        assert (x @ x).dtype == torch.bfloat16
    with autocast('fp32', 'cpu'):
        assert (x @ x).dtype == torch.float32
