"""Token pruning: kept counts, CLS-attention ranking, equality with an explicit masked-softmax reference
pipeline (dense and sparse), prune_ratio=0 == unpruned, and clear errors for dense maps."""
from typing import Optional

import pytest
import torch

from mmseg_sparsevit.models import SparseViT
from mmseg_sparsevit.models.pruning import num_kept_tokens, select_kept_tokens
from mmseg_sparsevit.ops import neighbourhood_mask

TINY = dict(embed_dim=96, depth=3, num_heads=4)


def features(model: SparseViT, image: torch.Tensor) -> dict:
    """CLS, patch mean and kept positions of the pruned model, through its public API."""
    out = model.forward_tokens(image)
    return dict(cls=model.pool(out.tokens, 'token'), patch_mean=model.pool(out.tokens, 'avg'),
                kept_index=out.kept_index, grid_hw=out.grid_hw)


def tiny_model(**kwargs) -> SparseViT:
    """UNI-2-family model whose attention is sharp enough that pruning scores are well separated."""
    torch.manual_seed(0)
    model = SparseViT('uni2-h', **TINY, init_values=1.0, **kwargs).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4)
    return model


def reference_block(block: torch.nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple:
    """One block with explicit softmax attention under a boolean mask; returns tokens and probabilities."""
    attn = block.attn
    B, N, C = x.shape
    q, k, v = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float('-inf'))
    probs = scores.softmax(dim=-1)
    x = x + block.ls1(attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C)))
    return x + block.ls2(block.mlp(block.norm2(x))), probs


def reference_pruned_features(model: SparseViT, image: torch.Tensor, num_keep: int,
                              window_size: Optional[int]) -> dict:
    """Prune by hand: rank patches by the CLS row of block ``prune_after``'s attention, keep the top
    ``num_keep`` in grid order, and run the rest under the neighbourhood mask of the kept positions."""
    tokens, grid_hw = model.prepare_tokens(image)
    G = model.num_prefix_tokens

    def mask(kept: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if window_size is None else neighbourhood_mask(grid_hw, G, window_size, 'block', kept)

    for block in model.blocks[:model.prune_after]:
        tokens, probs = reference_block(block, tokens, mask(None))
    kept = probs[:, :, 0, G:].mean(dim=1).argsort(dim=-1, descending=True)[:, :num_keep].sort(dim=-1).values
    patches = torch.stack([t[G:][i] for t, i in zip(tokens, kept)])
    tokens = torch.cat([tokens[:, :G], patches], dim=1)
    for block in model.blocks[model.prune_after:]:
        tokens, _ = reference_block(block, tokens, mask(kept))
    tokens = model.norm(tokens)
    return dict(cls=tokens[:, 0], patch_mean=tokens[:, G:].mean(dim=1), kept_index=kept)


@pytest.mark.parametrize(('num_tokens', 'ratio', 'expected'), [
    (256, 0.6, 103), (100, 0.7, 30), (64, 0.6, 26), (10, 0.0, 10), (5, 0.99, 1), (1, 0.5, 1)])
def test_num_kept_tokens(num_tokens: int, ratio: float, expected: int) -> None:
    assert num_kept_tokens(num_tokens, ratio) == expected


@pytest.mark.parametrize('ratio', [-0.1, 1.0])
def test_bad_ratio_rejected(ratio: float) -> None:
    with pytest.raises(ValueError, match='prune_ratio'):
        num_kept_tokens(10, ratio)


def test_select_ranks_by_cls_row_mean_over_heads() -> None:
    attn = torch.zeros(1, 2, 2, 5)
    attn[0, 0, 0] = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.0])
    attn[0, 1, 0] = torch.tensor([0.3, 0.1, 0.6, 0.1, 0.0])  # CLS mean: .2 .3 .4 .5 0
    attn[0, :, 1] = torch.tensor([9.0, 0.0, 0.0, 0.0, 9.0])  # register row must be ignored
    assert select_kept_tokens(attn, 2).tolist() == [[2, 3]]


@pytest.mark.parametrize(('attn_mode', 'window_size'), [('dense', None), ('sparse', 2)])
def test_pruned_features_match_reference(attn_mode: str, window_size: Optional[int]) -> None:
    model = tiny_model(attn_mode=attn_mode, window_size=window_size or 8, token_pruning=True,
                       prune_ratio=0.6, prune_after=2)
    image = torch.randn(2, 3, 8 * 14, 8 * 14)
    with torch.no_grad():
        feats = features(model, image)
        ref = reference_pruned_features(model, image, num_keep=26, window_size=window_size)
    kept = feats['kept_index']
    assert kept.shape == (2, 26) and kept.dtype == torch.long
    assert bool((kept.diff(dim=1) > 0).all()) and 0 <= int(kept.min()) and int(kept.max()) < 64
    assert not torch.equal(kept[0], kept[1])  # chosen per image
    assert torch.equal(kept, ref['kept_index'])
    torch.testing.assert_close(feats['cls'], ref['cls'], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats['patch_mean'], ref['patch_mean'], atol=1e-4, rtol=1e-4)


def test_sparse_pruning_with_covering_window_equals_dense_pruning() -> None:
    dense = tiny_model(token_pruning=True, prune_after=1)
    sparse = tiny_model(token_pruning=True, prune_after=1, attn_mode='sparse', window_size=16)
    image = torch.randn(1, 3, 6 * 14, 10 * 14)
    with torch.no_grad():
        a, b = features(dense, image), features(sparse, image)
    assert torch.equal(a['kept_index'], b['kept_index']) and a['kept_index'].shape == (1, 24)
    torch.testing.assert_close(a['cls'], b['cls'], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('attn_mode', ['dense', 'sparse'])
def test_zero_ratio_is_exactly_unpruned(attn_mode: str) -> None:
    pruned = tiny_model(attn_mode=attn_mode, window_size=2, token_pruning=True, prune_ratio=0.0, prune_after=2)
    plain = tiny_model(attn_mode=attn_mode, window_size=2)
    image = torch.randn(2, 3, 5 * 14, 7 * 14)
    with torch.no_grad():
        a, b = features(pruned, image), features(plain, image)
    assert torch.equal(a['cls'], b['cls']) and torch.equal(a['patch_mean'], b['patch_mean'])
    assert torch.equal(a['kept_index'], torch.arange(35).expand(2, -1)) and b['kept_index'] is None


def test_dense_maps_after_pruning_raise() -> None:
    model = tiny_model(token_pruning=True, prune_after=2)
    with pytest.raises(ValueError, match='token_pruning removes patch tokens'):
        model(torch.randn(1, 3, 56, 56))


def test_maps_before_pruning_are_unaffected() -> None:
    pruned = tiny_model(token_pruning=True, prune_after=2, out_indices=(0, 1))
    plain = tiny_model(out_indices=(0, 1))
    image = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        for a, b in zip(pruned(image), plain(image)):
            assert torch.equal(a, b)


@pytest.mark.parametrize('prune_after', [0, 3])
def test_prune_after_out_of_range(prune_after: int) -> None:
    with pytest.raises(ValueError, match='prune_after'):
        SparseViT('uni2-h', **TINY, token_pruning=True, prune_after=prune_after)


def test_intermediates_and_features_with_pruning() -> None:
    """NCHW maps exist up to block prune_after; later blocks come as the kept tokens (NLC), as in forward_tokens."""
    model = tiny_model(token_pruning=True, prune_after=2)
    image = torch.randn(2, 3, 8 * 14, 8 * 14)
    G = model.num_prefix_tokens
    with torch.no_grad():
        out = model.forward_tokens(image)
        final, [before, after] = model.forward_intermediates(image, indices=[1, 2], output_fmt='NLC')
        [grid_map] = model.forward_intermediates(image, indices=[1], intermediates_only=True, stop_early=True)
    assert out.kept_index.shape == (2, 26) and out.tokens.shape == (2, G + 26, TINY['embed_dim'])
    torch.testing.assert_close(final, out.tokens, atol=0, rtol=0)
    assert torch.equal(model.forward_features(image), out.tokens)
    assert before.shape == (2, 64, TINY['embed_dim']) and after.shape == (2, 26, TINY['embed_dim'])
    torch.testing.assert_close(grid_map.flatten(2).transpose(1, 2), before, atol=0, rtol=0)
    with pytest.raises(ValueError, match='token_pruning removes patch tokens after block 2'):
        model.forward_intermediates(image, indices=[2])


def test_dense_and_sparse_rank_by_the_same_float32_rows() -> None:
    """Both modes score patches by the global rows of ops.global_attention_probs: softmax in float32, here for
    a bf16 model, compared with an explicit computation (dense mode once had its own rows in the input dtype)."""
    dense = tiny_model().to(torch.bfloat16)
    sparse = tiny_model(attn_mode='sparse', window_size=2).to(torch.bfloat16)
    G = dense.num_prefix_tokens
    tokens = torch.randn(2, G + 64, TINY['embed_dim'], dtype=torch.bfloat16)
    block, attn = dense.blocks[0], dense.blocks[0].attn
    B, N, C = tokens.shape
    with torch.no_grad():
        q, k, _ = attn.qkv(block.norm1(tokens)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = ((q[:, :, :G] @ k.transpose(-2, -1)) * attn.scale).float().softmax(dim=-1)
        assert probs.amax() > 0.05  # far from uniform (1 / 73): the scores matter
        dense_rows, sparse_rows = block.global_attention(tokens), sparse.blocks[0].global_attention(tokens)
    assert dense_rows.shape == (2, attn.num_heads, G, 64) and dense_rows.dtype == torch.bfloat16
    torch.testing.assert_close(dense_rows, probs.to(torch.bfloat16)[..., G:], atol=0, rtol=0)
    assert torch.equal(dense_rows, sparse_rows)


@pytest.mark.parametrize('attn_mode', ['dense', 'sparse'])
def test_pruned_model_trains(attn_mode: str) -> None:
    """Gradients flow through the kept tokens to every parameter (the scores themselves only pick indices)."""
    model = tiny_model(attn_mode=attn_mode, window_size=2, token_pruning=True, prune_after=1).train()
    tokens = model.forward_features(torch.randn(2, 3, 6 * 14, 6 * 14))
    assert tokens.shape == (2, model.num_prefix_tokens + 15, TINY['embed_dim'])
    (tokens * torch.randn_like(tokens)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
