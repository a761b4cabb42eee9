"""Whole-slide segmentation end to end: outputs, exactness through the reader, resume after a kill, a batch
with bad and blank slides, the configs' model_mpp, and the CLI with a real (tiny) config."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from mmengine.config import Config

from mmseg_sparsevit.slide import open_slide, plan_tiles, tissue_mask
from mmseg_sparsevit.slide.demo import make_demo_slide
from mmseg_sparsevit.slide.inference import SlideSettings, TileSegmenter, segment_slide, segment_slides
from mmseg_sparsevit.slide.writers import NOT_ANALYSED, write_pyramidal_tiff

ROOT = Path(__file__).resolve().parent.parent
SLIDE_MPP = 0.5
TARGET_MPP = 1.0


class PixelSegmenter:
    """A 1x1-conv "model" (per-pixel scores), with the attributes segment_slide reads."""

    num_classes = 2
    classes = ['background', 'nuclei']
    palette = [(0, 0, 0), (200, 0, 200)]
    patch_size = 14
    mpp = TARGET_MPP
    name = 'pixel'

    def __init__(self):
        self.conv = torch.nn.Conv2d(3, 2, 1)
        with torch.no_grad():  # class 1 where a pixel is purple (nuclei): (R + B) / 2 - G above 0.2
            self.conv.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.5]]).view(2, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.2, 0.0]))

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
            return self.conv(x)[0].numpy()

    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.conv(tiles.permute(0, 3, 1, 2).float() / 255).numpy()


class KilledRun(Exception):
    pass


SETTINGS = SlideSettings(tile_size=112, overlap=28, batch_size=2, num_workers=0, checkpoint_every=2, progress=False)


@pytest.fixture(scope='module')
def demo_slide(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('slides') / 'demo.tiff')
    make_demo_slide(path, size=(1024, 768), mpp=SLIDE_MPP)
    return path


def read_outputs(out_dir: Path, stem: str = 'demo'):
    with tifffile.TiffFile(out_dir / f'{stem}.classes.tiff') as tif:
        classes = tif.pages[0].asarray()
    geojson = json.loads((out_dir / f'{stem}.geojson').read_text())
    summary = json.loads((out_dir / f'{stem}.summary.json').read_text())
    return classes, geojson, summary


def test_outputs_read_back_and_equal_the_whole_region(demo_slide, tmp_path):
    segmenter = PixelSegmenter()
    result = segment_slide(segmenter, demo_slide, str(tmp_path), SETTINGS)
    assert result.status == 'done'
    classes, geojson, summary = read_outputs(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['demo.classes.tiff', 'demo.geojson', 'demo.overlay.png',
                                            'demo.summary.json', 'demo.tiles.png']
    # The TIFF: the canvas at the target µm/px, opened by OpenSlide with that µm/px.
    assert classes.shape == (384, 512)
    with openslide.OpenSlide(str(tmp_path / 'demo.classes.tiff')) as slide:
        assert slide.dimensions == (512, 384)
        assert float(slide.properties['openslide.mpp-x']) == pytest.approx(TARGET_MPP)
    # Analysed pixels equal the per-pixel model on the whole region read at once; the glass is not analysed.
    with open_slide(demo_slide) as reader:
        whole = segmenter.scores(reader.read_region(0, 0, (512, 384), TARGET_MPP)).argmax(0)
    analysed = classes != NOT_ANALYSED
    assert 0.2 < analysed.mean() < 0.97  # tiles touching tissue; a corner of glass is left out
    assert np.array_equal(classes[analysed], whole[analysed])
    # GeoJSON polygons lie on the analysed nuclei, in level-0 px (2 per target px).
    feature, = geojson['features']
    assert feature['properties']['classification'] == {'name': 'nuclei', 'color': [200, 0, 200]}
    points = np.concatenate([np.array(ring) for poly in feature['geometry']['coordinates'] for ring in poly])
    assert points.min() >= 0 and points[:, 0].max() <= 1024 and points[:, 1].max() <= 768
    ys, xs = np.nonzero(classes == 1)
    assert points[:, 0].min() == pytest.approx((xs.min() + 0.5) * 2, abs=2 * 2)
    assert points[:, 1].max() == pytest.approx((ys.max() + 0.5) * 2, abs=2 * 2)
    # Summary: areas in mm² from pixel counts at 1 µm/px.
    with open_slide(demo_slide) as reader:
        tissue, _ = tissue_mask(reader, SETTINGS.tissue)
    grid = plan_tiles((1024, 768), (SLIDE_MPP, SLIDE_MPP), TARGET_MPP, 112, 28, tissue)
    assert summary['tiles'] == len(grid) and summary['tissue_area_mm2'] == pytest.approx(tissue.area_mm2, abs=1e-4)
    assert summary['class_area_mm2']['nuclei'] == pytest.approx((classes == 1).sum() * 1e-6, abs=1e-4)
    assert summary['analysed_area_mm2'] == pytest.approx(analysed.sum() * 1e-6, abs=1e-4)
    assert summary['slide_mpp'] == [SLIDE_MPP, SLIDE_MPP] and summary['mpp'] == TARGET_MPP
    assert summary['peak_memory']['cpu_rss_gb'] > 0


@pytest.fixture(scope='module')
def uninterrupted(demo_slide, tmp_path_factory):
    """The outputs of one run over the demo slide that nothing stopped."""
    out = tmp_path_factory.mktemp('uninterrupted')
    segment_slide(PixelSegmenter(), demo_slide, str(out), SETTINGS)
    return read_outputs(out)


def run_killed(segmenter, slide: str, out_dir: Path, after_tiles: int = 6) -> None:
    """A run killed once ``after_tiles`` tiles are done, which leaves its partial state in ``out_dir``."""
    def kill(tiles_done):
        if tiles_done >= after_tiles:
            raise KilledRun

    with pytest.raises(KilledRun):
        segment_slide(segmenter, slide, str(out_dir), SETTINGS, on_batch=kill)


def test_resume_after_a_kill_gives_identical_outputs(demo_slide, uninterrupted, tmp_path):
    segmenter = PixelSegmenter()
    run_killed(segmenter, demo_slide, tmp_path)
    assert (tmp_path / 'demo.partial' / 'state.npz').is_file() and not (tmp_path / 'demo.summary.json').exists()
    result = segment_slide(segmenter, demo_slide, str(tmp_path), SETTINGS)
    assert result.summary['tiles_resumed'] == 6
    assert not (tmp_path / 'demo.partial').exists()
    again = read_outputs(tmp_path)
    assert np.array_equal(uninterrupted[0], again[0])
    assert uninterrupted[1] == again[1]
    assert uninterrupted[2]['class_area_mm2'] == again[2]['class_area_mm2']
    # A finished slide is skipped.
    assert segment_slide(segmenter, demo_slide, str(tmp_path), SETTINGS).status == 'skipped'


@pytest.mark.parametrize('damaged', ['state.npz', 'classes.npy'])
def test_a_damaged_partial_state_restarts_the_slide_naming_the_file(demo_slide, uninterrupted, tmp_path, damaged,
                                                                     mmengine_log):
    """A state file cut short (a full disk, a copy that stopped) costs a restart with a warning, not a crash."""
    segmenter = PixelSegmenter()
    run_killed(segmenter, demo_slide, tmp_path)
    part = tmp_path / 'demo.partial' / damaged
    part.write_bytes(part.read_bytes()[:part.stat().st_size // 2])
    result = segment_slide(segmenter, demo_slide, str(tmp_path), SETTINGS)
    assert result.status == 'done' and result.summary['tiles_resumed'] == 0
    assert [m for m in mmengine_log if m.startswith(f'{part}: unreadable partial') and m.endswith('afresh')]
    again = read_outputs(tmp_path)
    assert np.array_equal(uninterrupted[0], again[0]) and uninterrupted[1] == again[1]


def test_changed_settings_restart_a_partial_slide(demo_slide, tmp_path):
    segmenter = PixelSegmenter()
    run_killed(segmenter, demo_slide, tmp_path, after_tiles=0)
    other = SlideSettings(**{**SETTINGS.__dict__, 'overlap': 14})
    assert segment_slide(segmenter, demo_slide, str(tmp_path), other).summary['tiles_resumed'] == 0


def test_dataloader_workers_give_the_same_map(demo_slide, tmp_path):
    segmenter = PixelSegmenter()
    segment_slide(segmenter, demo_slide, str(tmp_path / 'w0'), SETTINGS)
    segment_slide(segmenter, demo_slide, str(tmp_path / 'w2'),
                  SlideSettings(**{**SETTINGS.__dict__, 'num_workers': 2}))
    assert np.array_equal(read_outputs(tmp_path / 'w0')[0], read_outputs(tmp_path / 'w2')[0])


def test_a_batch_reports_bad_and_blank_slides_and_goes_on(demo_slide, tmp_path):
    broken = tmp_path / 'broken.svs'
    broken.write_bytes(b'this is not a slide')
    blank = str(tmp_path / 'blank.tiff')
    write_pyramidal_tiff(blank, np.full((256, 256, 3), 244, np.uint8), (SLIDE_MPP, SLIDE_MPP))
    out = tmp_path / 'out'
    results = segment_slides(PixelSegmenter(), [str(broken), blank, demo_slide], str(out), SETTINGS)
    assert [r.status for r in results] == ['failed', 'no_tissue', 'done']
    assert 'broken.svs' in results[0].message
    report = json.loads((out / 'slides.json').read_text())
    assert [r['status'] for r in report] == ['failed', 'no_tissue', 'done']
    # The blank slide is finished too (its summary says why there is nothing else); the broken one is retried.
    again = segment_slides(PixelSegmenter(), [str(broken), blank, demo_slide], str(out), SETTINGS)
    assert [r.status for r in again] == ['failed', 'skipped', 'skipped']


def test_without_tissue_detection_the_whole_image_is_tiled(demo_slide, tmp_path):
    settings = SlideSettings(**{**SETTINGS.__dict__, 'tissue': None})
    summary = segment_slide(PixelSegmenter(), demo_slide, str(tmp_path), settings).summary
    assert summary['tiles'] == len(plan_tiles((1024, 768), (SLIDE_MPP, SLIDE_MPP), TARGET_MPP, 112, 28))
    assert summary['tissue_area_mm2'] == pytest.approx(1024 * 768 * SLIDE_MPP ** 2 * 1e-6, abs=1e-4)
    classes = read_outputs(tmp_path)[0]
    assert (classes != NOT_ANALYSED).all()


def test_missing_mpp_and_bad_tile_size_are_clear(demo_slide, tmp_path):
    segmenter = PixelSegmenter()
    segmenter.mpp = None
    with pytest.raises(ValueError, match='model_mpp'):
        segment_slide(segmenter, demo_slide, str(tmp_path), SETTINGS)
    with pytest.raises(ValueError, match='not a multiple of the model'):
        segment_slide(PixelSegmenter(), demo_slide, str(tmp_path), SlideSettings(tile_size=100))


CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if '_base_' not in p.parts)


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: str(p.relative_to(ROOT / 'configs')))
def test_every_config_records_the_mpp_its_model_sees(path):
    cfg = Config.fromfile(str(path))
    # SegPath tiles: 984 px at 0.22 µm/px, resized to the config's scale.
    assert cfg.model_mpp == pytest.approx(0.22 * 984 / cfg.img_scale[0])


DEMO_CONFIG = str(ROOT / 'configs/demo/mask2former_tiny-sparse-adapter_1xb4-300_segpath-demo-112x112.py')


@pytest.fixture(scope='module')
def demo_model():
    from mmseg.apis import init_model
    torch.manual_seed(0)
    return init_model(DEMO_CONFIG, None, device='cpu')


def test_tile_segmenter_runs_the_model_as_mmseg_does(demo_model):
    """RGB tiles in, the model's scores out: the same as normalising RGB by hand and calling encode_decode."""
    segmenter = TileSegmenter(demo_model, 1.0, 14)
    assert segmenter.classes == ['class_0', 'class_1'] and len(segmenter.palette) == 2  # no dataset_meta
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8))
    scores = segmenter(tiles)
    preprocessor = demo_model.data_preprocessor
    rgb = (tiles.permute(0, 3, 1, 2).float() - preprocessor.mean) / preprocessor.std
    meta = dict(ori_shape=(112, 112), img_shape=(112, 112), pad_shape=(112, 112), padding_size=[0, 0, 0, 0])
    with torch.no_grad():
        expected = demo_model.encode_decode(rgb, [meta] * 2)
    assert scores.shape == (2, 2, 112, 112) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    assert not np.allclose(scores, segmenter(tiles.flip(-1)), atol=1e-3)  # the channel order matters


def test_cli_runs_the_demo_config(demo_model, demo_slide, tmp_path):
    sys.path.insert(0, str(ROOT / 'tools'))
    import infer_slide
    checkpoint = str(tmp_path / 'random.pth')
    torch.save({'state_dict': demo_model.state_dict(),
                'meta': {'dataset_meta': {'classes': ('background', 'epithelium'),
                                          'palette': [[0, 0, 0], [185, 85, 165]]}}}, checkpoint)
    out = tmp_path / 'out'
    code = infer_slide.main([DEMO_CONFIG, checkpoint, demo_slide, '--out-dir', str(out), '--tile-size', '112',
                             '--overlap', '14', '--workers', '0', '--no-progress'])
    assert code == 0
    classes, geojson, summary = read_outputs(out)
    assert summary['mpp'] == pytest.approx(0.22 * 984 / 112)
    assert classes.shape == (summary['canvas_size'][1], summary['canvas_size'][0])
    assert set(np.unique(classes)) <= {0, 1, NOT_ANALYSED}
    assert set(summary['class_area_mm2']) == {'background', 'epithelium'}
    with pytest.raises(ValueError, match="tile size 100 is not a multiple of the model's patch size 14"):
        infer_slide.main([DEMO_CONFIG, checkpoint, demo_slide, '--out-dir', str(out), '--tile-size', '100'])
