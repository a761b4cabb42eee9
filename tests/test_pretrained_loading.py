"""Loading timm / hub-format state dicts (.bin, .pth, .safetensors) into SparseViT: containers, prefixes,
pos-embed resampling, classifier heads, and errors that list missing / unexpected keys and name the file."""
import pickle
from pathlib import Path
from typing import Optional

import pytest
import torch
from mmengine.model import BaseModule
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from mmseg_sparsevit.models import SparseViT, get_arch, timm_kwargs

TINY = dict(embed_dim=96, depth=2, num_heads=4)


def timm_model(arch: str = 'uni2-h', **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**timm_kwargs(get_arch(arch, **TINY)), **kwargs}).eval()


def write(state: dict, path: Path, container: Optional[str] = None) -> str:
    """Save ``state`` as the hub / training tools do: safetensors, or torch.save optionally wrapped."""
    if path.suffix == '.safetensors':
        save_file(state, str(path))
    else:
        torch.save({container: state, 'meta': {'epoch': 3}} if container else state, path)
    return str(path)


def features(model: torch.nn.Module, size: int = 112) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return model.forward_features(x)[:, 0]  # the same timm method on both models


@pytest.mark.parametrize(('name', 'container'), [
    ('pytorch_model.bin', None), ('model.safetensors', None), ('epoch_3.pth', 'state_dict'),
    ('checkpoint.pth', 'model')])
def test_pretrained_argument_loads_hub_files(tmp_path: Path, name: str, container: Optional[str]) -> None:
    ref = timm_model()
    path = write(ref.state_dict(), tmp_path / name, container)
    model = SparseViT('uni2-h', **TINY, pretrained=path).eval()
    assert not torch.equal(model.pos_embed, ref.pos_embed)  # weights arrive in init_weights, not __init__
    model.init_weights()
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.testing.assert_close(features(model), features(ref), atol=1e-5, rtol=0)


def test_init_cfg_pretrained_with_prefix_through_parent_module(tmp_path: Path) -> None:
    """As in an mmseg segmentor: the runner calls init_weights on the parent, which reaches the backbone."""
    ref = timm_model()
    path = write({f'backbone.{k}': v for k, v in ref.state_dict().items()}, tmp_path / 'seg.pth', 'state_dict')

    class Parent(BaseModule):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = SparseViT(
                'uni2-h', **TINY, init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))

    parent = Parent()
    parent.init_weights()
    torch.testing.assert_close(features(parent.backbone.eval()), features(ref), atol=1e-5, rtol=0)


def test_init_cfg_list_applies_other_initialisers_before_pretrained(tmp_path: Path) -> None:
    ref = timm_model()
    path = write(ref.state_dict(), tmp_path / 'w.safetensors')
    constant = dict(type='Constant', layer='Linear', val=0.5)
    only_constant = SparseViT('uni2-h', **TINY, init_cfg=[constant])
    only_constant.init_weights()
    assert bool((only_constant.blocks[1].attn.qkv.weight == 0.5).all())
    both = SparseViT('uni2-h', **TINY, init_cfg=[constant, dict(type='Pretrained', checkpoint=path)]).eval()
    both.init_weights()
    torch.testing.assert_close(features(both), features(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize('arch', ['uni2-h', 'uni'])
def test_pos_embed_resampled_to_model_img_size(tmp_path: Path, arch: str) -> None:
    ref = timm_model(arch)
    path = write(ref.state_dict(), tmp_path / 'pytorch_model.bin')
    model = SparseViT(arch, **TINY, img_size=448, pretrained=path).eval()
    model.init_weights()
    grid = 448 // model.patch_size
    num_prefix = 0 if arch == 'uni2-h' else 1
    assert model.pos_embed.shape == (1, grid * grid + num_prefix, TINY['embed_dim'])
    expected = resample_abs_pos_embed(ref.pos_embed, new_size=(grid, grid), num_prefix_tokens=num_prefix)
    torch.testing.assert_close(model.pos_embed, expected, atol=0, rtol=0)
    torch.testing.assert_close(features(model, 448), features(ref, 448), atol=1e-5, rtol=0)


def test_classifier_head_is_ignored(tmp_path: Path) -> None:
    ref = timm_model(num_classes=5)
    assert 'head.weight' in ref.state_dict()
    model = SparseViT('uni2-h', **TINY, pretrained=write(ref.state_dict(), tmp_path / 'cls.bin')).eval()
    model.init_weights()
    torch.testing.assert_close(features(model), features(ref), atol=1e-5, rtol=0)


def test_switched_off_final_norm_ignores_norm_keys(tmp_path: Path) -> None:
    """``final_norm=False`` (or a norm replaced by nn.Identity, as the adapter does) loads a full checkpoint."""
    ref = timm_model()
    path = write(ref.state_dict(), tmp_path / 'w.bin')
    model = SparseViT('uni2-h', **TINY, final_norm=False, pretrained=path).eval()
    assert not any(k.startswith('norm.') for k in model.state_dict())
    model.init_weights()
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        [(_, prefix)] = ref.forward_intermediates(x, indices=[1], return_prefix_tokens=True, intermediates_only=True)
        torch.testing.assert_close(model.forward_features(x)[:, 0], prefix[:, 0], atol=1e-5, rtol=0)


def test_mismatch_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = timm_model().state_dict()
    del state['norm.weight']
    state['blocks.0.attn.q_norm.weight'] = torch.ones(24)
    path = write(state, tmp_path / 'broken.safetensors')
    model = SparseViT('uni2-h', **TINY, pretrained=path)
    with pytest.raises(KeyError) as info:
        model.init_weights()
    message = str(info.value)
    assert path in message
    assert "missing keys ['norm.weight']" in message
    assert "unexpected keys ['blocks.0.attn.q_norm.weight']" in message


def test_wrong_architecture_reports_shape_mismatch(tmp_path: Path) -> None:
    path = write(timm_model().state_dict(), tmp_path / 'uni2.bin')
    model = SparseViT('uni2-h', **TINY, reg_tokens=4, pretrained=path)
    with pytest.raises(KeyError, match=r'reg_token: file \(1, 8, 96\) vs model \(1, 4, 96\)'):
        model.init_weights()


def test_non_state_dict_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TypeError, match='list.pth does not hold a state dict'):
        SparseViT('vit-s', embed_dim=64, depth=1, num_heads=2, pretrained=str(path)).init_weights()
    with pytest.raises(FileNotFoundError, match='nowhere.bin'):
        SparseViT('vit-s', embed_dim=64, depth=1, num_heads=2, pretrained=str(tmp_path / 'nowhere.bin')).init_weights()


class _Payload:
    """An arbitrary pickled object: ``weights_only=True`` must refuse to build it."""


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / 'evil.pth'
    torch.save({'pos_embed': torch.zeros(1), 'payload': _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        SparseViT('vit-s', embed_dim=64, depth=1, num_heads=2, pretrained=str(path)).init_weights()


def test_frozen_model_stays_frozen_after_loading(tmp_path: Path) -> None:
    path = write(timm_model().state_dict(), tmp_path / 'w.bin')
    model = SparseViT('uni2-h', **TINY, frozen=True, pretrained=path)
    model.init_weights()
    assert not any(p.requires_grad for p in model.parameters())


def test_pretrained_and_init_cfg_are_exclusive() -> None:
    with pytest.raises(ValueError, match='not both'):
        SparseViT('vit-s', pretrained='a.bin', init_cfg=dict(type='Pretrained', checkpoint='a.bin'))


def damaged(tmp_path: Path, name: str, kind: str) -> str:
    """An empty, truncated (first half of a real checkpoint) or garbage weights file."""
    path = tmp_path / name
    if kind == 'empty':
        path.write_bytes(b'')
    elif kind == 'garbage':
        path.write_bytes(b'these bytes are not a checkpoint' * 8)
    else:
        write(timm_model('vit-s').state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return str(path)


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'garbage'])
@pytest.mark.parametrize('name', ['pytorch_model.bin', 'model.safetensors'])
def test_damaged_weights_file_error_names_the_file(tmp_path: Path, name: str, kind: str) -> None:
    path = damaged(tmp_path, name, kind)
    model = SparseViT('vit-s', **TINY, pretrained=path)
    with pytest.raises(ValueError) as info:
        model.init_weights()
    message = str(info.value)
    assert message.startswith(path) and 'cannot read weights' in message and 'download it again' in message
