"""Configs: every file loads, the SegPath leaves say what their names say, models build."""
import ast
import re
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmseg_sparsevit  # noqa: F401
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg_sparsevit.datasets.segpath import SEGPATH_ANTIGENS
from mmseg_sparsevit.models.presets import PRETRAINED, get_arch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs'
sys.path.insert(0, str(ROOT / 'tools'))
import make_configs  # noqa: E402

ALL = sorted(p for p in CONFIGS.rglob('*.py') if '_base_' not in p.parts)
LEAVES = sorted(p for p in (CONFIGS / 'segpath').glob('*/*.py') if p.parent.name != '_base_')
SEGPATH_BASES = sorted((CONFIGS / 'segpath' / '_base_').glob('*.py'))
DEMOS = sorted((CONFIGS / 'demo').glob('*.py'))
# mmseg naming: {algo}_{backbone}_{N}xb{B}-{iters}_{data}-{crop}.py
NAME = re.compile(r'^mask2former_(?P<backbone>[\w-]+)-adapter_\d+xb\d+-\d+k?_segpath-'
                  r'(?P<data>\w+)-(?P<res>\d+)x(?P=res)\.py$')
BACKBONE = re.compile(rf"^(?P<arch>{'|'.join(map(re.escape, make_configs.BACKBONES))})-"
                      r'(dense|sparse-w(?P<window>\d+))'
                      rf'(?P<levers>-{re.escape(make_configs.LEVERS_TAG)})?$')
OTHER_BACKBONES = sorted(set(make_configs.BACKBONES) - {'uni2-h'})


def rel(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def test_the_experiment_grid_is_complete():
    """8 antigens x (UNI-2-h: 5 resolutions x dense/sparse + windows 2/16/64 at 560 + sparse-w8 with the memory
    levers at 896/1120/1344; Virchow2 and H-optimus-0: dense/sparse at 448), plus the demos."""
    assert OTHER_BACKBONES == ['h-optimus-0', 'virchow2']
    assert len(LEAVES) == 8 * (5 * 2 + 3 + 2 * 2 + 3)
    assert {p.parent.name for p in LEAVES} == set(SEGPATH_ANTIGENS)
    assert len(DEMOS) == 2
    # one per resolution, one per backbone variant (UNI-2-h dense, w2/8/16/64, w8-cp-bf16; the others dense, w8)
    assert len(SEGPATH_BASES) == 8 + 6 + 2 * 2
    levers = sorted(p.name for p in LEAVES if make_configs.LEVERS_TAG in p.name and p.parent.name == 'ERG')
    assert levers == [f'mask2former_uni2-h-sparse-w8-cp-bf16-adapter_1xb4-20k_segpath-ERG-{r}x{r}.py'
                      for r in (1120, 1344, 896)]


def test_leaves_are_what_the_generator_writes():
    assert make_configs.stale_files(CONFIGS) == []


@pytest.mark.parametrize('path', ALL, ids=rel)
def test_config_loads_and_names_its_settings(path):
    cfg = Config.fromfile(str(path))
    match = NAME.match(path.name)
    assert match, f'{path.name} does not follow the mmseg naming scheme'
    assert set(cfg.custom_imports.imports) == {'mmdet.models', 'mmseg_sparsevit'}
    assert cfg.custom_imports.allow_failed_imports is False
    head = cfg.model.decode_head
    assert head.pixel_decoder.type in ('mmdet.MSDeformAttnPixelDecoder', 'CheckpointedPixelDecoder')  # mmseg scope
    assert all(c.type.startswith('mmdet.') for c in head.train_cfg.assigner.match_costs)
    assert cfg.model.backbone.type == 'SparseViTAdapter'
    vit_cfg = cfg.model.backbone.vit_cfg
    assert head.in_channels == [vit_cfg.get('embed_dim') or get_arch(vit_cfg.get('arch', 'uni2-h')).embed_dim] * 4

    res = int(match['res'])
    loaders = [cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader]
    for loader in loaders:
        resize = [s for s in loader.dataset.pipeline if s['type'] == 'Resize']
        assert [r['scale'] for r in resize] == [(res, res)]
    assert [loader.dataset.split for loader in loaders] == ['train', 'val', 'test']
    assert res % cfg.data_preprocessor.size_divisor == 0  # the ViT never sees padding

    if path.parent.parent.name == 'segpath':
        antigen = path.parent.name
        assert match['data'] == antigen
        assert {loader.dataset.antigen for loader in loaders} == {antigen}
        backbone = BACKBONE.match(match['backbone'])
        assert backbone, match['backbone']
        vit = cfg.model.backbone.vit_cfg
        assert vit.arch == backbone['arch'] and vit.img_size == 224
        card = PRETRAINED[vit.arch]  # the model's own normalisation, on 0-255 RGB
        for preprocessor in (cfg.data_preprocessor, cfg.model.data_preprocessor):
            assert preprocessor.mean == pytest.approx([255 * m for m in card.mean], abs=1e-3)
            assert preprocessor.std == pytest.approx([255 * s for s in card.std], abs=1e-3)
        if backbone['window'] is None:
            assert vit.attn_mode == 'dense'
        else:
            assert (vit.attn_mode, vit.window_size) == ('sparse', int(backbone['window']))
        assert cfg.segpath_tag == f"{match['backbone']}-{res}"
        # The memory levers are on exactly in the -cp-bf16 configs: checkpointing (ViT, adapter, pixel
        # decoder) and bf16 autocast.
        levers = backbone['levers'] is not None
        assert (cfg.model.backbone.with_cp, vit.get('with_cp', False)) == (levers, levers)
        assert cfg.model.decode_head.pixel_decoder.type == (
            'CheckpointedPixelDecoder' if levers else 'mmdet.MSDeformAttnPixelDecoder')
        wrapper = cfg.optim_wrapper
        assert (wrapper.type, wrapper.get('dtype'), wrapper.get('loss_scale')) == (
            ('AmpOptimWrapper', 'bfloat16', 1.0) if levers else ('OptimWrapper', None, None))
        assert wrapper.optimizer.type == 'AdamW'  # the schedule's optimizer is kept
        # Everything else comes from configs/segpath/_base_/ (one backbone file, one resolution file).
        assigned = {t.id for node in ast.parse(path.read_text()).body for t in node.targets}
        assert assigned == {'_base_', 'antigen', 'segpath_tag', 'train_dataloader', 'val_dataloader',
                            'test_dataloader'} | ({'optim_wrapper'} if levers else set())
        assert cfg.antigen == antigen


@pytest.fixture(scope='module')
def mmseg_scope():
    import mmdet.models  # noqa: F401  (what custom_imports does)
    init_default_scope('mmseg')


def test_uni2_experiment_model_builds_at_full_size(mmseg_scope):
    """The real experiment: UNI-2-h (681M) + adapter + Mask2Former, built without memory."""
    cfg = Config.fromfile(str(next(p for p in LEAVES if p.name.startswith('mask2former_uni2-h'))))
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
    vit = sum(p.numel() for p in model.backbone.vit.parameters())
    assert 680e6 < vit < 682e6
    assert model.backbone.vit.num_prefix_tokens == 9 and model.backbone.vit.patch_size == 14
    assert model.decode_head.num_classes == 2


def test_lever_model_builds_with_the_plain_weight_names(mmseg_scope):
    """The -cp-bf16 model (checkpointed ViT, adapter and pixel decoder) is the plain sparse model with the same
    parameter names, so weights of either load into the other."""
    from mmseg_sparsevit.models import CheckpointedPixelDecoder
    models = []
    for tag in ('sparse-w8-adapter', f'sparse-w8-{make_configs.LEVERS_TAG}-adapter'):
        cfg = Config.fromfile(str(next(p for p in LEAVES if p.name.startswith(f'mask2former_uni2-h-{tag}_'))))
        with torch.device('meta'):
            models.append(MODELS.build(cfg.model))
    plain, levers = models
    assert isinstance(levers.decode_head.pixel_decoder, CheckpointedPixelDecoder)
    assert not isinstance(plain.decode_head.pixel_decoder, CheckpointedPixelDecoder)
    assert levers.backbone.with_cp and levers.backbone.vit.grad_checkpointing and not plain.backbone.with_cp
    assert list(levers.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize('arch', OTHER_BACKBONES)
def test_other_backbone_models_build_and_predict(arch, mmseg_scope):
    """Virchow2 / H-optimus-0 configs at reduced ViT depth (4 blocks, one per interaction), real widths."""
    path = next(p for p in LEAVES if p.name.startswith(f'mask2former_{arch}-sparse-w8'))
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.vit_cfg.depth = 4
    model = MODELS.build(cfg.model).eval()
    vit, preset = model.backbone.vit, get_arch(arch)
    assert (vit.embed_dim, vit.num_prefix_tokens, vit.patch_size) == (
        preset.embed_dim, preset.num_prefix_tokens, preset.patch_size)
    assert vit.arch.global_pool == preset.global_pool and vit.attn_mode == 'sparse'
    shape = (112, 112)
    sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape))
    bgr = torch.tensor([10, 100, 200], dtype=torch.uint8)  # images load as BGR; the preprocessor makes them RGB
    image = bgr[:, None, None].expand(3, *shape).clone()
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]))
        card = PRETRAINED[arch]
        expected = (bgr.flip(0) - 255 * torch.tensor(card.mean)) / (255 * torch.tensor(card.std))
        torch.testing.assert_close(data['inputs'][0, :, 0, 0], expected, atol=1e-4, rtol=0)
        result, = model(**data, mode='predict')
    assert result.seg_logits.data.shape == (2, *shape)


@pytest.mark.parametrize('path', DEMOS, ids=rel)
def test_demo_model_builds_and_predicts(path, mmseg_scope):
    cfg = Config.fromfile(str(path))
    model = MODELS.build(cfg.model).eval()
    assert model.backbone.vit.attn_mode == cfg.model.backbone.vit_cfg.attn_mode
    shape = (112, 112)
    sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape))
    image = torch.randint(0, 255, (3, *shape), dtype=torch.uint8)
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]))
        result, = model(**data, mode='predict')
    assert result.seg_logits.data.shape == (2, *shape)
    assert set(result.pred_sem_seg.data.unique().tolist()) <= {0, 1}
