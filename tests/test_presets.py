"""Every pathology preset is the published architecture: a random-init SparseViT with the preset at reduced depth
equals the reference model built from that model's own hub recipe (timm's ``create_model`` with the kwargs of its
config.json / model card) to 1e-5 in dense mode, at 224 px and at a larger size, and gives the tile embedding
its authors prescribe.

The references below are written from the model cards independently of ``presets.py``; only the depth is
reduced (2 blocks), widths are the real ones. Models published in ``transformers``' layout (Phikon, Phikon-v2,
Hibou) are built with ``transformers`` from their config.json values, saved with ``save_pretrained`` (which
writes the hub's key layout) and loaded through SparseViT's own loader, so the key conversion is part of what
is checked.
"""
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import SwiGLUPacked
from transformers import (Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig,
                          ViTModel)

from mmseg_sparsevit.models import SparseViT
from mmseg_sparsevit.models.presets import ARCH_PRESETS, PRETRAINED
from vit_reference import sharpen

DEPTH = 2


def cls_token(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 0]


def cls_and_patch_mean(first_patch: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Virchow's model-card embedding: CLS concatenated with the mean of the patch tokens (from ``first_patch``)."""
    return lambda tokens: torch.cat([tokens[:, 0], tokens[:, first_patch:].mean(1)], dim=-1)


SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
# preset -> (timm architecture, kwargs as the hub config / model card pass them, the model card's tile embedding)
TIMM_REFERENCES: Dict[str, Tuple[str, dict, Callable]] = {
    'uni2-h': ('vit_giant_patch14_224', dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8, dynamic_img_size=True, **SWIGLU),
        cls_token),
    'uni': ('vit_large_patch16_224', dict(
        img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True), cls_token),
    'virchow': ('vit_huge_patch14_224', dict(
        img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool='', dynamic_img_size=True,
        **SWIGLU), cls_and_patch_mean(1)),
    'virchow2': ('vit_huge_patch14_224', dict(
        img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool='',
        dynamic_img_size=True, **SWIGLU), cls_and_patch_mean(5)),
    # The model cards pass dynamic_img_size=False (224 px only); True lets the same weights run at other sizes.
    'h-optimus-0': ('vit_giant_patch14_reg4_dinov2', dict(
        img_size=224, init_values=1e-5, num_classes=0, global_pool='token', dynamic_img_size=True), cls_token),
    'h-optimus-1': ('vit_giant_patch14_reg4_dinov2', dict(
        img_size=224, init_values=1e-5, num_classes=0, global_pool='token', dynamic_img_size=True), cls_token),
    'gigapath': ('vit_giant_patch14_dinov2', dict(
        img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
        mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True), cls_token),
}


def timm_pair(preset: str) -> Tuple[nn.Module, SparseViT]:
    name, kwargs, _ = TIMM_REFERENCES[preset]
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, **{**kwargs, 'depth': DEPTH}).eval()
    sharpen(ref)
    model = SparseViT(preset, depth=DEPTH).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return ref, model


def larger_size(preset: str) -> int:
    """A non-native size: a 20 x 20 patch grid, so the position embedding is resized."""
    return 20 * ARCH_PRESETS[preset].patch_size


@pytest.mark.parametrize('preset', sorted(TIMM_REFERENCES))
def test_timm_presets_equal_the_hub_architecture(preset: str) -> None:
    ref, model = timm_pair(preset)
    embedding = TIMM_REFERENCES[preset][2]
    for size in (224, larger_size(preset)):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            expected = ref.forward_features(x)
            tokens = model.forward_features(x)
        assert tokens.shape == expected.shape
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.pool(tokens), embedding(expected), atol=1e-5, rtol=0)


# preset -> (transformers model built from the hub config.json values, the model card's tile embedding)
TRANSFORMERS_REFERENCES: Dict[str, Tuple[Callable[[int], nn.Module], Callable]] = {
    'phikon': (lambda depth: ViTModel(ViTConfig(
        hidden_size=768, num_hidden_layers=depth, num_attention_heads=12, intermediate_size=3072, hidden_act='gelu',
        layer_norm_eps=1e-12, image_size=224, patch_size=16, qkv_bias=True)),
        lambda out: out.last_hidden_state[:, 0]),
    'phikon-v2': (lambda depth: Dinov2Model(Dinov2Config(
        hidden_size=1024, num_hidden_layers=depth, num_attention_heads=16, mlp_ratio=4, image_size=224,
        patch_size=16, layer_norm_eps=1e-6, use_swiglu_ffn=False, qkv_bias=True)),
        lambda out: out.last_hidden_state[:, 0]),
    'hibou-b': (lambda depth: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=768, num_hidden_layers=depth, num_attention_heads=12, mlp_ratio=4, image_size=224,
        patch_size=14, num_register_tokens=4, use_swiglu_ffn=True, layer_norm_eps=1e-6, qkv_bias=True)),
        lambda out: out.pooler_output),
}


@pytest.mark.parametrize('preset', sorted(TRANSFORMERS_REFERENCES))
def test_transformers_presets_equal_the_hub_architecture(preset: str, tmp_path: Path) -> None:
    build, embedding = TRANSFORMERS_REFERENCES[preset]
    torch.manual_seed(0)
    ref = build(DEPTH).eval()
    sharpen(ref, gamma='lambda1', query='q_proj.weight')
    ref.save_pretrained(tmp_path)  # the hub's (legacy) key layout: query/key/value, weights_in, layernorm_before
    model = SparseViT(preset, depth=DEPTH, pretrained=str(tmp_path / 'model.safetensors')).eval()
    model.init_weights()
    for size in (224, larger_size(preset)):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            out = ref(pixel_values=x, **({'interpolate_pos_encoding': True} if preset == 'phikon' else {}))
            tokens = model.forward_features(x)
        assert tokens.shape == out.last_hidden_state.shape
        torch.testing.assert_close(tokens, out.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.pool(tokens), embedding(out), atol=1e-5, rtol=0)


def test_every_pretrained_preset_has_a_reference() -> None:
    """The equality tests above (and the transformers-layout ones) cover each published preset."""
    assert set(PRETRAINED) <= set(ARCH_PRESETS)
    assert set(TIMM_REFERENCES) | set(TRANSFORMERS_REFERENCES) == set(PRETRAINED)


def test_checkpoint_pos_embed_is_resampled_with_the_models_own_rule(tmp_path: Path) -> None:
    """Phikon stored for 224 px, built for 448 px: ``pos_embed`` resized as transformers' ViT does (bicubic, no
    antialiasing), not timm's antialiased rule, so features at 448 px match the transformers model."""
    build, _ = TRANSFORMERS_REFERENCES['phikon']
    torch.manual_seed(0)
    ref = build(1).eval()
    ref.save_pretrained(tmp_path)
    model = SparseViT('phikon', depth=1, img_size=448, pretrained=str(tmp_path / 'model.safetensors')).eval()
    model.init_weights()
    stored = ref.embeddings.position_embeddings.detach()
    grid = stored[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(28, 28), mode='bicubic', align_corners=False)
    expected = torch.cat([stored[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 28 * 28, -1)], dim=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-6, rtol=0)
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref(pixel_values=x, interpolate_pos_encoding=True)
                                   .last_hidden_state, atol=1e-5, rtol=0)
