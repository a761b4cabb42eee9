"""tools/visualize_sparsity.py: argument checks and the two PNGs of a tiny random-weight run."""
import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'visualize_sparsity.py'


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('visualize_sparsity', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('argv', [
    ['--grid', '12', '--query', '0', '12'],   # column past the grid: used to draw row 1, col 0 silently
    ['--grid', '6', '8', '--query', '6', '0'],
    ['--grid', '12', '--query', '-1', '3'],
    ['--grid', '4', '4', '4'],
], ids=['col-past-end', 'row-past-end', 'negative', 'three-sides'])
def test_bad_grid_or_query_is_a_usage_error(tool, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '--grid' in err or '--query' in err


def test_tiny_run_writes_both_images(tool, tmp_path):
    tool.main(['--grid', '6', '8', '--window-size', '2', '--query', '5', '7', '--size', '56', '--depth', '2',
               '--embed-dim', '24', '--num-heads', '2', '--prune-after', '1', '--out-dir', str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['attention_pattern.png', 'pruned_tokens.png']
