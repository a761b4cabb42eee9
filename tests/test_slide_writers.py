"""Per-slide outputs read back: class-map TIFF through OpenSlide, GeoJSON polygons, overlay, atomic writes."""
import json
import os

import numpy as np
import openslide
import pytest
import tifffile

from mmseg_sparsevit.slide import (atomic_path, class_polygons, geojson_features, overlay, pyramid_factors,
                                   tiling_preview, write_geojson, write_json, write_pyramidal_tiff)
from mmseg_sparsevit.slide.writers import read_state, write_state

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]


def class_map() -> np.ndarray:
    cmap = np.zeros((300, 500), np.uint8)
    cmap[50:150, 100:300] = 1
    cmap[80:120, 150:200] = 0  # a hole in class 1
    cmap[200:260, 20:60] = 2
    cmap[280:, 400:] = 255  # not analysed
    return cmap


def test_class_tiff_opens_in_openslide_with_size_mpp_levels_and_colours(tmp_path):
    path = str(tmp_path / 'classes.tiff')
    cmap = class_map()
    write_pyramidal_tiff(path, cmap, (1.5, 1.5), palette=PALETTE)
    assert pyramid_factors((500, 300)) == [1, 2]
    slide = openslide.OpenSlide(path)
    assert slide.properties['openslide.vendor'] == 'generic-tiff'
    assert slide.dimensions == (500, 300) and slide.level_count == 2
    assert float(slide.properties['openslide.mpp-x']) == pytest.approx(1.5)
    assert float(slide.properties['openslide.mpp-y']) == pytest.approx(1.5)
    rgba = np.asarray(slide.read_region((0, 0), 0, (500, 300)))
    for value, color in enumerate(PALETTE):
        assert (rgba[cmap == value][:, :3] == color).all()
    slide.close()
    with tifffile.TiffFile(path) as tif:
        assert np.array_equal(tif.pages[0].asarray(), cmap)  # the indices themselves
        assert np.array_equal(tif.pages[1].asarray(), cmap[::2, ::2])
        assert tif.pages[1].tags['XResolution'].value[0] / tif.pages[1].tags['XResolution'].value[1] == \
            pytest.approx(1e4 / 3.0)


def test_polygons_have_holes_and_level0_bounds():
    mask = class_map() == 1
    polygons = class_polygons(mask, (4.0, 2.0))
    assert len(polygons) == 1 and len(polygons[0]) == 2  # exterior + one hole
    exterior, hole = (np.array(r) for r in polygons[0])
    assert (exterior[0] == exterior[-1]).all() and (hole[0] == hole[-1]).all()
    # Pixel columns 100..299, rows 50..149 at downsample (4, 2): centres (col + 0.5) * 4, (row + 0.5) * 2.
    assert exterior[:, 0].min() == 100.5 * 4 and exterior[:, 0].max() == 299.5 * 4
    assert exterior[:, 1].min() == 50.5 * 2 and exterior[:, 1].max() == 149.5 * 2
    # The hole's boundary runs through the class-1 pixels around the class-0 gap (cols 150..199, rows 80..119).
    assert hole[:, 0].min() == 149.5 * 4 and hole[:, 0].max() == 200.5 * 4
    assert hole[:, 1].min() == 79.5 * 2 and hole[:, 1].max() == 120.5 * 2


def test_geojson_is_a_qupath_feature_collection(tmp_path):
    path = str(tmp_path / 'classes.geojson')
    features = geojson_features(class_map(), (2.0, 2.0), ['background', 'epithelium', 'stroma'], PALETTE)
    write_geojson(path, features)
    with open(path) as f:
        data = json.load(f)
    assert data['type'] == 'FeatureCollection'
    assert [f['properties']['classification']['name'] for f in data['features']] == ['epithelium', 'stroma']
    for feature in data['features']:
        assert feature['type'] == 'Feature' and feature['geometry']['type'] == 'MultiPolygon'
        assert feature['properties']['objectType'] == 'annotation'
    stroma = np.array(data['features'][1]['geometry']['coordinates'][0][0])
    assert stroma[:, 0].min() == 20.5 * 2 and stroma[:, 0].max() == 59.5 * 2
    assert data['features'][1]['properties']['classification']['color'] == [0, 128, 255]


def test_tiny_pieces_are_left_out():
    mask = np.zeros((20, 20), bool)
    mask[2, 2] = True  # one pixel: encloses nothing
    mask[10:13, 10:13] = True  # 3 x 3 px: contour area 4
    assert len(class_polygons(mask, (1.0, 1.0))) == 1
    assert class_polygons(mask, (1.0, 1.0), min_area_px=5) == []


def test_overlay_paints_classes_but_not_background_or_unanalysed():
    thumb = np.full((30, 50, 3), 200, np.uint8)
    out = overlay(thumb, class_map(), PALETTE, alpha=0.5)
    assert out.shape == thumb.shape
    assert (out[5, 5] == 200).all()  # background
    assert (out[10, 20] == [228, 100, 100]).all()  # class 1: thumbnail (10, 20) samples map (105, 205)
    assert (out[29, 49] == 200).all()  # not analysed


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    path = tmp_path / 'out.json'
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, 'w') as f:
                f.write('{partial')
            raise RuntimeError('killed')
    assert os.listdir(tmp_path) == []
    write_json(str(path), {'a': 1})
    assert json.loads(path.read_text()) == {'a': 1} and os.listdir(tmp_path) == ['out.json']


def test_tiling_preview_draws_tiles_and_tissue_where_they_are():
    view = np.full((100, 150, 3), 255, np.uint8)  # 4 level-0 px per view px
    tissue = np.zeros((50, 75), bool)  # 8 level-0 px per mask px
    tissue[10:30, 10:40] = True
    out = tiling_preview(view, (4.0, 4.0), np.array([[80, 40]]), (160.0, 160.0), tissue)
    blue = np.all(out == (30, 60, 220), axis=-1)
    ys, xs = np.nonzero(blue)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 59, 10, 49)  # level-0 [80, 240) x [40, 200)
    assert not blue[30, 40]  # inside the tile
    green = np.all(out == (0, 160, 0), axis=-1)
    assert green[20:60, 18:22].any() and not green[40, 50]  # tissue outline at view x = 20, not inside


def test_state_is_read_back_only_for_its_run_and_when_intact(tmp_path, mmengine_log):
    path = str(tmp_path / 'slide.partial.npz')
    assert read_state(path, 'run-a') is None  # nothing saved yet
    write_state(path, 'run-a', dict(done=np.array([True, False]), features=np.ones((2, 3), np.float32)))
    state = read_state(path, 'run-a')
    assert sorted(state) == ['done', 'features'] and state['done'].tolist() == [True, False]
    assert read_state(path, 'run-b') is None and not mmengine_log  # another run's state: quietly not used
    assert read_state(path, 'run-a', required=('done', 'added')) is None
    assert mmengine_log.pop() == f'{path}: unreadable partial state (no added); starting the slide afresh'
    data = open(path, 'rb').read()
    for damaged in (data[:len(data) // 2], b'', b'\x93NUMPY garbage'):
        with open(path, 'wb') as f:
            f.write(damaged)
        assert read_state(path, 'run-a') is None
    assert len(mmengine_log) == 3 and all(m.startswith(f'{path}: unreadable partial state (') for m in mmengine_log)
    with open(path, 'wb') as f:  # a pickle is refused, not run
        np.save(f, np.array([{'a': 1}], dtype=object), allow_pickle=True)
    assert read_state(path, 'run-a') is None and 'allow_pickle' in mmengine_log[-1]
