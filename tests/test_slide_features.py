"""Slide embeddings for MIL (slide/features.py, tools/extract_slide_features.py) on generated pyramidal TIFFs:
HDF5 layout and dtypes, coordinates that read back the pixels the features came from, resume after a kill,
bad and tissue-free slides reported while the batch goes on, one extraction per folder, and 2 torchrun
processes (gloo, CPU) writing what 1 process writes."""
import json
import os
import os.path as osp
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mmseg_sparsevit.classification.extraction import ExtractionConfig
from mmseg_sparsevit.engine.run_lock import RunLock, RunLockedError
from mmseg_sparsevit.slide import open_slide, write_pyramidal_tiff
from mmseg_sparsevit.slide.demo import GLASS, make_demo_slide
from mmseg_sparsevit.slide.features import (LOCK_NAME, EmbeddingSettings, build_embedder, embed_slide, embed_slides,
                                            partial_path, read_features_h5)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'extract_slide_features.py'
SLIDE_MPP = 0.5
MPP = 1.0  # tiles at half the scan resolution: every read goes through the resize path
TILE = 64  # 8 x 8 patches of 8 px
TINY = dict(arch='virchow2', arch_overrides=dict(embed_dim=32, depth=3, num_heads=2, patch_size=8), prune_after=2,
            window_size=2, prune_ratio=0.5)
SETTINGS = EmbeddingSettings(mpp=MPP, tile_size=TILE, batch_size=2, num_workers=0, checkpoint_every=4,
                             progress=False)


class MeanEmbedder:
    """A per-pixel-mean 'model': the embedding of a tile is its mean RGB, so features say which pixels were read."""

    patch_size, dim, name = 8, 3, 'mean-rgb'
    attrs = dict(arch='mean', embedding_recipe='mean')

    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        return tiles.double().mean(dim=(1, 2)).float().numpy()


class KilledRun(Exception):
    pass


@pytest.fixture(scope='module')
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp('slides')
    make_demo_slide(str(folder / 'a.tiff'), size=(1024, 768), mpp=SLIDE_MPP, seed=0)
    make_demo_slide(str(folder / 'b.tiff'), size=(768, 512), mpp=SLIDE_MPP, seed=1)
    return folder


@pytest.fixture(scope='module')
def embedder():
    return build_embedder(ExtractionConfig(size=TILE, mode='sparse+prune', **TINY), 'cpu', 'fp32')


@pytest.fixture(scope='module')
def reference(slides, embedder, tmp_path_factory):
    """An uninterrupted single-process run over slide a."""
    out = tmp_path_factory.mktemp('reference')
    result = embed_slide(embedder, str(slides / 'a.tiff'), str(out), SETTINGS)
    assert result.status == 'done' and result.summary['tiles'] > 8
    return out / 'a.h5'


def test_h5_layout_dtypes_and_attributes(slides, embedder, reference):
    data = read_features_h5(str(reference))
    feats, coords = data['features'], data['coords']
    assert feats.dtype == np.float32 and coords.dtype == np.int64
    assert feats.ndim == 2 and feats.shape[1] == 64 == embedder.dim  # Virchow2 recipe: CLS ++ patch mean, 2 x 32
    assert coords.shape == (len(feats), 2) and np.isfinite(feats).all()
    with open_slide(str(slides / 'a.tiff')) as reader:
        width, height = reader.dimensions
        level = reader.best_level(MPP / SLIDE_MPP)
        level_dim = list(reader.level_dimensions[level])
    assert (coords >= 0).all() and (coords[:, 0] < width).all() and (coords[:, 1] < height).all()
    assert (coords % (TILE * MPP / SLIDE_MPP) == 0).all()  # a grid of 128 level-0 px
    attrs = data['coords_attrs']
    expected = dict(name='a', patch_size=TILE, patch_size_level0=128, patch_level=level, overlap=0, mpp=MPP,
                    level0_width=width, level0_height=height, target_magnification=10.0, level0_magnification=20.0)
    assert {k: attrs[k] for k in expected} == expected
    assert list(attrs['downsample']) == [2.0, 2.0] and list(attrs['level_dim']) == level_dim
    assert list(attrs['slide_mpp']) == pytest.approx([SLIDE_MPP, SLIDE_MPP])
    enc = data['features_attrs']
    assert (enc['arch'], enc['mode'], enc['window_size'], enc['prune_ratio'], enc['embedding_recipe']) == (
        'virchow2', 'sparse+prune', 2, 0.5, 'token+avg')
    assert enc['tile_size'] == TILE and enc['mpp'] == MPP and enc['precision'] == 'fp32'
    with h5py.File(reference, 'r') as f:  # the encoder is also named on the file, where TRIDENT-style tools look
        assert f.attrs['encoder'] == enc['encoder'] and set(f.keys()) == {'features', 'coords'}


def test_features_are_those_of_the_tiles_at_coords(slides, embedder, reference):
    """Re-read each tile at its stored level-0 coords and embed it alone: the stored features are the same."""
    data = read_features_h5(str(reference))
    with open_slide(str(slides / 'a.tiff')) as reader:
        tiles = np.stack([reader.read_region(int(x), int(y), (TILE, TILE), MPP) for x, y in data['coords'][::3]])
    again = np.concatenate([embedder(torch.from_numpy(t[None])) for t in tiles])
    np.testing.assert_allclose(data['features'][::3], again, rtol=1e-5, atol=1e-5)


def test_mean_model_features_equal_the_mean_of_the_region_read_back(slides, tmp_path):
    settings = EmbeddingSettings(**{**SETTINGS.__dict__, 'overlap': 16})
    result = embed_slide(MeanEmbedder(), str(slides / 'b.tiff'), str(tmp_path), settings)
    data = read_features_h5(result.outputs['h5'])
    with open_slide(str(slides / 'b.tiff')) as reader:
        means = [reader.read_region(int(x), int(y), (TILE, TILE), MPP).mean(axis=(0, 1)) for x, y in data['coords']]
    np.testing.assert_allclose(data['features'], np.float32(means), rtol=0, atol=1e-4)
    assert len(np.unique(data['features'], axis=0)) > len(data['features']) // 2  # tiles differ: a real check
    assert data['coords_attrs']['overlap'] == 16 and (np.diff(np.unique(data['coords'][:, 0])) % 96 == 0).all()


def test_resume_after_a_kill_gives_an_identical_file(slides, embedder, reference, tmp_path):
    def kill_after_first_round(done):
        raise KilledRun(done)

    path = str(slides / 'a.tiff')
    with pytest.raises(KilledRun):
        embed_slide(embedder, path, str(tmp_path), SETTINGS, on_round=kill_after_first_round)
    assert not (tmp_path / 'a.h5').exists()
    with np.load(partial_path(str(tmp_path), 'a')) as state:
        assert state['done'].sum() == 4 and not state['done'].all()
    result = embed_slide(embedder, path, str(tmp_path), SETTINGS)
    assert result.status == 'done' and result.summary['tiles_resumed'] == 4
    assert not osp.exists(partial_path(str(tmp_path), 'a'))
    assert_same_h5(tmp_path / 'a.h5', reference)
    mtime = os.stat(tmp_path / 'a.h5').st_mtime_ns
    assert embed_slide(embedder, path, str(tmp_path), SETTINGS).status == 'skipped'
    assert os.stat(tmp_path / 'a.h5').st_mtime_ns == mtime


def test_a_damaged_partial_state_restarts_the_slide_naming_the_file(slides, embedder, reference, tmp_path,
                                                                     mmengine_log):
    path = str(slides / 'a.tiff')
    with pytest.raises(KilledRun):
        embed_slide(embedder, path, str(tmp_path), SETTINGS, on_round=lambda done: (_ for _ in ()).throw(KilledRun()))
    state = Path(partial_path(str(tmp_path), 'a'))
    state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])  # cut short: not a zip archive any more
    result = embed_slide(embedder, path, str(tmp_path), SETTINGS)
    assert result.status == 'done' and result.summary['tiles_resumed'] == 0
    assert [m for m in mmengine_log if m.startswith(f'{state}: unreadable partial state (BadZipFile')]
    assert_same_h5(tmp_path / 'a.h5', reference)


def test_resume_with_other_settings_starts_the_slide_afresh(slides, tmp_path):
    path = str(slides / 'b.tiff')
    with pytest.raises(KilledRun):
        embed_slide(MeanEmbedder(), path, str(tmp_path), SETTINGS, on_round=lambda done: (_ for _ in ()).throw(
            KilledRun()))
    other = EmbeddingSettings(**{**SETTINGS.__dict__, 'overlap': 8})
    result = embed_slide(MeanEmbedder(), path, str(tmp_path), other)
    assert result.status == 'done' and result.summary['tiles_resumed'] == 0


def test_bad_and_blank_slides_are_reported_and_the_batch_goes_on(slides, tmp_path):
    broken = tmp_path / 'broken.tiff'
    broken.write_bytes(b'II*\x00 this is not a slide')
    blank = tmp_path / 'blank.tiff'
    write_pyramidal_tiff(str(blank), np.full((256, 384, 3), GLASS, np.uint8), (SLIDE_MPP, SLIDE_MPP), factors=[1])
    out = tmp_path / 'out'
    results = embed_slides(MeanEmbedder(), [str(broken), str(blank), str(slides / 'b.tiff')], str(out), SETTINGS)
    assert [r.status for r in results] == ['failed', 'no_tissue', 'done']
    assert results[0].slide.endswith('broken.tiff') and results[0].message
    assert sorted(os.listdir(out)) == ['b.h5', 'slides.json']
    listed = json.loads((out / 'slides.json').read_text())
    assert [(osp.basename(r['slide']), r['status']) for r in listed] == [
        ('broken.tiff', 'failed'), ('blank.tiff', 'no_tissue'), ('b.tiff', 'done')]


def test_second_extraction_into_one_folder_refuses(slides, tmp_path):
    with RunLock(str(tmp_path / LOCK_NAME)):
        with pytest.raises(RunLockedError, match='in use by another run'):
            embed_slides(MeanEmbedder(), [str(slides / 'b.tiff')], str(tmp_path), SETTINGS)
    assert not (tmp_path / 'b.h5').exists()


def test_tile_size_must_be_a_multiple_of_the_patch(slides, tmp_path):
    with pytest.raises(ValueError, match='tile size 60 is not a multiple of the model\'s patch size 8'):
        embed_slides(MeanEmbedder(), [str(slides / 'b.tiff')], str(tmp_path),
                     EmbeddingSettings(**{**SETTINGS.__dict__, 'tile_size': 60}))


def assert_same_h5(a, b) -> None:
    da, db = read_features_h5(str(a)), read_features_h5(str(b))
    np.testing.assert_array_equal(da['features'], db['features'])
    np.testing.assert_array_equal(da['coords'], db['coords'])
    for key in ('coords_attrs', 'features_attrs'):
        assert da[key].keys() == db[key].keys()
        for k in da[key]:
            np.testing.assert_array_equal(da[key][k], db[key][k], err_msg=k)


CLI_ARGS = ['--random-init', '--arch', 'virchow2', '--embed-dim', '32', '--depth', '3', '--num-heads', '2',
            '--patch-size', '8', '--prune-after', '2', '--prune-ratio', '0.5', '--window-size', '2',
            '--mode', 'sparse+prune', '--mpp', str(MPP), '--tile-size', str(TILE), '--batch-size', '1',
            '--workers', '0', '--checkpoint-every', '4', '--no-progress', '--device', 'cpu']


@pytest.fixture(scope='module')
def one_process(slides, tmp_path_factory):
    """The CLI in this process over slides a and b."""
    out = tmp_path_factory.mktemp('one_process')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun runs each process on one thread: same kernels, same bits
    try:
        assert runpy.run_path(str(TOOL))['main']([str(slides / 'a.tiff'), str(slides / 'b.tiff'), '--out-dir',
                                                  str(out)] + CLI_ARGS) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize('split', ['tiles', 'slides'])
def test_two_torchrun_processes_write_what_one_process_writes(slides, one_process, tmp_path, split):
    """2 gloo processes on CPU, sharing the tiles of each slide (gathered on rank 0) or whole slides: the files
    equal one process's."""
    out = tmp_path / split
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(TOOL),
           str(slides / 'a.tiff'), str(slides / 'b.tiff'), '--out-dir', str(out), '--split', split] + CLI_ARGS
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=120)[0]
    finally:  # a hung run takes its worker processes with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    for stem in ('a', 'b'):
        assert_same_h5(out / f'{stem}.h5', one_process / f'{stem}.h5')
    listed = json.loads((out / 'slides.json').read_text())
    assert [r['status'] for r in listed] == ['done', 'done'] and sorted(os.listdir(out)) == [
        'a.h5', 'b.h5', 'slides.json']
    if split == 'tiles':  # both processes embedded tiles of each slide
        assert [r['summary']['processes'] for r in listed] == [2, 2]
