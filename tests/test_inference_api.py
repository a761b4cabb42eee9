"""mmseg's own inference API (``init_model`` + ``inference_model``, ``MMSegInferencer``) on every config family.

Both strip only a transform named ``LoadAnnotations`` from the test pipeline; the SegPath pipelines load
masks with ``LoadSegPathAnnotations``, which must therefore pass images without a mask through. Each family
(the demos and one leaf per backbone base of ``configs/segpath/``) is run with its ViT shrunk to the demo's
size so that the whole pipeline (config, transforms, data preprocessor, backbone, head) runs on CPU in a
second, on image arrays and files of sizes that are not multiples of the patch size.
"""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

import mmseg_sparsevit  # noqa: F401  (registration)
from mmseg.apis import MMSegInferencer, inference_model, init_model
from mmseg.structures import SegDataSample

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
FAMILY_BASES = sorted(p.stem for p in (CONFIGS / 'segpath' / '_base_').glob('mask2former_*.py'))
DEMOS = sorted((CONFIGS / 'demo').glob('*.py'))
# shapes (H, W) that are not multiples of the ViT patch (14) nor of each other
IMAGE_SHAPES = [(101, 75), (150, 212)]


def family_leaf(base: str) -> Path:
    """The smallest-resolution panCK leaf built on the model base ``base``."""
    leaves = sorted((CONFIGS / 'segpath' / 'panCK').glob(f'{base}_*.py'),
                    key=lambda p: int(p.stem.rsplit('x', 1)[-1]))
    assert leaves, f'no panCK leaf uses {base}'
    return leaves[0]


FAMILIES = [pytest.param(p, id=p.stem) for p in DEMOS] + [
    pytest.param(family_leaf(b), id=b) for b in FAMILY_BASES]


def shrunk_config(path: Path) -> Config:
    """``path`` with the demo's tiny ViT width / depth and slim head: same pipeline, same model types."""
    cfg = Config.fromfile(str(path))
    demo = Config.fromfile(str(DEMOS[0]))
    vit = cfg.model.backbone.vit_cfg
    vit.update(embed_dim=demo.embed_dim, depth=4, num_heads=3, pretrained=None)
    cfg.model.backbone.update(conv_inplane=16, deform_num_heads=3, norm_cfg=dict(type='BN', requires_grad=True))
    pixel_decoder = cfg.model.decode_head.pixel_decoder.type  # the -cp-bf16 family's CheckpointedPixelDecoder
    cfg.model.decode_head = demo.model.decode_head
    cfg.model.decode_head.pixel_decoder.type = pixel_decoder
    # the window-ablation leaves resize to 560 px: test every family at the demo's 112 px to keep CPU time low
    cfg.test_pipeline = [dict(s, scale=demo.img_scale) if s['type'] == 'Resize' else s for s in cfg.test_pipeline]
    cfg.test_dataloader.dataset.pipeline = cfg.test_pipeline
    return cfg


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp('images')
    paths = []
    for h, w in IMAGE_SHAPES:
        path = folder / f'tile_{h}x{w}.png'
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize('path', FAMILIES)
def test_inference_model_and_inferencer_run_on_every_family(path, tmp_path, image_files):
    cfg = shrunk_config(path)
    cfg_file = tmp_path / path.name
    cfg.dump(str(cfg_file))
    model = init_model(cfg, device='cpu')
    assert model.cfg.model.backbone.vit_cfg.attn_mode == Config.fromfile(str(path)).model.backbone.vit_cfg.attn_mode
    assert cfg.model.decode_head.pixel_decoder.type.endswith(type(model.decode_head.pixel_decoder).__name__)
    checkpoint = tmp_path / 'model.pth'
    meta = dict(dataset_meta=dict(classes=('background', 'cells'), palette=[[0, 0, 0], [255, 0, 0]]))
    torch.save(dict(state_dict=model.state_dict(), meta=meta), str(checkpoint))

    model = init_model(str(cfg_file), str(checkpoint), device='cpu')
    images = [cv2.imread(f) for f in image_files]  # BGR arrays, as mmseg expects
    # paths first: mmseg's inference_model switches the model's test pipeline to array loading for good
    # once it is given an array (mmseg behaviour, not this plugin's)
    for item in [image_files[0], images[0]]:
        result = inference_model(model, item)
        assert isinstance(result, SegDataSample)
        assert tuple(result.pred_sem_seg.data.shape) == (1, *IMAGE_SHAPES[0])
        assert set(result.pred_sem_seg.data.unique().tolist()) <= {0, 1}
    batch = inference_model(model, images)
    assert [tuple(r.pred_sem_seg.data.shape[1:]) for r in batch] == IMAGE_SHAPES

    inferencer = MMSegInferencer(model=str(cfg_file), weights=str(checkpoint), device='cpu')
    expected = inference_model(model, images[1]).seg_logits.data
    for item in (image_files[1], images[1]):
        out = inferencer(item, return_datasamples=True)
        assert tuple(out.pred_sem_seg.data.shape) == (1, *IMAGE_SHAPES[1])
        # the inferencer and inference_model run the same network on the same pixels and pipeline
        torch.testing.assert_close(out.seg_logits.data, expected)
