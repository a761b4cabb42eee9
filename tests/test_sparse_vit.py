"""SparseViT backbone: equality with timm's VisionTransformer (maps, forward_features, forward_intermediates),
sparse == dense when windows cover the grid, gradients, checkpointing, register stripping, embedding recipes,
attention settings checked at build time, presets and mmseg registration.

Models are the real architecture families (SwiGLU + 8 registers + no_embed_class + patch 14 for UNI-2,
class-token position embedding + patch 16 for UNI) at reduced width and depth.
"""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mmseg_sparsevit.models import ARCH_PRESETS, SparseViT, get_arch, timm_kwargs
from mmseg_sparsevit.models.sparse_vit import tokens_to_nchw
from mmseg_sparsevit.ops import SparseAttention
from vit_reference import sharpen

TINY = dict(embed_dim=96, depth=2, num_heads=4)


def build_pair(arch: str, **kwargs) -> tuple:
    """A timm reference model and a SparseViT with the same (random) weights, both in eval mode.

    Layer-scale gammas (1e-5 at init) are raised to O(1) and the qkv weights sharpened so that the
    attention branch, and thus any attention bug, visibly changes the output.
    """
    torch.manual_seed(0)
    ref = VisionTransformer(**timm_kwargs(get_arch(arch, **TINY))).eval()
    sharpen(ref)
    model = SparseViT(arch, **TINY, **kwargs).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


def grid_map(tokens: torch.Tensor, num_prefix: int, grid: int) -> torch.Tensor:
    """Independent reference: patch tokens (after the prefix) as an NCHW map."""
    patches = tokens[:, num_prefix:]
    return patches.reshape(tokens.shape[0], grid, grid, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize('arch', ['uni2-h', 'uni'])
@pytest.mark.parametrize('size', [224, 448])
def test_dense_matches_timm(arch: str, size: int) -> None:
    ref, model = build_pair(arch, out_indices=(0, 1))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        final, (inter0, _) = ref.forward_intermediates(x, indices=[0, 1], norm=False)
        map0, map1 = model(x)
        feats = model.forward_tokens(x)
        features = model.forward_features(x)
    grid, num_prefix = size // model.patch_size, ref.num_prefix_tokens
    assert map0.shape == map1.shape == (1, TINY['embed_dim'], grid, grid)
    torch.testing.assert_close(map0, inter0, atol=1e-5, rtol=0)
    torch.testing.assert_close(map1, grid_map(final, num_prefix, grid), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.tokens, final, atol=1e-5, rtol=0)
    assert torch.equal(features, feats.tokens)
    torch.testing.assert_close(model.pool(feats.tokens), final[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.pool(feats.tokens, 'avg'), final[:, num_prefix:].mean(1), atol=1e-5, rtol=0)
    assert feats.grid_hw == (grid, grid) and feats.kept_index is None


@pytest.mark.parametrize(('norm', 'output_fmt', 'indices', 'num_taken'), [
    (False, 'NCHW', None, 2), (True, 'NCHW', [-2], 1), (False, 'NLC', 1, 1), (True, 'NLC', [0, 1], 2)])
def test_forward_intermediates_match_timm(norm: bool, output_fmt: str, indices, num_taken: int) -> None:
    ref, model = build_pair('uni2-h')
    x = torch.randn(2, 3, 84, 112)
    kwargs = dict(indices=indices, norm=norm, output_fmt=output_fmt, return_prefix_tokens=True)
    with torch.no_grad():
        ref_final, ref_inter = ref.forward_intermediates(x, **kwargs)
        final, inter = model.forward_intermediates(x, **kwargs)
        only = model.forward_intermediates(x, **kwargs, intermediates_only=True, stop_early=True)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=0)
    assert len(inter) == len(ref_inter) == len(only) == num_taken
    for (patches, prefix), (ref_patches, ref_prefix), (early, _) in zip(inter, ref_inter, only):
        assert patches.shape == ref_patches.shape and prefix.shape == (2, 9, TINY['embed_dim'])
        torch.testing.assert_close(patches, ref_patches, atol=1e-5, rtol=0)
        torch.testing.assert_close(prefix, ref_prefix, atol=1e-5, rtol=0)
        torch.testing.assert_close(early, patches, atol=0, rtol=0)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_global_tokens_match_timm_prefix_tokens() -> None:
    ref, model = build_pair('uni2-h')
    x = torch.randn(2, 3, 112, 140)
    with torch.no_grad():
        [(timm_map, timm_prefix)] = ref.forward_intermediates(
            x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
        [(feature_map, global_tokens)] = model.forward_intermediates(
            x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
    assert global_tokens.shape == (2, 9, TINY['embed_dim'])
    assert feature_map.shape == (2, TINY['embed_dim'], 8, 10)
    torch.testing.assert_close(global_tokens, timm_prefix, atol=1e-5, rtol=0)
    torch.testing.assert_close(feature_map, timm_map, atol=1e-5, rtol=0)


def test_fused_and_vanilla_attention_agree() -> None:
    _, model = build_pair('uni2-h')
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        fused = model.forward_features(x)
        for block in model.blocks:
            block.attn.fused_attn = False
        vanilla = model.forward_features(x)
    torch.testing.assert_close(fused, vanilla, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('neighbourhood', ['block', 'sliding'])
@pytest.mark.parametrize('arch', ['uni2-h', 'uni'])
def test_sparse_with_window_covering_grid_equals_dense(arch: str, neighbourhood: str) -> None:
    _, dense = build_pair(arch, out_indices=(0, 1))
    sparse = SparseViT(arch, **TINY, out_indices=(0, 1), attn_mode='sparse', window_size=16,
                       neighbourhood=neighbourhood).eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 8 * dense.patch_size, 6 * dense.patch_size)
    with torch.no_grad():
        for a, b in zip(dense(x), sparse(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_small_window_sparse_differs_from_dense() -> None:
    """Guards the test above: a window smaller than the grid must actually change the output."""
    _, dense = build_pair('uni2-h')
    sparse = SparseViT('uni2-h', **TINY, attn_mode='sparse', window_size=2).eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 12 * 14, 12 * 14)
    with torch.no_grad():
        assert (dense(x)[0] - sparse(x)[0]).abs().max() > 0.1


def test_sparse_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = SparseViT('uni2-h', **TINY, attn_mode='sparse', window_size=2, drop_path_rate=0.1).train()
    model(torch.randn(2, 3, 8 * 14, 8 * 14))[0].square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'parameters without gradient: {no_grad}'


@pytest.mark.parametrize('attn_mode', ['dense', 'sparse'])
def test_checkpointing_keeps_outputs_and_gradients(attn_mode: str) -> None:
    torch.manual_seed(0)
    model = SparseViT('uni2-h', **TINY, attn_mode=attn_mode, window_size=2).train()
    x = torch.randn(1, 3, 6 * 14, 6 * 14)
    grads, outs = [], []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(x)[0]
        out.sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_registers_are_stripped_before_reshape() -> None:
    """Prefix tokens are NaN, patch tokens encode (cell, channel): the map must hold exactly the codes."""
    model = SparseViT('uni2-h', **TINY)
    H, W, C = 3, 5, TINY['embed_dim']
    codes = (torch.arange(H * W)[:, None] + 1000 * torch.arange(C)[None]).float().expand(2, -1, -1)
    tokens = torch.cat([torch.full((2, model.num_prefix_tokens, C), float('nan')), codes], dim=1)
    feature_map = tokens_to_nchw(tokens, (H, W), model.num_prefix_tokens)
    expected = codes.reshape(2, H, W, C).permute(0, 3, 1, 2)
    assert torch.equal(feature_map, expected)
    with pytest.raises(ValueError, match='do not fill grid'):
        tokens_to_nchw(tokens, (H, W + 1), model.num_prefix_tokens)


@pytest.mark.parametrize(('arch', 'recipe'), [('uni2-h', 'token'), ('virchow2', 'token+avg')])
def test_embedding_recipes_exclude_registers(arch: str, recipe: str) -> None:
    """CLS is 1, registers NaN, patches their codes: each recipe must hold exactly CLS and / or the patch mean."""
    model = SparseViT(arch, **TINY, global_pool=recipe)
    assert model.global_pool == recipe
    G, C = model.num_prefix_tokens, TINY['embed_dim']
    codes = torch.randn(2, 15, C)
    tokens = torch.cat([torch.ones(2, 1, C), torch.full((2, G - 1, C), float('nan')), codes], dim=1)
    assert torch.equal(model.pool(tokens, 'token'), torch.ones(2, C))
    torch.testing.assert_close(model.pool(tokens, 'avg'), codes.mean(1), atol=0, rtol=0)
    expected = torch.ones(2, C) if recipe == 'token' else torch.cat([torch.ones(2, C), codes.mean(1)], dim=1)
    torch.testing.assert_close(model.pool(tokens), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="pool_type must be one of .*got 'cls'"):
        model.pool(tokens, 'cls')
    with pytest.raises(ValueError, match="global_pool must be one of .*got 'mean'"):
        SparseViT(arch, **TINY, global_pool='mean')


def test_attention_settings_reach_the_kernel() -> None:
    """window_size etc. go from the constructor through a typed AttentionConfig to ops.SparseAttention."""
    sparse = SparseViT('uni2-h', **TINY, attn_mode='sparse', window_size=3, neighbourhood='sliding',
                       sparse_backend='gather')
    for block in sparse.blocks:
        kernel = block.attn.sparse_attn
        assert isinstance(kernel, SparseAttention)
        assert (kernel.window_size, kernel.neighbourhood, kernel.backend) == (3, 'sliding', 'gather')
    dense = SparseViT('uni2-h', **TINY, fused_attn=False)
    assert all(b.attn.sparse_attn is None and not b.attn.fused_attn for b in dense.blocks)


@pytest.mark.parametrize('attn_mode', ['dense', 'sparse'])
@pytest.mark.parametrize(('kwargs', 'match'), [
    (dict(window_size=0), 'window_size.*0'), (dict(window_size=-1), 'window_size.*-1'),
    (dict(window_size=2.5), 'window_size.*2.5'), (dict(neighbourhood='blocks'), "neighbourhood.*'blocks'"),
    (dict(sparse_backend='flexx'), "backend.*'flexx'"),
])
def test_bad_attention_settings_fail_at_build_time(attn_mode: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparseViT('uni2-h', **TINY, attn_mode=attn_mode, **kwargs)


def test_bad_attn_mode_fails_at_build_time() -> None:
    with pytest.raises(ValueError, match="attn_mode must be one of .*got 'sprase'"):
        SparseViT('uni2-h', **TINY, attn_mode='sprase')


def test_prepare_tokens_layout() -> None:
    model = SparseViT('uni2-h', **TINY)
    tokens, grid_hw = model.prepare_tokens(torch.randn(2, 3, 70, 42))
    assert grid_hw == (5, 3) and tokens.shape == (2, 9 + 15, TINY['embed_dim'])
    torch.testing.assert_close(tokens[:, 1:9], model.reg_token.expand(2, -1, -1))
    with pytest.raises(ValueError, match='patch_size=14'):
        model.prepare_tokens(torch.randn(1, 3, 70, 43))


def test_out_indices_and_frozen() -> None:
    model = SparseViT('vit-s', embed_dim=64, depth=4, num_heads=2, out_indices=(-1, 1), frozen=True)
    assert model.out_indices == (1, 3)
    outs = model(torch.randn(1, 3, 64, 48))
    assert [o.shape for o in outs] == [(1, 64, 4, 3)] * 2
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.blocks.training and model.training
    with pytest.raises(ValueError, match='out of range'):
        SparseViT('vit-s', embed_dim=64, depth=4, num_heads=2, out_indices=4)


# Hibou's registers have no position embedding while its class token has one, which timm's ViT cannot build;
# tests/test_presets.py checks it against transformers' model instead.
@pytest.mark.parametrize('arch', sorted(a for a, arch in ARCH_PRESETS.items() if arch.reg_pos_embed))
def test_full_size_presets_match_timm_layout(arch: str) -> None:
    """Full-size models on the meta device: identical state-dict keys and shapes to timm's model."""
    with torch.device('meta'):
        ours = SparseViT(arch).state_dict()
        ref = VisionTransformer(**timm_kwargs(get_arch(arch))).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_uni2_preset_facts() -> None:
    with torch.device('meta'):
        model = SparseViT('uni2-h')
    assert model.num_prefix_tokens == 9 and model.patch_size == 14 and model.embed_dim == 1536
    assert model.pos_embed.shape == (1, 256, 1536)
    assert model.blocks[0].mlp.fc2.in_features == 4096
    assert 675e6 < sum(p.numel() for p in model.parameters()) < 690e6


def test_arch_overrides_and_errors() -> None:
    assert get_arch('vit-b', patch_size=14, depth=3).patch_size == 14
    with pytest.raises(KeyError, match='available presets'):
        get_arch('vit-x')
    with pytest.raises(TypeError, match='unknown arch override'):
        get_arch('vit-b', heads=3)
    with pytest.raises(ValueError, match='divisible by num_heads'):
        get_arch('vit-b', num_heads=5)


def test_registered_in_mmseg_models() -> None:
    from mmseg.registry import MODELS  # a hard dependency: never skip this check

    import mmseg_sparsevit.models  # noqa: F401  (registers SparseViT)
    model = MODELS.build(dict(type='SparseViT', arch='vit-s', embed_dim=64, depth=2, num_heads=2))
    assert isinstance(model, SparseViT)
    assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 64, 2, 2)
