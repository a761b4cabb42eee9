"""Feature extraction: dataset layouts and resize modes, pruned embeddings and kept tokens, prune_ratio=0
equals sparse, resumption after an interruption gives the same file, clear errors for bad inputs."""
import math
import os
import os.path as osp
import re
import runpy
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mmseg_sparsevit.classification import (ClassificationImages, ExtractionConfig, Sample, build_backbone,
                                            embed_batch, extract_features, load_features, load_samples,
                                            make_demo_classification, resize_image)
from mmseg_sparsevit.classification.dataset import PAD_VALUE, to_tensor
from mmseg_sparsevit.models.pruning import select_kept_tokens

EXTRACT_TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'extract_features.py'
TINY = dict(arch='vit-s', arch_overrides=dict(embed_dim=32, depth=3, num_heads=2, patch_size=8), prune_after=2,
            window_size=2)
SIZE = 32  # 4 x 4 patch grid
NUM_PATCHES = (SIZE // 8) ** 2


def tiny_cfg(**kwargs) -> ExtractionConfig:
    return ExtractionConfig(**{**TINY, 'size': SIZE, **kwargs})


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('demo_cls'))
    info = make_demo_classification(root, counts=(3, 1, 1), size_range=(20, 36), seed=1)
    samples, class_names = load_samples(info['data_root'], info['ann_file'])
    return dict(info, samples=samples, class_names=class_names)


@pytest.fixture(scope='module')
def batch(demo):
    dataset = ClassificationImages(demo['samples'][:4], SIZE)
    return torch.stack([dataset[i][0] for i in range(4)])


def test_csv_and_folder_layouts_list_the_same_images(tmp_path, demo):
    info = make_demo_classification(str(tmp_path), counts=(3, 1, 1), size_range=(20, 36), seed=1, layout='folders')
    samples, class_names = load_samples(info['data_root'])
    assert class_names == demo['class_names'] == ['glands', 'nuclei', 'stripes']
    assert len(samples) == len(demo['samples']) == 15
    for split in ('train', 'val', 'test'):
        pixels = lambda ss: sorted(cv2.imread(s.path).tobytes() for s in ss if s.split == split)  # noqa: E731
        assert pixels(samples) == pixels(demo['samples'])  # same seed, same tiles, whatever the layout


@pytest.mark.parametrize('csv_text, message', [
    ('image,split\na.png,train\n', "missing column(s) ['label']"),
    ('image,label,split\na.png,x,holdout\n', "split 'holdout'"),
    ('image,label\na.png,x\na.png,y\n', 'listed twice'),
    ('image,label\nmissing.png,x\n', 'missing.png'),
])
def test_bad_csv_errors_name_the_problem(tmp_path, csv_text, message):
    cv2.imwrite(str(tmp_path / 'a.png'), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'labels.csv').write_text(csv_text)
    with pytest.raises((KeyError, ValueError, FileNotFoundError), match=re.escape(message)):
        load_samples(str(tmp_path), str(tmp_path / 'labels.csv'))


def test_integer_labels_sort_numerically(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f'{i}.png'), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'labels.csv').write_text('image,label\n0.png,10\n1.png,2\n2.png,0\n')
    samples, class_names = load_samples(str(tmp_path), str(tmp_path / 'labels.csv'))
    assert class_names == ['0', '2', '10']
    assert [s.label for s in samples] == [2, 1, 0]


def two_colour_image(height: int = 20, width: int = 40) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :width // 2] = (255, 0, 0)
    img[:, width // 2:] = (0, 0, 255)
    return img


@pytest.mark.parametrize('mode', ['stretch', 'pad', 'center-crop'])
def test_resize_modes(mode):
    out = resize_image(two_colour_image(), 40 if mode != 'center-crop' else 20, mode)
    red, blue, pad = np.array([255, 0, 0]), np.array([0, 0, 255]), np.array(PAD_VALUE)
    if mode == 'stretch':  # 20 x 40 -> 40 x 40, halves kept left/right on every row
        assert out.shape == (40, 40, 3)
        assert (out[:, :19] == red).all() and (out[:, 21:] == blue).all()
    elif mode == 'pad':  # scale 1, 10 rows of padding above and below
        assert out.shape == (40, 40, 3)
        assert (out[:10] == pad).all() and (out[30:] == pad).all()
        assert (out[10:30, :20] == red).all() and (out[10:30, 20:] == blue).all()
    else:  # scale 1, the middle 20 columns
        assert out.shape == (20, 20, 3)
        assert (out[:, :10] == red).all() and (out[:, 10:] == blue).all()


def test_normalisation_maps_the_imagenet_mean_to_zero():
    img = np.empty((8, 8, 3), np.uint8)
    img[:] = PAD_VALUE
    assert to_tensor(img).abs().max() < 0.01


def test_unreadable_image_error_names_the_file(tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not a png at all')
    dataset = ClassificationImages([Sample('broken.png', str(bad), 0, 'train')], SIZE)
    with pytest.raises(OSError, match='broken.png'):
        dataset[0]


@pytest.mark.parametrize('prune_ratio', [0.25, 0.6, 0.9])
def test_pruned_embeddings_and_kept_tokens(batch, prune_ratio):
    model = build_backbone(tiny_cfg(mode='sparse+prune', prune_ratio=prune_ratio))
    out = embed_batch(model, batch)
    num_keep = NUM_PATCHES - math.floor(prune_ratio * NUM_PATCHES)  # floor(p * M) tokens removed
    assert out['cls'].shape == out['patch_mean'].shape == (4, 32)
    assert out['cls'].dtype == out['patch_mean'].dtype == torch.float32
    kept = out['kept_index']
    assert kept.shape == (4, num_keep) and out['num_kept'].tolist() == [num_keep] * 4
    assert (kept.diff(dim=1) > 0).all() and kept.min() >= 0 and kept.max() < NUM_PATCHES  # sorted, unique
    with torch.no_grad():  # the survivors are the patches the CLS token attends to most in block prune_after
        x, grid = model.prepare_tokens(batch)
        x = model.forward_blocks(x, grid, 0, 1)
        block = model.blocks[1]  # explicit softmax(q k^T * scale) rows of the global tokens, as a reference
        q, k, _ = block.attn.qkv(block.norm1(x)).reshape(*x.shape[:2], 3, block.attn.num_heads, -1).permute(
            2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * block.attn.scale).softmax(dim=-1)[:, :, :model.num_prefix_tokens]
    assert torch.equal(kept, select_kept_tokens(probs[..., model.num_prefix_tokens:], num_keep))


def test_prune_ratio_zero_equals_sparse(batch):
    pruned = embed_batch(build_backbone(tiny_cfg(mode='sparse+prune', prune_ratio=0.0)), batch)
    sparse = embed_batch(build_backbone(tiny_cfg(mode='sparse')), batch)
    assert torch.equal(pruned['cls'], sparse['cls']) and torch.equal(pruned['patch_mean'], sparse['patch_mean'])
    assert pruned['num_kept'].tolist() == sparse['num_kept'].tolist() == [NUM_PATCHES] * 4
    assert torch.equal(pruned['kept_index'], torch.arange(NUM_PATCHES).expand(4, -1))


def test_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match='size=30 is not a multiple of the patch size 8'):
        build_backbone(tiny_cfg(mode='dense', size=30))


def assert_same_file(a: str, b: str) -> None:
    fa, fb = load_features(a), load_features(b)
    assert fa['meta'] == fb['meta']
    for key in fa:
        if key != 'meta':
            np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


@pytest.fixture(scope='module')
def reference_file(demo, tmp_path_factory):
    """An uninterrupted sparse+prune run over the demo set."""
    out = str(tmp_path_factory.mktemp('ref') / 'features.npz')
    result = extract_features(tiny_cfg(mode='sparse+prune'), demo['samples'], demo['class_names'], out,
                              batch_size=4, num_workers=0)
    assert result['finished'] and not osp.exists(out + '.partial')
    return out


def test_feature_file_contents(demo, reference_file):
    data = load_features(reference_file)
    samples = demo['samples']
    assert data['cls'].shape == data['patch_mean'].shape == (len(samples), 32)
    assert data['id'].tolist() == [s.image_id for s in samples]
    assert data['label'].tolist() == [s.label for s in samples]
    assert data['split'].tolist() == [s.split for s in samples]
    assert data['class_names'].tolist() == demo['class_names']
    assert data['num_kept'].tolist() == [NUM_PATCHES - math.floor(0.6 * NUM_PATCHES)] * len(samples)
    assert data['meta']['config']['mode'] == 'sparse+prune' and data['meta']['num_samples'] == len(samples)


@pytest.mark.parametrize('interruption', ['max_batches', 'unreadable_image'])
def test_resume_after_interruption_gives_the_same_file(tmp_path, demo, reference_file, interruption):
    root = tmp_path / 'data'
    shutil.copytree(demo['data_root'], root)
    samples, class_names = load_samples(str(root), str(root / 'labels.csv'))
    out = str(tmp_path / 'features.npz')
    cfg = tiny_cfg(mode='sparse+prune')
    if interruption == 'max_batches':
        result = extract_features(cfg, samples, class_names, out, batch_size=4, num_workers=0, max_batches=2)
        assert not result['finished'] and result['num_done'] == 8
    else:  # sample 9 (third batch) is corrupt: the error names it, the first two batches stay written
        victim = samples[9].path
        original = open(victim, 'rb').read()
        open(victim, 'wb').write(original[:40])
        with pytest.raises(OSError, match=osp.basename(victim)):
            extract_features(cfg, samples, class_names, out, batch_size=4, num_workers=0)
        open(victim, 'wb').write(original)
    assert not osp.exists(out)
    assert sorted(os.listdir(out + '.partial')) == ['meta.json', 'shard_000000000.npz', 'shard_000000004.npz']
    result = extract_features(cfg, samples, class_names, out, batch_size=4, num_workers=0)
    assert result['finished'] and result['num_done'] == len(samples) and result['num_resumed'] == 8
    assert_same_file(out, reference_file)
    assert not osp.exists(out + '.partial')


def test_resume_refuses_different_settings(tmp_path, demo):
    out = str(tmp_path / 'features.npz')
    extract_features(tiny_cfg(mode='sparse'), demo['samples'], demo['class_names'], out, batch_size=4,
                     num_workers=0, max_batches=1)
    with pytest.raises(ValueError, match="different settings \\['config'\\]"):
        extract_features(tiny_cfg(mode='dense'), demo['samples'], demo['class_names'], out, batch_size=4,
                         num_workers=0)
    result = extract_features(tiny_cfg(mode='dense'), demo['samples'], demo['class_names'], out, batch_size=8,
                              num_workers=0, overwrite=True)
    assert result['finished'] and load_features(out)['meta']['config']['mode'] == 'dense'


def test_rerun_of_a_finished_file_changes_nothing(demo, reference_file):
    mtime = os.stat(reference_file).st_mtime_ns
    result = extract_features(tiny_cfg(mode='sparse+prune'), demo['samples'], demo['class_names'], reference_file,
                              batch_size=4, num_workers=0)
    assert result['finished'] and result['num_resumed'] == len(demo['samples'])
    assert os.stat(reference_file).st_mtime_ns == mtime


def test_cli_extracts_resumes_and_names_missing_weights(tmp_path, demo, reference_file):
    main = runpy.run_path(str(EXTRACT_TOOL))['main']
    out = str(tmp_path / 'cli.npz')
    argv = ['--data-root', demo['data_root'], '--ann-file', demo['ann_file'], '--random-init', '--arch', 'vit-s',
            '--embed-dim', '32', '--depth', '3', '--num-heads', '2', '--patch-size', '8', '--prune-after', '2',
            '--window-size', '2', '--size', str(SIZE), '--mode', 'sparse+prune', '--batch-size', '4',
            '--num-workers', '0', '--device', 'cpu', '--out', out]
    assert main(argv + ['--max-batches', '1'])['num_done'] == 4
    assert main(argv)['num_resumed'] == 4
    assert_same_file(out, reference_file)
    weights_argv = [a for a in argv if a != '--random-init'] + ['--weights', str(tmp_path / 'nope.bin')]
    with pytest.raises(FileNotFoundError, match='nope.bin'):
        main(weights_argv)


VIRCHOW2_TINY = dict(arch='virchow2', arch_overrides=dict(embed_dim=32, depth=3, num_heads=2, patch_size=8),
                     prune_after=2, window_size=2)


@pytest.mark.parametrize('mode', ['dense', 'sparse+prune'])
def test_embedding_is_the_presets_recipe(batch, mode):
    """Virchow2's recipe (CLS ++ mean of the patch tokens, its 4 registers left out); UNI-2's is the CLS token."""
    model = build_backbone(ExtractionConfig(size=SIZE, mode=mode, **VIRCHOW2_TINY))
    assert model.global_pool == 'token+avg' and model.num_prefix_tokens == 5
    out = embed_batch(model, batch)
    with torch.no_grad():
        tokens = model.forward_tokens(batch).tokens
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)  # registers are tokens 1..4
    assert out['embedding'].shape == (4, 64) and out['embedding'].dtype == torch.float32
    torch.testing.assert_close(out['embedding'], expected, rtol=0, atol=0)
    assert not torch.allclose(tokens[:, 1:].mean(dim=1), tokens[:, 5:].mean(dim=1))  # registers would change it
    uni2 = build_backbone(ExtractionConfig(size=SIZE, mode=mode, arch='uni2-h', prune_after=2, window_size=2,
                                           arch_overrides=VIRCHOW2_TINY['arch_overrides']))
    emb = embed_batch(uni2, batch)
    assert torch.equal(emb['embedding'], emb['cls'])


def test_feature_file_stores_the_embedding_and_eval_defaults_to_it(tmp_path, demo):
    out = str(tmp_path / 'virchow2.npz')
    cfg = ExtractionConfig(size=SIZE, mode='sparse', **VIRCHOW2_TINY)
    extract_features(cfg, demo['samples'], demo['class_names'], out, batch_size=4, num_workers=0)
    data = load_features(out)
    assert data['embedding'].shape == (len(demo['samples']), 64) and data['embedding'].dtype == np.float32
    np.testing.assert_array_equal(data['embedding'], np.concatenate([data['cls'], data['patch_mean']], axis=1))
    with np.load(out) as raw:  # stored in the file, not composed on loading
        assert 'embedding' in raw.files
    result = runpy.run_path(str(EXTRACT_TOOL.parent / 'eval_features.py'))['main'](
        [out, '--out', str(tmp_path / 'eval.json'), '--c-grid', '1', '--knn-k', '3'])
    assert result['feature'] == 'embedding'


def test_run_begun_before_the_embedding_existed_resumes(tmp_path, demo):
    """Shards written without ``embedding`` (an older run) resume; loading composes it by the arch's recipe."""
    cfg = ExtractionConfig(size=SIZE, mode='sparse', **VIRCHOW2_TINY)
    reference = str(tmp_path / 'reference.npz')
    extract_features(cfg, demo['samples'], demo['class_names'], reference, batch_size=4, num_workers=0)
    out = str(tmp_path / 'old.npz')
    extract_features(cfg, demo['samples'], demo['class_names'], out, batch_size=4, num_workers=0, max_batches=2)
    for name in os.listdir(out + '.partial'):
        if name.startswith('shard_'):  # rewrite as the older code did: no embedding array
            path = osp.join(out + '.partial', name)
            with np.load(path) as shard:
                arrays = {k: shard[k] for k in shard.files if k != 'embedding'}
            np.savez(path, **arrays)
    result = extract_features(cfg, demo['samples'], demo['class_names'], out, batch_size=4, num_workers=0)
    assert result['finished'] and result['num_resumed'] == 8
    with np.load(out) as raw:
        assert 'embedding' not in raw.files
    np.testing.assert_array_equal(load_features(out)['embedding'], load_features(reference)['embedding'])
