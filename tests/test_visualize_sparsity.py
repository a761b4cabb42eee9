"""The sparsity figures (``mmseg_sparsevit.visualization``): the query panel colours exactly the keys the reference
mask allows, the pruned panel dims exactly the patches the model drops; and the CLI's argument checks and a tiny
random-weight run."""
import math
import runpy
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from mmseg_sparsevit.models import SparseViT
from mmseg_sparsevit.models.modes import mode_kwargs
from mmseg_sparsevit.ops import neighbourhood_mask
from mmseg_sparsevit.utils.he_tiles import LUMEN
from mmseg_sparsevit.visualization import (attention_pattern_figure, kept_patch_tokens, pruned_tokens_figure,
                                           pruned_tokens_image, query_keys_image, synthetic_tile)
from mmseg_sparsevit.visualization.sparsity import DIM, QUERY, SEEN, UNSEEN

matplotlib.use('Agg')
TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'visualize_sparsity.py'
TINY = dict(arch='vit-s', depth=2, embed_dim=24, num_heads=2, patch_size=8, prune_ratio=0.5, prune_after=1)


@pytest.fixture(scope='module')
def tool():
    return runpy.run_path(str(TOOL))


@pytest.mark.parametrize('grid, num_global, window, neighbourhood, query', [
    ((6, 8), 1, 2, 'block', (5, 7)), ((12, 12), 2, 4, 'sliding', (0, 5)), ((12, 5), 0, 3, 'block', (10, 4)),
])
def test_query_panel_colours_exactly_the_allowed_keys(grid, num_global, window, neighbourhood, query):
    image = query_keys_image(grid, num_global, window, neighbourhood, query)
    mask = neighbourhood_mask(grid, num_global, window, neighbourhood)[0]
    allowed = mask[num_global + query[0] * grid[1] + query[1], num_global:].reshape(grid)
    assert image.shape == (*grid, 3) and image.dtype == np.uint8
    for row in range(grid[0]):
        for col in range(grid[1]):
            expected = QUERY if (row, col) == query else SEEN if allowed[row, col] else UNSEEN
            assert tuple(image[row, col]) == expected, (row, col)
    assert 0 < allowed.sum() < grid[0] * grid[1]  # a real window, neither empty nor everything


def test_attention_figure_shows_the_mask_and_the_query_panel():
    fig = attention_pattern_figure((6, 8), 1, 2, 'sliding', (2, 3))
    matrix, keys = (np.asarray(ax.images[0].get_array()) for ax in fig.axes[:2])
    mask = neighbourhood_mask((6, 8), 1, 2, 'sliding')[0].numpy()
    assert matrix.shape == (*mask.shape, 3)  # RGB as built, no colour map in between
    np.testing.assert_array_equal((matrix == SEEN).all(-1), mask)
    np.testing.assert_array_equal((matrix == UNSEEN).all(-1), ~mask)
    np.testing.assert_array_equal(keys, query_keys_image((6, 8), 1, 2, 'sliding', (2, 3)))


def test_pruned_image_dims_exactly_the_dropped_patches():
    tile = np.random.default_rng(0).integers(0, 256, (3 * 4, 5 * 4, 3), dtype=np.uint8)
    kept = [0, 6, 7, 14]
    shown = pruned_tokens_image(tile, kept, (3, 5), 4)
    for cell in range(15):
        rows, cols = slice(cell // 5 * 4, cell // 5 * 4 + 4), slice(cell % 5 * 4, cell % 5 * 4 + 4)
        expected = tile[rows, cols] if cell in kept else (tile[rows, cols] * np.float32(DIM) + 20).astype(np.uint8)
        np.testing.assert_array_equal(shown[rows, cols], expected, err_msg=f'cell {cell}')
    with pytest.raises(ValueError, match=r'tile of shape \(12, 20, 3\) does not match grid \(4, 5\) x patch 4'):
        pruned_tokens_image(tile, kept, (4, 5), 4)


def test_kept_tokens_are_the_models_and_the_figure_shows_them():
    tile = synthetic_tile(48, seed=1)
    torch.manual_seed(0)
    model = SparseViT(**mode_kwargs(TINY, 'sparse+prune'))
    kept, grid = kept_patch_tokens(model, tile)
    assert grid == (6, 6) and len(kept) == 36 - math.floor(0.5 * 36) and len(set(kept.tolist())) == len(kept)
    x = (torch.from_numpy(tile).permute(2, 0, 1).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
    x = x / torch.tensor([0.229, 0.224, 0.225])[:, None, None]  # ImageNet statistics, written out independently
    with torch.no_grad():
        np.testing.assert_array_equal(kept, model.forward_tokens(x[None]).kept_index[0].numpy())
    unpruned, _ = kept_patch_tokens(SparseViT(**mode_kwargs(TINY, 'sparse')), tile)
    np.testing.assert_array_equal(unpruned, np.arange(36))
    fig = pruned_tokens_figure(tile, kept, grid, 8, 'tiny')
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), pruned_tokens_image(tile, kept, grid, 8))


def test_synthetic_tile_is_seeded_and_has_a_glass_corner():
    tile = synthetic_tile(64, seed=3)
    np.testing.assert_array_equal(tile, synthetic_tile(64, seed=3))
    assert not np.array_equal(tile, synthetic_tile(64, seed=4))
    assert np.abs(tile[-4:, -4:].astype(int) - LUMEN).mean() < 10  # empty glass, nearly the lumen colour
    assert np.abs(tile[:8, :8].astype(int) - LUMEN).mean() > 20  # tissue


@pytest.mark.parametrize('argv', [
    ['--grid', '12', '--query', '0', '12'],   # column past the grid: used to draw row 1, col 0 silently
    ['--grid', '6', '8', '--query', '6', '0'],
    ['--grid', '12', '--query', '-1', '3'],
    ['--grid', '4', '4', '4'],
], ids=['col-past-end', 'row-past-end', 'negative', 'three-sides'])
def test_bad_grid_or_query_is_a_usage_error(tool, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        tool['parse_args'](argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '--grid' in err or '--query' in err


def test_tiny_run_writes_both_images(tool, tmp_path):
    tool['main'](['--grid', '6', '8', '--window-size', '2', '--query', '5', '7', '--size', '56', '--depth', '2',
                  '--embed-dim', '24', '--num-heads', '2', '--prune-after', '1', '--out-dir', str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['attention_pattern.png', 'pruned_tokens.png']
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and path.stat().st_size > 10_000
