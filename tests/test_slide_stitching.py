"""Stitching: the blended map over overlapping tiles equals the map of the whole region at once."""
import numpy as np
import pytest
import torch

from mmseg_sparsevit.slide import Stitcher, blend_window, plan_tiles, window_profile


@pytest.mark.parametrize('kind', ['cosine', 'linear'])
def test_window_is_positive_symmetric_and_flat_inside(kind):
    w = window_profile(64, 16, kind)
    assert (w > 0).all() and np.allclose(w, w[::-1]) and (w[16:48] == 1).all()
    assert (np.diff(w[:17]) > 0).all()
    assert blend_window(64, 16, kind).min() > 0
    assert (window_profile(32, 0, kind) == 1).all()


def stitch(grid, model, image, window='cosine'):
    """Run ``model`` tile by tile over ``image`` and stitch; return the map and the largest number of open blocks."""
    height, width = grid.canvas_size[1], grid.canvas_size[0]
    out = np.full((model.out_channels, height, width), np.nan, np.float32)
    open_blocks = []

    def sink(block):
        h, w = block.covered.shape
        out[:, block.y:block.y + h, block.x:block.x + w] = np.where(block.covered, block.scores, np.nan)

    stitcher = Stitcher(grid, model.out_channels, sink, window)
    t = grid.tile_size
    padded = np.pad(image, ((0, 0), (0, t), (0, t)))
    for index, (x, y) in enumerate(grid.origins):
        with torch.no_grad():
            scores = model(torch.from_numpy(padded[None, :, y:y + t, x:x + t]))[0].numpy()
        stitcher.add(index, scores)
        open_blocks.append(len(stitcher._sums))
    assert stitcher.finished and not stitcher._sums
    return out, max(open_blocks)


@pytest.mark.parametrize('tile,overlap,window', [(32, 8, 'cosine'), (32, 8, 'linear'), (28, 14, 'cosine'),
                                                 (30, 0, 'cosine'), (32, 20, 'linear')])
def test_stitched_per_pixel_model_equals_the_whole_region(tile, overlap, window):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)  # per pixel: tiling must not change its output
    image = np.random.default_rng(0).normal(size=(3, 101, 157)).astype(np.float32)
    grid = plan_tiles((157, 101), (1.0, 1.0), 1.0, tile, overlap)
    stitched, _ = stitch(grid, model, image, window)
    with torch.no_grad():
        whole = model(torch.from_numpy(image[None]))[0].numpy()
    assert not np.isnan(stitched).any()
    np.testing.assert_allclose(stitched, whole, atol=1e-5, rtol=0)


def test_only_a_few_block_rows_are_held():
    model = torch.nn.Conv2d(3, 2, 1)
    image = np.zeros((3, 400, 64), np.float32)
    grid = plan_tiles((64, 400), (1.0, 1.0), 1.0, 32, 8)
    _, most_open = stitch(grid, model, image)
    blocks_per_row = -(-64 // grid.stride)
    total_blocks = blocks_per_row * -(-400 // grid.stride)
    assert most_open <= 3 * blocks_per_row < total_blocks / 4


def test_uncovered_pixels_are_marked():
    grid = plan_tiles((100, 60), (1.0, 1.0), 1.0, 40, 10)
    grid = type(grid)(grid.slide_size, grid.mpp, grid.downsample, 40, 10, grid.origins[[0]])  # one tile only
    blocks = []
    stitcher = Stitcher(grid, 1, blocks.append)
    stitcher.add(0, np.ones((1, 40, 40), np.float32))
    covered = np.zeros((60, 100), bool)
    for b in blocks:
        covered[b.y:b.y + b.covered.shape[0], b.x:b.x + b.covered.shape[1]] = b.covered
        assert np.allclose(b.scores[:, b.covered], 1) and (b.scores[:, ~b.covered] == 0).all()
    assert covered[:40, :40].all() and not covered[:, 40:].any() and not covered[40:].any()


def test_state_dict_resumes_to_the_same_map():
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 3, 1)
    image = np.random.default_rng(1).normal(size=(3, 90, 120)).astype(np.float32)
    grid = plan_tiles((120, 90), (1.0, 1.0), 1.0, 32, 12)
    whole, _ = stitch(grid, model, image)

    out = np.zeros((3, 90, 120), np.float32)

    def sink(block):
        out[:, block.y:block.y + block.scores.shape[1], block.x:block.x + block.scores.shape[2]] = block.scores

    def tile_scores(i):
        x, y = grid.origins[i]
        padded = np.pad(image, ((0, 0), (0, 32), (0, 32)))
        with torch.no_grad():
            return model(torch.from_numpy(padded[None, :, y:y + 32, x:x + 32]))[0].numpy()

    first = Stitcher(grid, 3, sink)
    half = len(grid) // 2
    for i in range(half):
        first.add(i, tile_scores(i))
    state = {k: v.copy() for k, v in first.state_dict().items()}
    second = Stitcher(grid, 3, sink)
    second.load_state_dict(state)
    for i in range(half, len(grid)):
        second.add(i, tile_scores(i))
    assert second.finished
    np.testing.assert_array_equal(out, whole)


def test_bad_tiles_are_refused():
    grid = plan_tiles((64, 64), (1.0, 1.0), 1.0, 32, 0)
    stitcher = Stitcher(grid, 2, lambda block: None)
    with pytest.raises(ValueError, match=r'tile 0: expected scores of shape \(2, 32, 32\)'):
        stitcher.add(0, np.zeros((2, 16, 32), np.float32))
    stitcher.add(0, np.zeros((2, 32, 32), np.float32))
    with pytest.raises(ValueError, match='tile 0 was already added'):
        stitcher.add(0, np.zeros((2, 32, 32), np.float32))
