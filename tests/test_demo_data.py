"""The synthetic SegPath generator: deterministic bytes, SegPath layout, learnable foreground."""
import os
import os.path as osp
import runpy

import numpy as np
import pytest
from PIL import Image

from mmseg_sparsevit.datasets import SEGPATH_ANTIGENS, SegPathDataset
from mmseg_sparsevit.datasets.synthetic import demo_splits, make_demo_data, render_tile


def _tree(root):
    """Relative path -> bytes of every file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = osp.join(folder, name)
            with open(path, 'rb') as f:
                out[osp.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    trees = []
    for run, seed in (('a', 5), ('b', 5), ('c', 6)):
        make_demo_data(str(tmp_path / run / 'data'), ['panCK', 'ERG'], 3, 32, seed, str(tmp_path / run / 'dl'))
        trees.append(_tree(tmp_path / run))
    assert len(trees[0]) == 2 * (3 * 2 + 1) + 2 * 2  # tiles + CSV per antigen, archive + CSV per antigen
    assert trees[0] == trees[1]
    differing = {k for k in trees[0] if trees[0][k] != trees[2][k]}
    assert any(k.endswith('_HE.png') for k in differing)
    assert not any(k.endswith('.csv') for k in differing)  # names and splits do not depend on the seed


def test_layout_is_read_by_dataset_and_mixes_encodings(tmp_path):
    counts = make_demo_data(str(tmp_path), ['CD3CD20'], tiles_per_antigen=6, tile_size=32)
    assert counts == {'CD3CD20': {'train': 4, 'val': 1, 'test': 1}}
    folder = tmp_path / 'CD3CD20'
    names = sorted(os.listdir(folder))
    assert names[-1] == 'CD3CD20_fileinfo.csv'
    assert all(n.startswith('CD3CD20_Lymphocyte_') for n in names[:-1]) and len(names) == 13
    modes = {Image.open(folder / n).mode for n in names if n.endswith('_HE.png')}
    mask_max = {int(np.asarray(Image.open(folder / n)).max()) for n in names if n.endswith('_mask.png')}
    assert modes == {'RGB', 'RGBA'} and mask_max == {1, 255}
    for split, n in counts['CD3CD20'].items():
        assert len(SegPathDataset(antigen='CD3CD20', split=split, data_root=str(tmp_path), serialize_data=False)) == n


@pytest.mark.parametrize('antigen', list(SEGPATH_ANTIGENS))
def test_render_tile_foreground_is_distinct(antigen):
    """Targets cover a sensible area and differ in colour from the rest, so a model can learn them."""
    img, mask = render_tile(antigen, 128, np.random.default_rng(1))
    again = render_tile(antigen, 128, np.random.default_rng(1))
    np.testing.assert_array_equal(img, again[0])
    np.testing.assert_array_equal(mask, again[1])
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert 0.005 < mask.mean() < 0.5
    fg, bg = img[mask == 1].mean(0), img[mask == 0].mean(0)
    assert np.linalg.norm(fg - bg) > 40


@pytest.mark.parametrize('n, expected', [(3, (1, 1, 1)), (12, (8, 2, 2)), (20, (14, 3, 3))])
def test_demo_splits(n, expected):
    splits = demo_splits(n)
    assert tuple(splits.count(s) for s in ('train', 'val', 'test')) == expected


def test_demo_splits_too_few():
    with pytest.raises(ValueError, match='at least 3 tiles'):
        demo_splits(2)


def test_cli_writes_data_and_archives(tmp_path):
    main = runpy.run_path('tools/make_demo_data.py')['main']
    assert main([str(tmp_path / 'd'), '--antigens', 'MNDA', '--tiles', '3', '--tile-size', '16',
                 '--archives', str(tmp_path / 'dl')]) == 0
    assert sorted(os.listdir(tmp_path / 'dl')) == ['MNDA_MyeloidCell.tar.gz', 'MNDA_fileinfo.csv']
    assert len(os.listdir(tmp_path / 'd' / 'MNDA')) == 7
