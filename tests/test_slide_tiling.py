"""Tissue detection, tile grids over tissue, and tiles read back at their coordinates."""
import math

import cv2
import numpy as np
import pytest
import torch

from mmseg_sparsevit.slide import TissueMask, TissueSettings, check_tile_size, detect_tissue, plan_tiles
from mmseg_sparsevit.slide.dataset import TileDataset
from mmseg_sparsevit.slide.writers import write_pyramidal_tiff

GLASS = (244, 244, 244)
STAIN = (236, 172, 204)  # eosin pink


def thumbnail_with(shapes, size=(200, 300), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros(size + (3,), np.uint8)
    img[:] = GLASS
    for draw in shapes:
        draw(img)
    return np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)


def test_tissue_is_the_stained_region():
    img = thumbnail_with([lambda im: cv2.ellipse(im, (150, 100), (80, 50), 0, 0, 360, STAIN, -1)])
    truth = np.zeros(img.shape[:2], np.uint8)
    cv2.ellipse(truth, (150, 100), (80, 50), 0, 0, 360, 1, -1)
    mask = detect_tissue(img, (8.0, 8.0))
    iou = (mask & (truth > 0)).sum() / (mask | (truth > 0)).sum()
    assert iou > 0.97


def test_blank_glass_has_no_tissue():
    assert not detect_tissue(thumbnail_with([]), (8.0, 8.0)).any()


def test_specks_are_dropped_and_small_holes_filled():
    def draw(im):
        cv2.rectangle(im, (50, 50), (200, 150), STAIN, -1)
        cv2.circle(im, (100, 100), 3, GLASS, -1)  # a small hole: filled
        cv2.rectangle(im, (150, 70), (190, 130), GLASS, -1)  # a big hole: kept
        cv2.circle(im, (20, 180), 2, STAIN, -1)  # a speck: dropped
    mask = detect_tissue(thumbnail_with([draw]), (8.0, 8.0), TissueSettings(close_um=0, blur_um=0))
    assert mask[100, 100] and mask[60, 60]
    assert not mask[100, 170] and not mask[180, 20]


def test_tile_size_must_be_a_multiple_of_the_patch_size():
    check_tile_size(448, 14)
    message = "tile size 500 is not a multiple of the model's patch size 14: use 490 or 504"
    with pytest.raises(ValueError, match=message):
        check_tile_size(500, 14)


@pytest.mark.parametrize('tile,overlap', [(112, 0), (112, 28), (224, 56)])
def test_grid_covers_the_slide_with_the_stride(tile, overlap):
    grid = plan_tiles((3000, 2000), (0.25, 0.25), 1.0, tile, overlap)
    width, height = grid.canvas_size
    assert (width, height) == (750, 500)
    stride = tile - overlap
    assert (grid.origins % stride == 0).all()
    cols = math.ceil(max(width - tile, 0) / stride) + 1
    rows = math.ceil(max(height - tile, 0) / stride) + 1
    assert len(grid) == rows * cols
    assert grid.origins[:, 0].max() + tile >= width and grid.origins[:, 1].max() + tile >= height
    assert grid.origins[:, 0].max() < width and grid.origins[:, 1].max() < height
    assert np.array_equal(grid.level0_coords(), grid.origins * 4)
    assert grid.level0_tile_size == (tile * 4, tile * 4)


def test_only_tiles_touching_tissue_are_kept():
    mask = np.zeros((100, 150), bool)  # at 8 µm/px; the slide is 3000 x 2000 px at 0.4 µm/px
    mask[30:60, 40:90] = True
    tissue = TissueMask(mask, (20.0, 20.0), (8.0, 8.0))
    full = plan_tiles((3000, 2000), (0.4, 0.4), 1.6, 100, 20)
    kept = plan_tiles((3000, 2000), (0.4, 0.4), 1.6, 100, 20, tissue)
    assert 0 < len(kept) < len(full)
    kept_set = {tuple(o) for o in kept.origins}
    for x, y in full.origins:
        # The tile spans target px [x, x + 100), i.e. mask px [x / 5, (x + 100) / 5).
        touches = mask[y // 5:(y + 100 + 4) // 5, x // 5:(x + 100 + 4) // 5].any()
        assert touches == ((x, y) in kept_set)


def test_min_tissue_keeps_mostly_tissue_tiles():
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True
    tissue = TissueMask(mask, (10.0, 10.0), (1.0, 1.0))
    grid = plan_tiles((1000, 1000), (0.1, 0.1), 1.0, 20, 0, tissue, min_tissue=0.5)
    assert len(grid) == 5 * 2  # 2 of 5 columns lie fully in tissue, the middle one only half
    assert (grid.origins[:, 0] < 40).all()


def test_a_tile_read_at_its_coords_is_the_source_pixels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    path = str(tmp_path / 's.tiff')
    write_pyramidal_tiff(path, image, (0.5, 0.5), factors=(1, 4))
    grid = plan_tiles((800, 600), (0.5, 0.5), 0.5, 112, 14)
    dataset = TileDataset(path, grid)
    for item in (0, 7, len(dataset) - 1):
        index, tile = dataset[item]
        x, y = grid.level0_coords()[index]
        expected = np.full((112, 112, 3), 255, np.uint8)
        part = image[y:y + 112, x:x + 112]
        expected[:part.shape[0], :part.shape[1]] = part
        assert isinstance(tile, torch.Tensor) and tile.dtype == torch.uint8
        assert np.array_equal(tile.numpy(), expected)
    subset = TileDataset(path, grid, indices=[5, 2])
    assert len(subset) == 2 and subset[0][0] == 5
