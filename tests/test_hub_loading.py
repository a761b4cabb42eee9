"""Weights by name (``hf-hub:<org>/<name>``): read offline from a generated Hugging Face cache with the real layout
(``models--org--name/{blobs,refs/main,snapshots/<rev>}``, the repositories' own file names, random weights), with
strict key checks, and one clear sentence for each way the hub can fail."""
import hashlib
import os
from pathlib import Path
from typing import Dict

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig, ViTModel
from transformers.core_model_loading import revert_weight_conversion

from mmseg_sparsevit.models import SparseViT, get_arch, timm_kwargs
from mmseg_sparsevit.models.hub import HubWeightsError, candidate_files, parse_hub_name
from mmseg_sparsevit.models.presets import PRETRAINED

TINY = dict(embed_dim=96, depth=2, num_heads=4)
REVISION = 'a' * 40


def timm_state(arch: str = 'uni2-h') -> Dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return VisionTransformer(**timm_kwargs(get_arch(arch, **TINY))).state_dict()


def write_weights(state: Dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == '.safetensors':
        save_file(state, str(path))
    else:
        torch.save(state, path)


def cache_repo(cache: Path, repo_id: str, files: Dict[str, Dict[str, torch.Tensor]]) -> Path:
    """Write ``files`` as huggingface_hub stores a download: content in ``blobs/<sha256>``, a relative symlink in
    ``snapshots/<revision>/<name>`` and the revision in ``refs/main``. Returns the snapshot folder."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    snapshot = repo / 'snapshots' / REVISION
    (repo / 'blobs').mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(REVISION)
    for name, state in files.items():
        tmp = repo / name
        write_weights(state, tmp)
        blob = repo / 'blobs' / hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.rename(blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, with the hub switched off (huggingface_hub reads both at import)."""
    cache = tmp_path / 'hub'
    cache.mkdir()
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return cache


def loaded(arch: str, checkpoint: str) -> SparseViT:
    model = SparseViT(arch, **TINY, pretrained=checkpoint)
    model.init_weights()
    return model


def test_hub_name_loads_the_cached_file_offline(offline_cache: Path) -> None:
    state = timm_state()
    cache_repo(offline_cache, 'MahmoodLab/UNI2-h', {'pytorch_model.bin': state})
    model = loaded('uni2-h', 'hf-hub:MahmoodLab/UNI2-h')
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_timm_spelling_and_revision(offline_cache: Path) -> None:
    state = timm_state('uni')
    cache_repo(offline_cache, 'MahmoodLab/UNI', {'pytorch_model.bin': state})
    model = loaded('uni', f'hf_hub:MahmoodLab/UNI@{REVISION}')
    assert torch.equal(model.pos_embed, state['pos_embed'])


def test_safetensors_is_tried_when_the_known_file_is_not_cached(offline_cache: Path) -> None:
    state = timm_state('virchow2')
    cache_repo(offline_cache, 'paige-ai/Virchow2', {'model.safetensors': state})
    assert candidate_files('paige-ai/Virchow2') == ['pytorch_model.bin', 'model.safetensors']
    model = loaded('virchow2', 'hf-hub:paige-ai/Virchow2')
    assert torch.equal(model.reg_token, state['reg_token'])


def test_vit_cfg_pretrained_by_name_reaches_the_adapter_vit(offline_cache: Path) -> None:
    from mmseg_sparsevit.models import SparseViTAdapter
    state = timm_state()
    cache_repo(offline_cache, 'MahmoodLab/UNI2-h', {'pytorch_model.bin': state})
    adapter = SparseViTAdapter(vit_cfg=dict(arch='uni2-h', **TINY, pretrained='hf-hub:MahmoodLab/UNI2-h'),
                               deform_num_heads=4, num_interactions=2, add_vit_feature=False)
    adapter.init_weights()
    assert torch.equal(adapter.vit.blocks[1].attn.qkv.weight, state['blocks.1.attn.qkv.weight'])


def test_wrong_key_in_the_cached_file_is_named(offline_cache: Path) -> None:
    state = timm_state()
    state['blocks.1.attn.qkv_typo.weight'] = state.pop('blocks.1.attn.qkv.weight')
    snapshot = cache_repo(offline_cache, 'MahmoodLab/UNI2-h', {'pytorch_model.bin': state})
    with pytest.raises(KeyError) as info:
        loaded('uni2-h', 'hf-hub:MahmoodLab/UNI2-h')
    message = str(info.value)
    assert str(snapshot / 'pytorch_model.bin') in message
    assert "missing keys ['blocks.1.attn.qkv.weight']" in message
    assert "unexpected keys ['blocks.1.attn.qkv_typo.weight']" in message


def test_weights_of_another_preset_name_the_right_arch(offline_cache: Path) -> None:
    cache_repo(offline_cache, 'bioptimus/H-optimus-0', {'pytorch_model.bin': timm_state('h-optimus-0')})
    with pytest.raises(KeyError, match="arch='h-optimus-0'"):
        loaded('uni2-h', 'hf-hub:bioptimus/H-optimus-0')


def test_offline_without_cache_says_what_to_do(offline_cache: Path) -> None:
    with pytest.raises(HubWeightsError) as info:
        loaded('uni2-h', 'hf-hub:MahmoodLab/UNI2-h')
    message = str(info.value)
    assert f'is in the Hugging Face cache {offline_cache}' in message and 'HF_HUB_OFFLINE is set' in message
    assert 'hf download MahmoodLab/UNI2-h pytorch_model.bin' in message


def transformers_hub_state(preset: str) -> Dict[str, torch.Tensor]:
    """Random weights in the key layout the hub repository holds (what ``save_pretrained`` writes), depth 1."""
    torch.manual_seed(0)
    if preset == 'phikon':
        model = ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12, layer_norm_eps=1e-12))
    else:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=768, num_hidden_layers=1, num_attention_heads=12, patch_size=14, image_size=224,
            num_register_tokens=4, use_swiglu_ffn=True))
    return {k: v.contiguous() for k, v in revert_weight_conversion(model, model.state_dict()).items()}


@pytest.mark.parametrize(('preset', 'repo_id', 'filename'), [
    ('phikon', 'owkin/phikon', 'pytorch_model.bin'), ('hibou-b', 'histai/hibou-b', 'model.safetensors')])
def test_transformers_layout_repository_loads_by_name(offline_cache: Path, preset: str, repo_id: str,
                                                      filename: str) -> None:
    state = transformers_hub_state(preset)
    assert any('attention.attention.query' in k for k in state)  # the hub's layout, not timm's
    cache_repo(offline_cache, repo_id, {filename: state})
    model = SparseViT(preset, depth=1, pretrained=f'hf-hub:{repo_id}')
    model.init_weights()
    q, k, v = (state[f'encoder.layer.0.attention.attention.{p}.weight'] for p in ('query', 'key', 'value'))
    assert torch.equal(model.blocks[0].attn.qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(model.pos_embed, state['embeddings.position_embeddings'])


def test_wrong_key_in_a_transformers_file_is_named(offline_cache: Path) -> None:
    state = transformers_hub_state('hibou-b')
    state['encoder.layer.0.mlp.weights_in_typo.weight'] = state.pop('encoder.layer.0.mlp.weights_in.weight')
    del state['encoder.layer.0.attention.attention.value.bias']
    cache_repo(offline_cache, 'histai/hibou-b', {'model.safetensors': state})
    model = SparseViT('hibou-b', depth=1, pretrained='hf-hub:histai/hibou-b')
    partial_qkv = r"encoder.layer.0 has the attention bias of \['key', 'query'\] but not of \['value'\]"
    with pytest.raises(KeyError, match=partial_qkv):
        model.init_weights()
    state['encoder.layer.0.attention.attention.value.bias'] = torch.zeros(768)
    save_file(state, str(next(offline_cache.glob('models--histai--hibou-b/blobs/*'))))  # the cached file, fixed
    with pytest.raises(KeyError) as info:
        model.init_weights()
    assert "missing keys ['blocks.0.mlp.fc1.weight']" in str(info.value)
    assert "unexpected keys ['encoder.layer.0.mlp.weights_in_typo.weight']" in str(info.value)


def http_error(cls, status: int, repo_id: str):
    url = f'https://huggingface.co/{repo_id}/resolve/main/pytorch_model.bin'
    return cls(f'{status} Client Error', response=httpx2.Response(status, request=httpx2.Request('GET', url)))


@pytest.mark.parametrize(('error', 'expected'), [
    (lambda: http_error(GatedRepoError, 403, 'paige-ai/Virchow2'),
     'is gated; request access at https://huggingface.co/paige-ai/Virchow2 and set HF_TOKEN'),
    (lambda: http_error(RepositoryNotFoundError, 404, 'paige-ai/Virchow2'),
     'no such repository on the Hugging Face hub'),
    (lambda: http_error(RevisionNotFoundError, 404, 'paige-ai/Virchow2'), 'has no revision'),
])
def test_hub_errors_become_one_sentence(monkeypatch: pytest.MonkeyPatch, error, expected: str) -> None:
    def refuse(*args, **kwargs):
        raise error()
    monkeypatch.setattr('huggingface_hub.hf_hub_download', refuse)
    with pytest.raises(HubWeightsError, match=expected):
        loaded('virchow2', 'hf-hub:paige-ai/Virchow2')


@pytest.mark.parametrize('name', ['hf-hub:UNI2-h', 'hf-hub:', 'hf-hub:a/b/c'])
def test_malformed_hub_names(name: str) -> None:
    with pytest.raises(ValueError, match='<org>/<name>'):
        parse_hub_name(name)


def test_hf_hub_offline_environment_in_a_fresh_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       run_fresh_python) -> None:
    """The real environment variables, read by huggingface_hub at import, select the cache and forbid the network."""
    state = timm_state()
    cache_repo(tmp_path / 'home' / 'hub', 'MahmoodLab/UNI2-h', {'pytorch_model.bin': state})
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    out = run_fresh_python(
        'from mmseg_sparsevit.models import SparseViT\n'
        f"m = SparseViT('uni2-h', embed_dim=96, depth=2, num_heads=4, pretrained='hf-hub:MahmoodLab/UNI2-h')\n"
        'm.init_weights()\n'
        "print(float(m.blocks[1].mlp.fc2.weight.double().sum()))\n")
    assert float(out.split()[-1]) == pytest.approx(float(state['blocks.1.mlp.fc2.weight'].double().sum()), abs=1e-9)


def test_every_preset_names_its_weights_file() -> None:
    for name, card in PRETRAINED.items():
        assert card.weights_file in ('pytorch_model.bin', 'model.safetensors'), name
        assert candidate_files(card.hub_id)[0] == card.weights_file
