"""prepare_segpath end to end on generated archives, and every validator check naming its file."""
import io
import os
import os.path as osp
import re
import runpy
import shutil
import tarfile

import numpy as np
import pytest
from mmcv.transforms import LoadImageFromFile
from PIL import Image

from mmseg_sparsevit.datasets import LoadSegPathAnnotations, SegPathDataset
from mmseg_sparsevit.datasets.prepare import prepare_segpath, unpack_archive
from mmseg_sparsevit.datasets.synthetic import make_demo_data

ANTIGENS = ('panCK', 'CD235a')
SIZE = 32
CLI = 'tools/prepare_segpath.py'


def _visible_tree(root):
    """Relative path -> bytes of the files under ``root``, hidden markers left out."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.startswith('.'):
                with open(osp.join(folder, name), 'rb') as f:
                    out[osp.relpath(osp.join(folder, name), root)] = f.read()
    return out


@pytest.fixture
def download(tmp_path):
    """(directly generated layout, download folder with archives + CSVs, output root, counts)."""
    direct, dl = str(tmp_path / 'direct'), str(tmp_path / 'dl')
    counts = make_demo_data(direct, ANTIGENS, tiles_per_antigen=6, tile_size=SIZE, archive_dir=dl)
    return direct, dl, str(tmp_path / 'prepared'), counts


def test_end_to_end_equals_direct_layout(download):
    direct, dl, out, counts = download
    report = prepare_segpath(dl, out, expected_size=SIZE)
    assert report.problems == []
    assert {a.antigen: a.counts for a in report.antigens} == counts
    assert [(a.rgba_tiles, a.masks_0_255) for a in report.antigens] == [(2, 3)] * 2
    assert _visible_tree(out) == _visible_tree(direct)
    ds = SegPathDataset(antigen='panCK', split='train', data_root=out, serialize_data=False)
    assert len(ds) == counts['panCK']['train']


def test_unpack_is_idempotent(download, tmp_path):
    _, dl, _, _ = download
    archive, dest = osp.join(dl, 'panCK_Epithelium.tar.gz'), str(tmp_path / 'u')
    assert unpack_archive(archive, dest) is True
    first = _visible_tree(dest)
    assert unpack_archive(archive, dest) is False
    assert _visible_tree(dest) == first and len(first) == 12


def _unpack(dl: str, folder: str, dest) -> None:
    """Unpack the ``folder`` archive of the download ``dl`` with its file-info CSV into ``dest``, by hand."""
    dest.mkdir()
    with tarfile.open(osp.join(dl, f'{folder}.tar.gz')) as tar:
        tar.extractall(dest, filter='data')
    shutil.copy(osp.join(dl, f'{folder.split("_")[0]}_fileinfo.csv'), dest)


def test_unpacked_folder_as_source(download, tmp_path):
    direct, dl, out, _ = download
    src = tmp_path / 'unpacked'
    _unpack(dl, 'CD235a_RBC', src)
    report = prepare_segpath(str(src), out, expected_size=SIZE)
    assert [a.antigen for a in report.antigens] == ['CD235a'] and report.problems == []
    assert _visible_tree(osp.join(out, 'CD235a')) == _visible_tree(osp.join(direct, 'CD235a'))


def _first_tile(out, split='train'):
    info = SegPathDataset(antigen='panCK', split=split, data_root=out, serialize_data=False).load_data_list()[0]
    return info['img_path'], info['seg_map_path']


def _remove_mask(he, mask):
    os.remove(mask)
    return mask, 'listed in .* but missing'


def _shrink_mask(he, mask):
    Image.fromarray(np.zeros((SIZE, SIZE - 2), np.uint8)).save(mask)
    return mask, f'mask size {SIZE - 2}x{SIZE} differs from H&E size {SIZE}x{SIZE} of {he}'


def _bad_values(he, mask):
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(mask)
    return mask, r'values \[7\] are neither'


def _wrong_size(he, mask):
    Image.new('RGB', (SIZE + 8, SIZE + 8)).save(he)
    Image.new('L', (SIZE + 8, SIZE + 8)).save(mask)
    return he, f'size {SIZE + 8}x{SIZE + 8}, expected {SIZE}x{SIZE}'


def _orphan(he, mask):
    extra = he.replace('_HE.png', '9_HE.png')
    shutil.copy(he, extra)
    return extra, 'file has no row in'


def _stray_file(he, mask):
    stray = osp.join(osp.dirname(he), 'notes.txt')
    open(stray, 'w').close()
    return stray, 'unexpected file'


@pytest.mark.parametrize('corrupt', [_remove_mask, _shrink_mask, _bad_values, _wrong_size, _orphan, _stray_file])
def test_each_problem_is_reported_naming_the_file(download, corrupt):
    """Break one thing in a prepared antigen, re-run (unpack is skipped, so the damage stays):
    exactly that problem is reported, a broken tile leaves the cleaned CSV, and --strict fails."""
    _, dl, out, counts = download
    prepare_segpath(dl, out, expected_size=SIZE)
    he, mask = _first_tile(out)
    path, message = corrupt(he, mask)
    report = prepare_segpath(dl, out, expected_size=SIZE)
    assert len(report.problems) == 1
    assert report.problems[0].startswith(path)
    assert re.search(message, report.problems[0]), report.problems[0]
    tile_broken = corrupt not in (_orphan, _stray_file)
    train = len(SegPathDataset(antigen='panCK', split='train', data_root=out, serialize_data=False))
    assert train == counts['panCK']['train'] - tile_broken
    main = runpy.run_path(CLI)['main']
    args = [dl, out, '--expected-size', str(SIZE)]
    assert main(args) == 0
    assert main(args + ['--strict']) == 1


def _cut(path, keep):
    """Truncate ``path`` to a fraction (float) or a number of bytes (int; negative: drop that many)."""
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep) if isinstance(keep, float) else keep])


@pytest.mark.parametrize('kind, keep', [('HE', 0.5), ('HE', -20), ('mask', 0.5), ('mask', 0)])
def test_strict_flags_truncated_files_that_training_cannot_load(download, kind, keep):
    """A truncated H&E tile or mask (cut in the pixel data, only its end missing, or empty) makes the
    training pipeline fail; the checks decode every file, so --strict fails and names it, and the
    cleaned CSV drops the tile."""
    _, dl, out, counts = download
    prepare_segpath(dl, out, expected_size=SIZE, workers=1)
    he, mask = _first_tile(out)
    path = he if kind == 'HE' else mask
    _cut(path, keep)
    with pytest.raises(Exception):  # noqa: PT011 - whatever the loaders raise, training would stop here
        LoadSegPathAnnotations()(LoadImageFromFile()(dict(img_path=he, seg_map_path=mask, seg_fields=[])))
    main = runpy.run_path(CLI)['main']
    assert main([dl, out, '--expected-size', str(SIZE), '--strict', '--workers', '2']) == 1
    report = prepare_segpath(dl, out, expected_size=SIZE, workers=2)
    what = 'H&E tile' if kind == 'HE' else 'mask'
    assert len(report.problems) == 1 and report.problems[0].startswith(f'{path}: unreadable {what} ('), report.problems
    train = SegPathDataset(antigen='panCK', split='train', data_root=out, serialize_data=False)
    assert len(train) == counts['panCK']['train'] - 1 and he not in [d['img_path'] for d in train.load_data_list()]


def test_unknown_split_is_reported_once(download):
    """A tile whose rows (HE and mask) name an unknown split: one problem naming the CSV lines, not also
    'file has no row' for its two files; the tile leaves the cleaned CSV."""
    _, dl, out, counts = download
    csv_path = osp.join(dl, 'panCK_fileinfo.csv')
    with open(csv_path) as f:
        lines = f.read().splitlines()
    first_train = next(i for i, ln in enumerate(lines) if ln.endswith(',train'))
    stem = osp.basename(lines[first_train].split(',')[0]).rsplit('_', 1)[0]
    rows = [i for i, ln in enumerate(lines) if osp.basename(ln.split(',')[0]).rsplit('_', 1)[0] == stem]
    assert len(rows) == 2  # its HE and mask rows
    for i in rows:
        lines[i] = lines[i].replace(',train', ',dev')
    with open(csv_path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    report = prepare_segpath(dl, out, expected_size=SIZE, workers=1)
    assert len(report.problems) == 1, report.problems
    assert re.match(rf"{re.escape(csv_path)}:{rows[0] + 1}: .*{stem}_\w+\.png: unknown split 'dev'.*"
                    rf"line {rows[1] + 1} .* too$", report.problems[0]), report.problems[0]
    assert report.antigens[0].counts['train'] == counts['panCK']['train'] - 1
    with open(osp.join(out, 'panCK', 'panCK_fileinfo.csv')) as f:
        assert stem not in f.read()


def test_parallel_workers_give_the_same_report_and_output(download, tmp_path):
    """Several broken tiles among good ones, prepared with --normalise by 1 and by 3 worker processes:
    the same problems in the same order, the same counts, and byte-identical output folders."""
    _, dl, _, counts = download
    src = tmp_path / 'unpacked'
    _unpack(dl, 'panCK_Epithelium', src)
    tiles = sorted(osp.join(src, 'panCK_Epithelium', n) for n in os.listdir(src / 'panCK_Epithelium'))
    he_files = [t for t in tiles if t.endswith('_HE.png')]
    _cut(he_files[0], 0.5)
    _bad_values(he_files[2], he_files[2].replace('_HE.png', '_mask.png'))
    _cut(he_files[4].replace('_HE.png', '_mask.png'), 0)
    reports = {}
    for workers in (1, 3):
        out = str(tmp_path / f'out{workers}')
        reports[workers] = prepare_segpath(str(src), out, expected_size=SIZE, normalise=True, workers=workers)
    one, three = reports[1], reports[3]
    assert len(one.problems) == 3
    assert [p.replace(str(tmp_path / 'out1'), str(tmp_path / 'out3')) for p in one.problems] == three.problems
    assert one.summary() == three.summary() and one.antigens[0].counts == three.antigens[0].counts
    assert one.usable == sum(counts['panCK'].values()) - 3
    assert _visible_tree(tmp_path / 'out1') == _visible_tree(tmp_path / 'out3')


def test_missing_csv_makes_antigen_unusable(download):
    _, dl, out, _ = download
    prepare_segpath(dl, out, antigens=['panCK'], expected_size=SIZE)
    os.remove(osp.join(dl, 'panCK_fileinfo.csv'))
    report = prepare_segpath(dl, out, antigens=['panCK'], expected_size=SIZE)
    assert report.usable == 0
    assert report.problems == [f'{osp.join(dl, "panCK_fileinfo.csv")}: split CSV missing, no tile is usable']
    assert not osp.exists(osp.join(out, 'panCK', 'panCK_fileinfo.csv'))  # no stale CSV left for the dataset
    assert runpy.run_path(CLI)['main']([dl, out, '--antigens', 'panCK', '--expected-size', str(SIZE)]) == 1


def test_empty_download_folder_fails(tmp_path):
    assert runpy.run_path(CLI)['main']([str(tmp_path), str(tmp_path / 'out')]) == 1


def test_named_antigen_without_archive_is_reported(download):
    _, dl, out, _ = download
    report = prepare_segpath(dl, out, antigens=['aSMA'], expected_size=SIZE)
    assert report.usable == 0
    assert report.problems[0].startswith(osp.join(dl, 'aSMA_SmoothMuscle.tar.gz'))


def test_normalise_rewrites_rgba_and_255_masks_only_in_output(download):
    direct, dl, out, _ = download
    before = _visible_tree(dl)
    report = prepare_segpath(dl, out, expected_size=SIZE, normalise=True)
    assert report.problems == [] and [a.normalised for a in report.antigens] == [4, 4]  # tiles 1, 2, 3, 5 of 6
    assert _visible_tree(dl) == before
    for antigen in ANTIGENS:
        for name in os.listdir(osp.join(out, antigen)):
            if name.endswith('_HE.png'):
                assert Image.open(osp.join(out, antigen, name)).mode == 'RGB'
            elif name.endswith('_mask.png'):
                got = np.asarray(Image.open(osp.join(out, antigen, name)))
                ref = np.asarray(Image.open(osp.join(direct, antigen, name)))
                np.testing.assert_array_equal(got, (ref > 0).astype(np.uint8))
    again = prepare_segpath(dl, out, expected_size=SIZE, normalise=True)
    assert [(a.rgba_tiles, a.masks_0_255, a.normalised) for a in again.antigens] == [(0, 0, 0)] * 2


def test_archive_filter_flattens_names_and_drops_links(tmp_path):
    archive = tmp_path / 'x.tar'
    with tarfile.open(archive, 'w') as tar:
        for name in ('../../escape_HE.png', 'deep/er/inner_HE.png', '._inner_HE.png'):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b'abc'))
        link = tarfile.TarInfo('link_HE.png')
        link.type, link.linkname = tarfile.SYMTYPE, '/etc/passwd'
        tar.addfile(link)
    dest = tmp_path / 'dest'
    unpack_archive(str(archive), str(dest))
    assert sorted(os.listdir(dest)) == ['.x.tar.unpacked', 'escape_HE.png', 'inner_HE.png']
    assert sorted(os.listdir(tmp_path)) == ['dest', 'x.tar']
