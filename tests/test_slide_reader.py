"""Slide reader: pyramid levels, µm/px from metadata or --slide-mpp, regions at any µm/px, plain images."""
import cv2
import numpy as np
import openslide
import pytest
import tifffile

from mmseg_sparsevit.slide import ImageReader, OpenSlideReader, SlideReadError, list_slides, open_slide
from mmseg_sparsevit.slide.writers import write_pyramidal_tiff

MPP = 0.5


def smooth_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """An RGB image with structure at every scale (so level mix-ups show)."""
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.uniform(0, 255, (height // 32, width // 32, 3)), (width, height),
                        interpolation=cv2.INTER_CUBIC)
    return np.clip(coarse + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def slide(tmp_path_factory):
    image = smooth_image(1024, 768)
    path = str(tmp_path_factory.mktemp('slide') / 'slide.tiff')
    write_pyramidal_tiff(path, image, (MPP, MPP), factors=(1, 4, 16), smooth=True)
    return path, image


def test_pyramidal_tiff_opens_with_openslide_levels_and_mpp(slide):
    path, image = slide
    with open_slide(path) as reader:
        assert isinstance(reader, OpenSlideReader) and reader.vendor == 'generic-tiff'
        assert reader.level_dimensions == ((1024, 768), (256, 192), (64, 48))
        assert reader.level_downsamples == (1.0, 4.0, 16.0)
        assert reader.mpp == (MPP, MPP)


@pytest.mark.parametrize('downsample,level', [(1.0, 0), (3.9, 0), (4.0, 1), (8.0, 1), (15.9, 2), (64.0, 2),
                                              (0.5, 0)])
def test_best_level_is_the_finest_at_or_below_the_downsample(slide, downsample, level):
    with open_slide(slide[0]) as reader:
        assert reader.best_level(downsample) == level


@pytest.mark.parametrize('x,y,w,h', [(0, 0, 64, 64), (100, 37, 224, 112), (960, 700, 64, 68)])
def test_region_at_the_scan_resolution_is_the_source_pixels(slide, x, y, w, h):
    path, image = slide
    with open_slide(path) as reader:
        assert np.array_equal(reader.read_region(x, y, (w, h), MPP), image[y:y + h, x:x + w])


def test_region_at_a_level_resolution_is_that_level(slide):
    path, _ = slide
    level1 = tifffile.TiffFile(path).pages[1].asarray()
    with open_slide(path) as reader:
        region = reader.read_region(4 * 20, 4 * 10, (50, 30), MPP * 4)
    assert np.array_equal(region, level1[10:40, 20:70])


def test_region_between_levels_is_resized_from_the_finer_one(slide):
    path, image = slide
    with open_slide(path) as reader:
        region = reader.read_region(200, 100, (64, 32), MPP * 2)  # downsample 2: level 0, halved
    expected = cv2.resize(image[100:164, 200:328], (64, 32), interpolation=cv2.INTER_AREA)
    assert np.array_equal(region, expected)


def test_region_beyond_the_slide_is_white(slide):
    path, image = slide
    with open_slide(path) as reader:
        region = reader.read_region(1000, 760, (40, 20), MPP)
    assert np.array_equal(region[:8, :24], image[760:, 1000:])
    assert (region[8:] == 255).all() and (region[:, 24:] == 255).all()


def test_thumbnail_maps_to_level0(slide):
    path, image = slide
    with open_slide(path) as reader:
        thumb = reader.thumbnail(mpp=MPP * 8)
    assert thumb.image.shape == (96, 128, 3) and thumb.downsample == (8.0, 8.0) and thumb.mpp == (4.0, 4.0)
    expected = cv2.resize(image, (128, 96), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(thumb.image.astype(int) - expected).mean() < 2  # from level 0 in strips vs in one go


def test_thumbnail_is_capped(slide):
    with open_slide(slide[0]) as reader:
        thumb = reader.thumbnail(mpp=MPP, max_side=100)
    assert max(thumb.image.shape[:2]) <= 100 and thumb.downsample[0] == pytest.approx(1024 / 100)


def test_png_needs_slide_mpp_and_reads_like_a_slide(tmp_path):
    image = smooth_image(300, 200)
    path = str(tmp_path / 'scan.png')
    cv2.imwrite(path, image[..., ::-1])
    with pytest.raises(SlideReadError, match=r'scan\.png.*--slide-mpp'):
        open_slide(path)
    with open_slide(path, slide_mpp=0.25) as reader:
        assert isinstance(reader, ImageReader) and reader.mpp == (0.25, 0.25)
        assert reader.dimensions == (300, 200)
        assert np.array_equal(reader.read_region(10, 20, (50, 40), 0.25), image[20:60, 10:60])


def test_plain_tiff_takes_mpp_from_its_resolution_tags(tmp_path):
    image = smooth_image(200, 100)
    path = str(tmp_path / 'strips.tif')
    tifffile.imwrite(path, image, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit='CENTIMETER')
    assert openslide.OpenSlide.detect_format(path) is None  # not tiled: OpenSlide does not take it
    with open_slide(path) as reader:
        assert isinstance(reader, ImageReader)
        assert reader.mpp == pytest.approx((0.25, 0.25))
        assert np.array_equal(reader.read_region(0, 0, (200, 100), 0.25), image)


def test_tiled_tiff_without_resolution_needs_slide_mpp(tmp_path):
    path = str(tmp_path / 'nores.tiff')
    tifffile.imwrite(path, smooth_image(256, 256), tile=(128, 128), metadata=None)
    with pytest.raises(SlideReadError, match=r'nores\.tiff.*no µm/px'):
        open_slide(path)
    with open_slide(path, slide_mpp=0.5) as reader:
        assert reader.mpp == (0.5, 0.5)


def test_slide_mpp_overrides_the_metadata_with_a_warning(slide):
    with pytest.warns(UserWarning, match='overrides'):
        with open_slide(slide[0], slide_mpp=0.25) as reader:
            assert reader.mpp == (0.25, 0.25)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / 'broken.svs'
    bad.write_bytes(b'not a slide at all')
    with pytest.raises(SlideReadError, match='broken.svs'):
        open_slide(str(bad))
    with pytest.raises(SlideReadError, match='missing.tiff: no such file'):
        open_slide(str(tmp_path / 'missing.tiff'))


def test_list_slides_expands_folders(tmp_path):
    for name in ('a.svs', 'b.tiff', 'notes.txt'):
        (tmp_path / name).write_bytes(b'')
    assert list_slides([str(tmp_path), 'x.ndpi']) == [str(tmp_path / 'a.svs'), str(tmp_path / 'b.tiff'), 'x.ndpi']
