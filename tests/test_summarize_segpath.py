"""SegPath result files (save/load, errors naming the file) and the summary
table across antigens (per-tag rows and means over cell types)."""
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from mmseg_sparsevit.evaluation import (RESULTS_FILENAME, find_result_files,
                                        load_results, rows_to_markdown,
                                        save_results, summarize_results,
                                        summarize_segpath)

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'summarize_segpath.py'

# (tag, antigen, cell type, MPA, IoU, Dice) in percent
RUNS = [
    ('dense', 'panCK', 'epithelium', 80.0, 60.0, 75.0),
    ('dense', 'aSMA', 'smooth muscle', 70.0, 50.0, 60.0),
    ('dense', 'CD3CD20', 'lymphocyte', 90.0, 40.0, 57.0),
    ('sparse', 'aSMA', 'smooth muscle', 60.0, 45.0, 55.0),
]


def write_run(root, tag, antigen, cell_type, mpa, iou, dice, **extra):
    return save_results(
        root / f'{antigen}_{tag}' / RESULTS_FILENAME,
        config=f'configs/{antigen}.py',
        checkpoint=f'work_dirs/{antigen}/iter_100.pth',
        antigen=antigen,
        cell_type=cell_type,
        tag=tag,
        metrics={'MPA': mpa, 'IoU': iou, 'Dice': dice, 'aAcc': 95.0, **extra})


@pytest.fixture
def run_dir(tmp_path):
    for run in RUNS:
        write_run(tmp_path, *run)
    return tmp_path


def test_save_load_round_trip(tmp_path):
    path = save_results(
        tmp_path / 'new' / RESULTS_FILENAME,
        config='c.py',
        checkpoint='w.pth',
        antigen='ERG',
        cell_type='endothelium',
        metrics={'MPA': np.float32(62.5), 'CPA.background': float('nan')})
    raw = json.loads(path.read_text())
    assert raw['metrics']['CPA.background'] is None  # strict JSON, no NaN
    result = load_results(path)
    assert (result.antigen, result.cell_type, result.tag) == (
        'ERG', 'endothelium', '')
    assert result.metrics['MPA'] == 62.5
    assert math.isnan(result.metrics['CPA.background'])
    assert result.path == str(path)


GOOD = dict(config='c.py', checkpoint='w.pth', antigen='ERG',
            cell_type='endothelium', metrics={'MPA': 1.0})


@pytest.mark.parametrize('content, match', [
    ('{"config": ', 'not valid JSON'),
    ('[1, 2]', 'expected a JSON object'),
    (json.dumps({k: v for k, v in GOOD.items() if k != 'metrics'}),
     'missing key "metrics"'),
    (json.dumps({**GOOD, 'tags': 'x'}), r"unknown keys \['tags'\]"),
    (json.dumps({**GOOD, 'antigen': 3}), '"antigen" must be a string'),
    (json.dumps({**GOOD, 'metrics': [1.0]}), '"metrics" must be an object'),
    (json.dumps({**GOOD, 'metrics': {'MPA': '63.2'}}),
     'metric "MPA" must be a number'),
])
def test_malformed_file_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / 'broken' / RESULTS_FILENAME
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_results(path)
    assert str(path) in str(info.value)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.json'):
        load_results(tmp_path / 'nowhere.json')


def test_summary_rows_and_means(run_dir):
    rows = summarize_segpath([run_dir])
    assert [(r['tag'], r['antigen']) for r in rows] == [
        ('dense', 'aSMA'), ('dense', 'CD3CD20'), ('dense', 'panCK'),
        ('dense', 'mean'), ('sparse', 'aSMA'), ('sparse', 'mean')
    ]
    dense_mean, sparse_mean = rows[3], rows[5]
    assert dense_mean['cell_type'] == '3 cell types'
    # (70 + 90 + 80) / 3, (50 + 40 + 60) / 3, (60 + 57 + 75) / 3
    assert (dense_mean['MPA'], dense_mean['IoU'],
            dense_mean['Dice']) == pytest.approx((80.0, 50.0, 64.0))
    assert (sparse_mean['MPA'], sparse_mean['IoU'],
            sparse_mean['Dice']) == pytest.approx((60.0, 45.0, 55.0))
    assert 'aAcc' not in dense_mean  # only the requested metrics


def test_markdown_table(run_dir):
    table = rows_to_markdown(summarize_segpath([run_dir]))
    lines = table.splitlines()
    assert lines[0].split('|')[1:-1] == [
        ' tag    ', ' antigen ', ' cell_type     ', ' MPA (%) ', ' IoU (%) ',
        ' Dice (%) '
    ]
    assert '| dense  | mean    | 3 cell types  | 80.00   | 50.00   | 64.00' \
        in table
    assert len(lines) == 2 + 6


def test_markdown_drops_empty_tag_column(tmp_path):
    write_run(tmp_path, '', 'ERG', 'endothelium', 1.0, 2.0, 3.0)
    header = rows_to_markdown(summarize_segpath([tmp_path])).splitlines()[0]
    assert 'tag' not in header and header.startswith('| antigen')


def test_duplicate_antigen_and_tag_names_both_files(run_dir, tmp_path):
    other = write_run(tmp_path / 'again', 'dense', 'aSMA', 'smooth muscle',
                      1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match='two results for antigen "aSMA"') \
            as info:
        summarize_segpath([run_dir])
    assert str(other) in str(info.value)
    assert str(run_dir / 'aSMA_dense' / RESULTS_FILENAME) in str(info.value)


def test_missing_metric_names_the_file(run_dir):
    results = [load_results(p) for p in find_result_files([run_dir])]
    with pytest.raises(KeyError, match=r"\['mDice'\] missing") as info:
        summarize_results(results, metrics=('MPA', 'mDice'))
    assert results[0].path in str(info.value)


def test_find_result_files_by_glob_dir_and_file(run_dir):
    by_glob = find_result_files([str(run_dir / '*_dense' / RESULTS_FILENAME)])
    assert len(by_glob) == 3
    one = run_dir / 'aSMA_sparse' / RESULTS_FILENAME
    # explicit file plus a directory holding it: listed once
    assert len(find_result_files([one, run_dir])) == 4


@pytest.mark.parametrize('pattern', ['missing_dir', 'nothing_*/x.json'])
def test_find_result_files_errors_name_the_input(tmp_path, pattern):
    with pytest.raises(FileNotFoundError, match=pattern.replace('*', r'\*')):
        find_result_files([str(tmp_path / pattern)])


def test_cli_writes_csv_and_markdown(run_dir, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location('summarize_segpath', TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out_csv, out_md = tmp_path / 'out' / 's.csv', tmp_path / 'out' / 's.md'
    monkeypatch.setattr(sys, 'argv', [
        str(TOOL),
        str(run_dir / '**' / RESULTS_FILENAME), '--csv',
        str(out_csv), '--md',
        str(out_md), '--metrics', 'IoU', 'aAcc'
    ])
    tool.main()
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ['tag', 'antigen', 'cell_type', 'IoU', 'aAcc']
    assert rows[3]['antigen'] == 'mean'
    assert float(rows[3]['IoU']) == pytest.approx(50.0)
    assert float(rows[3]['aAcc']) == pytest.approx(95.0)
    assert out_md.read_text().strip() == capsys.readouterr().out.strip()
