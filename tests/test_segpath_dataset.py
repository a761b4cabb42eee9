"""SegPathDataset, the split CSV reader, tile names and LoadSegPathAnnotations on tiny demo tiles."""
import csv
import gzip
import os
import os.path as osp
import re

import numpy as np
import pytest
from mmcv.transforms import LoadImageFromFile, Resize
from PIL import Image

from mmseg_sparsevit.datasets import (SEGPATH_ANTIGENS, LoadSegPathAnnotations, SegPathDataset, binarize_segpath_mask,
                                      get_antigen, parse_tile_name, read_fileinfo, tile_name)
from mmseg_sparsevit.datasets.synthetic import make_demo_data

ANTIGENS = ('panCK', 'CD235a')


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('segpath'))
    make_demo_data(root, ANTIGENS, tiles_per_antigen=6, tile_size=48, seed=3)
    return root


def _csv_tiles(path, split):
    """HE files of ``split`` read straight from the CSV with the csv module (independent of the reader)."""
    with open(path, newline='') as f:
        return sorted(
            osp.basename(r['filename']) for r in csv.DictReader(f)
            if r['train_val_test'] == split and r['filename'].endswith('_HE.png'))


@pytest.mark.parametrize('name', ['panCK', 'PANCK', 'Epithelium', 'epithelium', 'panCK_Epithelium'])
def test_get_antigen_accepts_antibody_cell_type_and_folder(name):
    assert get_antigen(name) is SEGPATH_ANTIGENS['panCK']


def test_get_antigen_unknown_lists_choices():
    with pytest.raises(KeyError, match='unknown SegPath antigen.*CD3CD20'):
        get_antigen('CD99')


def test_antigen_table_is_complete_and_unique():
    assert len(SEGPATH_ANTIGENS) == 8
    assert len({a.folder for a in SEGPATH_ANTIGENS.values()}) == 8
    assert len({a.class_name for a in SEGPATH_ANTIGENS.values()}) == 8


def test_parse_released_tile_name():
    parsed = parse_tile_name('ERG_Endothelium/ERG_Endothelium_024_067584_052224_HE.png')
    assert parsed == ('ERG', 'Endothelium', '024', 67584, 52224, 'HE')


@pytest.mark.parametrize('kind', ['HE', 'mask'])
def test_tile_name_round_trip(kind):
    spec = SEGPATH_ANTIGENS['aSMA']
    name = tile_name(spec, 7, 1968, 0, kind)
    assert parse_tile_name(name) == ('aSMA', 'SmoothMuscle', '007', 1968, 0, kind)


@pytest.mark.parametrize('name', ['panCK_Epithelium_001_0_0.png', 'panCK_001_0_0_HE.png', 'x_HE.jpg'])
def test_parse_tile_name_rejects(name):
    with pytest.raises(ValueError, match='not a SegPath tile name'):
        parse_tile_name(name)


@pytest.mark.parametrize('header, prefix', [('filename,train_val_test', 'panCK_Epithelium/'),
                                            ('Filename,Split', ''), (' file_name , SET', '')])
def test_read_fileinfo_tolerates_column_names_and_folder_prefix(tmp_path, header, prefix):
    path = tmp_path / 'panCK_fileinfo.csv'
    path.write_text(f'{header}\n{prefix}a_1_0_0_HE.png,train\n{prefix}a_1_0_0_mask.png,train\n'
                    f'{prefix}a_1_0_9_HE.png,Validation\n')
    info = read_fileinfo(str(path))
    assert info.tiles == {'a_1_0_0': 'train', 'a_1_0_9': 'val'}
    assert info.problems == []


def test_read_fileinfo_gzip(tmp_path):
    path = tmp_path / 'panCK_fileinfo.csv'
    path.write_bytes(gzip.compress(b'filename,train_val_test\na_1_0_0_HE.png,test\n'))
    assert read_fileinfo(str(path)).tiles == {'a_1_0_0': 'test'}


def test_read_fileinfo_reports_bad_rows_with_line(tmp_path):
    path = tmp_path / 'bad.csv'
    path.write_text('filename,train_val_test\na_HE.png,holdout\nb_HE.png,train\nb_mask.png,test\nreadme.txt,train\n')
    problems = read_fileinfo(str(path)).problems
    assert len(problems) == 3
    assert f'{path}:2' in problems[0] and "'holdout'" in problems[0]
    assert f'{path}:4' in problems[1] and 'conflicts' in problems[1]
    assert f'{path}:5' in problems[2] and 'readme.txt' in problems[2]


def test_read_fileinfo_missing_column_names_file(tmp_path):
    path = tmp_path / 'x.csv'
    path.write_text('name_of_file,fold\na_HE.png,train\n')
    with pytest.raises(ValueError, match=f'{path}: no file name column'):
        read_fileinfo(str(path))


@pytest.mark.parametrize('antigen', ANTIGENS)
@pytest.mark.parametrize('split', ['train', 'val', 'test'])
def test_dataset_lists_split_tiles(demo_root, antigen, split):
    ds = SegPathDataset(antigen=antigen, split=split, data_root=demo_root, serialize_data=False)
    csv_path = osp.join(demo_root, antigen, f'{antigen}_fileinfo.csv')
    assert sorted(osp.basename(d['img_path']) for d in ds.load_data_list()) == _csv_tiles(csv_path, split)
    for info in ds.load_data_list():
        assert info['seg_map_path'] == info['img_path'].replace('_HE.png', '_mask.png')
        assert osp.isfile(info['seg_map_path'])


def test_dataset_metainfo_by_cell_type_name(demo_root):
    ds = SegPathDataset(antigen='red blood cell', split='val', data_root=demo_root, serialize_data=False)
    assert ds.metainfo['classes'] == ('background', 'red blood cell')
    assert len(ds.metainfo['palette']) == 2
    assert ds.metainfo['label_map'] is None


def test_dataset_rejects_unknown_split(demo_root):
    with pytest.raises(ValueError, match="split must be one of.*'valid'"):
        SegPathDataset(antigen='panCK', split='valid', data_root=demo_root, serialize_data=False)


def test_dataset_missing_csv_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=osp.join('panCK', 'panCK_fileinfo.csv')):
        SegPathDataset(antigen='panCK', split='train', data_root=str(tmp_path), serialize_data=False)


def test_dataset_missing_mask_names_file(tmp_path):
    make_demo_data(str(tmp_path), ['CD235a'], tiles_per_antigen=3, tile_size=32)
    ds = SegPathDataset(antigen='CD235a', split='test', data_root=str(tmp_path), serialize_data=False)
    missing = ds.load_data_list()[0]['seg_map_path']
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=f'{missing} is listed in .*test split'):
        SegPathDataset(antigen='CD235a', split='test', data_root=str(tmp_path), serialize_data=False)


def test_dataset_bad_csv_row_names_file(tmp_path):
    make_demo_data(str(tmp_path), ['CD235a'], tiles_per_antigen=3, tile_size=32)
    csv_path = tmp_path / 'CD235a' / 'CD235a_fileinfo.csv'
    csv_path.write_text(csv_path.read_text().replace(',val\n', ',dev\n'))
    with pytest.raises(ValueError, match=f"{csv_path}:.*unknown split 'dev'"):
        SegPathDataset(antigen='CD235a', split='train', data_root=str(tmp_path), serialize_data=False)


@pytest.mark.parametrize('backend', ['cv2', 'pillow'])
def test_pipeline_loads_both_encodings_and_rgba(demo_root, backend):
    """Every demo tile through LoadImageFromFile + LoadSegPathAnnotations: 3-channel image, {0, 1} mask
    equal to ``mask > 0`` of the file, whatever its encoding or alpha channel."""
    load_img = LoadImageFromFile(imdecode_backend=backend)
    load_ann = LoadSegPathAnnotations(imdecode_backend=backend)
    seen_modes, seen_max = set(), set()
    for split in ('train', 'val', 'test'):
        ds = SegPathDataset(antigen='panCK', split=split, data_root=demo_root, serialize_data=False)
        for info in ds.load_data_list():
            results = load_ann(load_img(dict(info)))
            with Image.open(info['img_path']) as im:
                seen_modes.add(im.mode)
                rgb = np.asarray(im.convert('RGB'))
            raw = np.asarray(Image.open(info['seg_map_path']))
            seen_max.add(int(raw.max()))
            assert results['img'].shape == rgb.shape
            np.testing.assert_array_equal(results['img'][..., ::-1], rgb)  # mmcv returns BGR, alpha dropped
            np.testing.assert_array_equal(results['gt_seg_map'], (raw > 0).astype(np.uint8))
            assert results['seg_fields'] == ['gt_seg_map']
    assert seen_modes == {'RGB', 'RGBA'} and seen_max == {1, 255}


@pytest.mark.parametrize('values, expected', [((0, 1), (0, 1)), ((0, 255), (0, 1)), ((0, 0), (0, 0)),
                                              ((255, 255), (1, 1))])
def test_binarize_encodings(values, expected):
    out = binarize_segpath_mask(np.array([values], np.uint8), 'm.png')
    assert out.dtype == np.uint8 and out.tolist() == [list(expected)]


@pytest.mark.parametrize('mask, match', [
    (np.array([[0, 1, 255]], np.uint8), r'values \[0, 1, 255\]'),
    (np.array([[0, 7]], np.uint8), r'values \[0, 7\]'),
    (np.array([[0, 256]], np.uint16), r'values \[0, 256\]'),
    (np.zeros((2, 2, 3), np.uint8), 'single-channel'),
])
def test_binarize_rejects_and_names_file(mask, match):
    with pytest.raises(ValueError, match=f'm.png: .*{match}'):
        binarize_segpath_mask(mask, 'm.png')


def _write_pair(tmp_path, mask, size=(8, 8)):
    img_path, mask_path = str(tmp_path / 't_HE.png'), str(tmp_path / 't_mask.png')
    Image.new('RGB', size[::-1]).save(img_path)
    Image.fromarray(mask).save(mask_path)
    return dict(img_path=img_path, seg_map_path=mask_path, seg_fields=[])


@pytest.mark.parametrize('mask, match', [(np.full((8, 8), 3, np.uint8), 'neither'),
                                         (np.zeros((8, 6), np.uint8), 'differs from image size')])
def test_transform_errors_name_mask_file(tmp_path, mask, match):
    results = LoadImageFromFile()(_write_pair(tmp_path, mask))
    with pytest.raises(ValueError, match=f"{results['seg_map_path']}: .*{match}"):
        LoadSegPathAnnotations()(results)


def test_mask_loaded_after_resize_keeps_original_size(demo_root):
    """Test pipelines load masks after Resize: the size check must compare with the original image."""
    info = SegPathDataset(antigen='panCK', split='val', data_root=demo_root, serialize_data=False)[0]
    results = Resize(scale=(20, 20), keep_ratio=False)(LoadImageFromFile()(info))
    results = LoadSegPathAnnotations()(results)
    assert results['img'].shape[:2] == (20, 20)
    assert results['gt_seg_map'].shape == results['ori_shape'] == (48, 48)


def _truncate(path, keep):
    """Keep a fraction of ``path``'s bytes (0: an empty file)."""
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * keep)])


@pytest.mark.parametrize('backend', ['pillow', 'cv2'])
@pytest.mark.parametrize('keep', [0, 0.5])
def test_undecodable_mask_error_names_the_file(tmp_path, backend, keep):
    """An empty or truncated mask: Pillow said 'cannot identify image file <_io.BytesIO ...>', OpenCV
    '!buf.empty()' or nothing at all; now a ValueError naming the mask file."""
    results = LoadImageFromFile()(_write_pair(tmp_path, np.ones((8, 8), np.uint8)))
    _truncate(results['seg_map_path'], keep)
    with pytest.raises(ValueError, match=f"^{re.escape(results['seg_map_path'])}: cannot decode the mask with "
                                         f'{backend}.*tools/prepare_segpath.py --strict'):
        LoadSegPathAnnotations(imdecode_backend=backend)(results)


@pytest.mark.parametrize('backend, keep, error', [('cv2', 0, 'error'), ('pillow', 0, 'UnidentifiedImageError'),
                                                  ('pillow', 0.5, 'OSError'), ('cv2', 0.5, 'AssertionError')])
def test_dataset_names_the_tile_the_loader_failed_on(tmp_path, backend, keep, error):
    """mmcv's image loader names nothing for an empty tile (OpenCV) or any broken one (Pillow): the dataset
    prepends the tile and mask paths, keeping the exception type; an error that names them already (OpenCV's
    'failed to load image: <path>') passes unchanged."""
    make_demo_data(str(tmp_path), ['CD235a'], tiles_per_antigen=3, tile_size=32)
    ds = SegPathDataset(antigen='CD235a', split='train', data_root=str(tmp_path), serialize_data=False,
                        pipeline=[LoadImageFromFile(imdecode_backend=backend), LoadSegPathAnnotations()])
    info = ds.get_data_info(0)
    _truncate(info['img_path'], keep)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the type is the loader's, checked below
        ds[0]
    assert type(caught.value).__name__ == error
    message = str(caught.value)
    if error == 'AssertionError':
        assert message == f"failed to load image: {info['img_path']}"
    else:
        assert message.startswith(f"{info['img_path']} (mask {info['seg_map_path']}): {error}: "), message
