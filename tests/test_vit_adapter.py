"""SparseViTAdapter: pyramid shapes on patch-14/16 ViTs, gradients, global tokens, options, errors.

Forward tests use the real presets (patch size, registers, SwiGLU) at reduced depth 4 and width 96
(3 heads) with a 16-channel conv stem, so that a 448 x 448 pass stays well under a second per
direction on CPU; the real-width models are built on the meta device for the parameter counts.
"""
import math

import pytest
import torch
import torch.nn as nn

import mmseg_sparsevit  # noqa: F401  (registers the models)
from mmseg.registry import MODELS
from mmseg_sparsevit.models.adapter_modules import deform_inputs, reference_points
from mmseg_sparsevit.models.vit_adapter import (SparseViTAdapter, check_interaction_indexes,
                                                even_interaction_indexes)

STRIDES = (4, 8, 16, 32)


def tiny_adapter(arch: str = 'uni2-h', **kwargs) -> SparseViTAdapter:
    vit_cfg = dict(arch=arch, depth=4, embed_dim=96, num_heads=3, **kwargs.pop('vit_cfg', {}))
    cfg = dict(type='SparseViTAdapter', vit_cfg=vit_cfg, conv_inplane=16, **kwargs)
    return MODELS.build(cfg)


def wake_deform_attention(model: nn.Module) -> None:
    """Give the zero-initialised sampling-offset / attention-weight projections small weights.

    At init they ignore their input (as in ViT-Adapter), so the query LayerNorms would get an
    exactly zero gradient; after one optimiser step they do not.
    """
    torch.manual_seed(1)
    for name, module in model.named_modules():
        if name.endswith(('sampling_offsets', 'attention_weights')):
            nn.init.normal_(module.weight, std=1e-2)


@pytest.mark.parametrize('arch,size', [
    ('uni2-h', (448, 448)),  # patch 14: ViT grid 32 x 32, not the 28 x 28 a 1/16 grid would give
    ('uni2-h', (112, 182)),  # non-square, not multiples of 32
    ('vit-b', (448, 448)),
    ('vit-b', (176, 240)),
])
def test_four_maps_at_strides_4_8_16_32(arch, size):
    torch.manual_seed(0)
    model = tiny_adapter(arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert len(outs) == 4
    for out, stride in zip(outs, STRIDES):
        expected = (2, 96, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert tuple(out.shape) == expected, (stride, tuple(out.shape))
        assert torch.isfinite(out).all()


def test_deformable_attention_uses_the_vit_grid_for_patch_14():
    """Injector values live on the prior levels, extractor values on the 1/14 ViT grid."""
    model = tiny_adapter('uni2-h').eval()
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = (kwargs['spatial_shapes'].tolist(), tuple(kwargs['query'].shape),
                          tuple(kwargs['reference_points'].shape))
        return hook

    block = model.interactions[0]
    block.injector.attn.register_forward_pre_hook(record('injector'), with_kwargs=True)
    block.extractors[0].attn.register_forward_pre_hook(record('extractor'), with_kwargs=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 336))
    priors = [[28, 42], [14, 21], [7, 11]]  # ceil(224/8, 336/8), ceil(/16), ceil(/32)
    grid = [16, 24]  # 224/14, 336/14
    assert seen['injector'] == (priors, (1, 16 * 24, 96), (1, 16 * 24, 1, 2))
    n_prior = sum(h * w for h, w in priors)
    assert seen['extractor'] == ([grid], (1, n_prior, 96), (1, n_prior, 1, 2))


def test_global_tokens_pass_the_adapter_untouched():
    """CLS + 8 registers enter every block group as the ViT left them; only patches are injected."""
    model = tiny_adapter('uni2-h', init_values=1.0).eval()
    wake_deform_attention(model)
    x = torch.randn(1, 3, 112, 112)
    entering, leaving = {}, {}

    def keep(store, index, tokens):
        store[index] = tokens.clone()

    for index, block in enumerate(model.vit.blocks):  # each block is its own group at depth 4
        block.register_forward_pre_hook(lambda m, args, i=index: keep(entering, i, args[0]))
        block.register_forward_hook(lambda m, args, out, i=index: keep(leaving, i, out))
    with torch.no_grad():
        tokens, _ = model.vit.prepare_tokens(x)
        model(x)
    g = model.vit.num_prefix_tokens
    assert g == 9
    assert entering[0].shape[1] == g + 8 * 8
    torch.testing.assert_close(entering[0][:, :g], tokens[:, :g], rtol=0, atol=0)
    assert not torch.allclose(entering[0][:, g:], tokens[:, g:])  # the injector did act
    for index in (1, 2, 3):
        torch.testing.assert_close(entering[index][:, :g], leaving[index - 1][:, :g], rtol=0, atol=0)


@pytest.mark.parametrize('window,same_as_dense', [(16, True), (2, False)])
def test_sparse_vit_inside_the_adapter(window, same_as_dense):
    """A window covering the whole 8 x 10 grid is dense attention; a small one is not."""
    torch.manual_seed(0)
    layer_scale = dict(init_values=1.0)  # UNI-2's 1e-5 would hide any attention difference
    dense = tiny_adapter('uni2-h', init_values=0.5, vit_cfg=layer_scale).eval()
    wake_deform_attention(dense)
    sparse = tiny_adapter('uni2-h', init_values=0.5,
                          vit_cfg=dict(layer_scale, attn_mode='sparse', window_size=window)).eval()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 112, 140)
    with torch.no_grad():
        pairs = list(zip(dense(x), sparse(x)))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in pairs) == same_as_dense


@pytest.mark.parametrize('attention', [dict(attn_mode='dense'), dict(attn_mode='sparse', window_size=4)])
def test_gradients_reach_every_parameter_of_vit_and_adapter(attention):
    torch.manual_seed(0)
    model = tiny_adapter('uni2-h', init_values=0.1, vit_cfg=attention).train()
    wake_deform_attention(model)
    outs = model(torch.randn(2, 3, 112, 140))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert any(n.startswith('vit.blocks.') for n, _ in model.named_parameters())
    assert model.vit.reg_token.grad is not None


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tiny_adapter('vit-b', init_values=0.1).train()
    wake_deform_attention(plain)
    ckpt = tiny_adapter('vit-b', init_values=0.1, with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 96, 128)
    results, calls = [], []
    for model in (plain, ckpt):
        count = []
        model.vit.blocks[0].register_forward_hook(lambda *args, count=count: count.append(1))
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        results.append((outs, {n: p.grad for n, p in model.named_parameters()}))
        calls.append(len(count))
    assert calls == [1, 2]  # checkpointing recomputes the interaction in the backward pass
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize('how', [dict(freeze_vit=True), dict(vit_cfg=dict(frozen=True))])
def test_freeze_vit_trains_only_adapter(how):
    model = tiny_adapter('uni2-h', **how).train()
    assert not model.vit.blocks.training and model.spm.training
    assert all(not p.requires_grad for p in model.vit.parameters())
    outs = model(torch.randn(1, 3, 112, 112))
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is None for p in model.vit.parameters())
    assert model.interactions[0].injector.gamma.grad is not None  # reached through the frozen ViT
    assert model.spm.projs[0].weight.grad is not None


@pytest.mark.parametrize('vit_cfg,match', [
    (dict(token_pruning=True), 'token pruning'),
    (dict(token_pruning=True, prune_ratio=0.6), 'token pruning'),
])
def test_incompatible_vit_options_are_rejected(vit_cfg, match):
    with pytest.raises(ValueError, match=match):
        tiny_adapter('uni2-h', vit_cfg=vit_cfg)


@pytest.mark.parametrize('shape,match', [
    ((1, 3, 450, 448), r'450.*patch size 14'),
    ((1, 3, 448, 100), r'100.*patch size 14'),
    ((1, 1, 112, 112), r'\(B, 3, H, W\).*\(1, 1, 112, 112\)'),
])
def test_bad_input_shapes_fail_with_a_clear_message(shape, match):
    model = tiny_adapter('uni2-h')
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


@pytest.mark.parametrize('kwargs,match', [
    (dict(interaction_indexes=[[0, 1], [3, 3]]), 'start at block 2'),
    (dict(interaction_indexes=[[0, 1], [2, 2]], add_vit_feature=False), 'end at block 2'),
    (dict(interaction_indexes=[[0, 1], [2, 3]]), 'needs 4 interactions'),
    (dict(deform_num_heads=5), 'divisible'),
])
def test_bad_adapter_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_adapter('vit-b', **kwargs)


def test_two_interactions_without_vit_feature_add():
    model = tiny_adapter('vit-b', interaction_indexes=[[0, 1], [2, 3]], add_vit_feature=False).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]


@pytest.mark.parametrize('depth,expected', [
    (12, [[0, 2], [3, 5], [6, 8], [9, 11]]),  # ViT-Adapter T/S/B
    (24, [[0, 5], [6, 11], [12, 17], [18, 23]]),  # ViT-Adapter L, UNI-2
    (4, [[0, 0], [1, 1], [2, 2], [3, 3]]),
])
def test_even_interaction_groups(depth, expected):
    assert even_interaction_indexes(depth) == expected
    check_interaction_indexes(expected, depth)


def test_reference_points_are_pixel_centres():
    ref = reference_points([(2, 4), (1, 1)], torch.device('cpu'))
    assert ref.shape == (1, 9, 1, 2)
    torch.testing.assert_close(ref[0, :4, 0], torch.tensor([[.125, .25], [.375, .25], [.625, .25], [.875, .25]]))
    torch.testing.assert_close(ref[0, 4, 0], torch.tensor([.125, .75]))
    torch.testing.assert_close(ref[0, 8, 0], torch.tensor([.5, .5]))
    inputs = deform_inputs([(1, 1)], [(4, 6), (2, 3), (1, 2)], torch.device('cpu'))
    assert inputs.spatial_shapes.tolist() == [[4, 6], [2, 3], [1, 2]]
    assert inputs.level_start_index.tolist() == [0, 24, 30]


def vit_adapter_b_parameters(dim=768, heads=12, ratio=0.5, points=4, inplane=64, cffn_ratio=0.25,
                             interactions=4, extra_extractors=2) -> int:
    """Parameter count of the original ViT-Adapter (czczup/ViT-Adapter, segmentation/), from its design.

    Spatial prior module (bias-free convs + BN, 1x1 projections with bias), level embedding,
    injectors (2 LN, 3-level MSDeformAttn, gamma), extractors (2 LN, 1-level MSDeformAttn, LN,
    ConvFFN), the 2x2 transposed conv and the four output BatchNorms.
    """
    def linear(i, o):
        return i * o + o

    def msda(levels):
        value = int(dim * ratio)
        return (linear(dim, heads * levels * points * 2) + linear(dim, heads * levels * points)
                + linear(dim, value) + linear(value, dim))

    layer_norm, hidden = 2 * dim, int(dim * cffn_ratio)
    widths = [3, inplane, inplane, inplane, 2 * inplane, 4 * inplane, 4 * inplane]
    spm = sum(9 * i * o + 2 * o for i, o in zip(widths, widths[1:]))
    spm += sum(linear(c, dim) for c in (inplane, 2 * inplane, 4 * inplane, 4 * inplane))
    injector = 2 * layer_norm + msda(3) + dim
    extractor = 3 * layer_norm + msda(1) + linear(dim, hidden) + 10 * hidden + linear(hidden, dim)
    return (spm + 3 * dim + interactions * injector + (interactions + extra_extractors) * extractor
            + 4 * dim * dim + dim + 4 * 2 * dim)


def adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith('vit.'))


def test_vit_b_adapter_matches_the_original_parameter_count():
    with torch.device('meta'):
        model = MODELS.build(dict(type='SparseViTAdapter', vit_cfg=dict(arch='vit-b'),
                                  deform_num_heads=12, deform_ratio=0.5))
    assert model.interaction_indexes == [[0, 2], [3, 5], [6, 8], [9, 11]]
    assert adapter_parameters(model) == vit_adapter_b_parameters() == 13_680_608


def test_uni2_adapter_at_real_width():
    """UNI-2-h width (1536, 24 deform heads) at depth 4: only the ViT depth is reduced."""
    with torch.device('meta'):
        model = MODELS.build(dict(type='SparseViTAdapter', vit_cfg=dict(arch='uni2-h', depth=4),
                                  deform_num_heads=24, deform_ratio=0.5))
    assert model.vit.embed_dim == 1536 and model.vit.patch_size == 14
    assert adapter_parameters(model) == vit_adapter_b_parameters(dim=1536, heads=24)
    assert model.out_norms[0].num_features == 1536


def test_vit_weights_load_through_the_adapter(tmp_path):
    """A timm checkpoint of the UNI-2 layout (incl. the final norm the adapter drops) loads via
    ``vit_cfg.pretrained`` when the runner calls ``init_weights``; the adapter keeps its init."""
    import timm
    from mmseg_sparsevit.models import get_arch, timm_kwargs
    arch = dict(depth=4, embed_dim=96, num_heads=3)
    reference = timm.models.VisionTransformer(**timm_kwargs(get_arch('uni2-h', **arch)))
    path = tmp_path / 'uni2-tiny.pth'
    torch.save(reference.state_dict(), path)
    model = tiny_adapter('uni2-h', vit_cfg=dict(pretrained=str(path)))
    gamma = model.interactions[0].injector.gamma.clone()
    model.init_weights()
    for name, value in model.vit.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.interactions[0].injector.gamma, gamma)
