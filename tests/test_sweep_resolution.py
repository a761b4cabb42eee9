"""The resolution sweep end to end on CPU (tiny ViT, demo tiles): tables 1-3 as markdown / CSV / JSON,
the two figure-1 plots, kept-token counts per run, benchmark measurements, and a rerun that reuses
every finished run."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

from mmseg_sparsevit.classification import ExtractionConfig, make_demo_classification, plan_runs
from mmseg_sparsevit.classification import sweep as sweep_lib

SWEEP_TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'sweep_resolution.py'
TINY_ARGS = ['--random-init', '--arch', 'vit-s', '--embed-dim', '32', '--depth', '3', '--num-heads', '2',
             '--patch-size', '8', '--prune-after', '2', '--window-size', '2']


def load_sweep_tool():
    spec = importlib.util.spec_from_file_location('sweep_resolution', SWEEP_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path: Path) -> list:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def kept(size: int, ratio: float) -> int:
    num_patches = (size // 8) ** 2
    return num_patches - math.floor(ratio * num_patches)


def test_plan_runs_shares_configs_between_tables():
    base = ExtractionConfig(size=224, prune_ratio=0.6, window_size=8)
    tables = plan_runs(base, [224, 448], ['dense', 'sparse+prune'], [0.2, 0.6], [4, 8], ablation_size=448)
    assert [c.tag for c in tables['resolution']] == [
        'dense_224', 'sparse+prune_224_p0.6_w8', 'dense_448', 'sparse+prune_448_p0.6_w8']
    assert [c.tag for c in tables['prune_ratio']] == ['sparse+prune_448_p0.2_w8', 'sparse+prune_448_p0.6_w8']
    assert [c.tag for c in tables['window_size']] == ['sparse+prune_448_p0.6_w4', 'sparse+prune_448_p0.6_w8']
    with pytest.raises(ValueError, match='modes must be from'):
        plan_runs(base, [224], ['sparse+pruned'])


@pytest.mark.filterwarnings('ignore:KNN. only 9 train samples')
def test_sweep_writes_tables_and_plots_and_resumes(tmp_path, monkeypatch):
    info = make_demo_classification(str(tmp_path / 'data'), counts=(3, 1, 1), size_range=(20, 36), seed=2)
    work = tmp_path / 'sweep'
    argv = ['--data-root', info['data_root'], '--ann-file', info['ann_file'], *TINY_ARGS, '--num-workers', '0',
            '--device', 'cpu', '--sizes', '32', '48', '--modes', 'dense', 'sparse+prune', '--prune-ratios', '0.6',
            '--window-sizes', '2', '--ablation-size', '48', '--measure-repeats', '1',
            '--c-grid', '0.1', '1', '--work-dir', str(work)]
    tool = load_sweep_tool()
    written = tool.main(argv)

    table1 = read_csv(work / 'table_resolution.csv')
    assert [(r['size'], r['mode'], int(r['num_kept'])) for r in table1] == [
        ('32', 'dense', kept(32, 0)), ('32', 'sparse+prune', kept(32, 0.6)),
        ('48', 'dense', kept(48, 0)), ('48', 'sparse+prune', kept(48, 0.6))]
    # One ablation row each, shared with table 1, keeps the test short (one measurement process per run);
    # plan_runs is tested above and kept counts for other ratios in test_extract_features.py.
    table2 = read_csv(work / 'table_prune_ratio.csv')
    assert [(r['size'], float(r['prune_ratio']), int(r['num_kept'])) for r in table2] == [('48', 0.6, kept(48, 0.6))]
    table3 = read_csv(work / 'table_window_size.csv')
    assert [(r['size'], int(r['window_size'])) for r in table3] == [('48', 2)]
    assert table2[0]['tag'] == table3[0]['tag'] == table1[3]['tag'] and table2[0]['time_s'] == table1[3]['time_s']
    for row in table1 + table2 + table3:
        assert row['status'] == 'ok' and row['measure_status'] == 'ok'
        assert float(row['time_s']) > 0 and float(row['peak_gb']) > 0
        for key in ('linear_probe_accuracy', 'linear_probe_weighted_f1', 'linear_probe_auroc', 'knn_accuracy'):
            assert 0 <= float(row[key]) <= 1
    assert len(list((work / 'runs').glob('*.json'))) == 4  # the shared 48 px sparse+prune run is done once
    summary = json.loads((work / 'sweep.json').read_text())
    assert set(summary['tables']) == {'resolution', 'prune_ratio', 'window_size'} and len(summary['runs']) == 4
    markdown = (work / 'sweep.md').read_text()
    for title in sweep_lib.TABLE_TITLES.values():
        assert title in markdown
    assert '| size | mode ' in markdown and 'memory (GB)' in markdown
    for name in ('accuracy_png', 'memory_png'):
        assert Path(written[name]).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    def no_work(*args, **kwargs):
        raise AssertionError('a finished run was redone')

    monkeypatch.setattr(sweep_lib, 'extract_features', no_work)
    monkeypatch.setattr(tool, 'benchmark_measure', lambda *args: no_work)
    tool.main(argv)  # everything comes from runs/*.json
    assert read_csv(work / 'table_resolution.csv') == table1
