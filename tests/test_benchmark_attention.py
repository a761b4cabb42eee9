"""The op benchmark (``mmseg_sparsevit.benchmark.attention``) and its CLI: in-process points (forward and
forward + backward), the seeded pruning subset, the table's ratios, failed points, and one end-to-end CLI run
with one fresh process per point."""
import itertools
import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmseg_sparsevit.benchmark import attention as bench
from mmseg_sparsevit.benchmark.attention import (AttentionPoint, arch_point, attention_table, kept_patch_index,
                                                 measure_attention, measure_attention_in_subprocess, vanilla_attention)

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'benchmark_attention.py'
TINY = dict(grid=(4, 5), num_global=1, heads=2, head_dim=8, window_size=2, warmup=1, repeats=2)


def table_rows(md: str) -> list:
    """The rows of the first markdown table in ``md`` as ``{column: cell}`` dicts."""
    block = list(itertools.takewhile(lambda ln: ln.startswith('|'),
                                     itertools.dropwhile(lambda ln: not ln.startswith('|'), md.splitlines())))
    columns = [c.strip() for c in block[0].strip('|').split('|')]
    return [dict(zip(columns, (c.strip() for c in ln.strip('|').split('|')))) for ln in block[2:]]


def test_vanilla_attention_is_sdpa():
    q, k, v = torch.randn(3, 2, 2, 7, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(vanilla_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_kept_patch_index_is_seeded_sorted_and_shared_by_the_batch():
    index = kept_patch_index((4, 5), 0.4, 2, torch.device('cpu'))
    assert index.shape == (2, 8) and torch.equal(index[0], index[1]) and (index.diff() > 0).all()
    assert torch.equal(index, kept_patch_index((4, 5), 0.4, 2, torch.device('cpu')))
    assert kept_patch_index((4, 5), 0.01, 1, torch.device('cpu')).shape == (1, 1)  # at least one cell


@pytest.mark.parametrize('keep, tokens', [(1.0, 21), (0.4, 9)])
def test_point_measures_the_tokens_it_says(keep, tokens):
    result = measure_attention('gather', AttentionPoint(keep=keep, **TINY))
    assert result['tokens'] == tokens and result['keep'] == keep and not result['backward']
    assert len(result['times_s']) == 2 and result['median_s'] > 0 and result['compile_s'] is None


@pytest.mark.parametrize('method', ['dense', 'gather'])
def test_backward_point_differentiates_q_k_v_each_call(method, monkeypatch):
    calls = []
    grad = torch.autograd.grad

    def counting_grad(outputs, inputs, grad_outputs):
        calls.append([t.shape for t in inputs])
        return grad(outputs, inputs, grad_outputs)

    monkeypatch.setattr(bench.torch.autograd, 'grad', counting_grad)
    result = measure_attention(method, AttentionPoint(backward=True, keep=0.4, **TINY))
    assert result['backward'] and result['tokens'] == 9 and result['median_s'] > 0
    assert calls == [[(1, 2, 9, 8)] * 3] * 3  # warm-up + 2 repeats, gradients of q, k and v


def test_table_ratios_come_from_the_dense_row_of_the_same_point():
    result = measure_attention('gather', AttentionPoint(**TINY))
    rows = table_rows(attention_table([dict(result, method='dense', median_s=2.0, median_cpu_s=3.0),
                                       dict(result, median_s=0.5, median_cpu_s=1.0),
                                       dict(result, keep=0.5, median_s=0.5, median_cpu_s=1.0)]))
    gather = rows[1]
    assert (gather['grid'], gather['keep'], gather['tokens (kept)'], gather['method']) == ('4x5', '1', '21', 'gather')
    assert gather['median time (s)'] == '0.500' and gather['speed-up vs dense SDPA on the same tokens'] == '4.0x'
    assert gather['CPU-time speed-up'] == '3.0x' and rows[0]['speed-up vs dense SDPA on the same tokens'] == '1.0x'
    assert rows[2]['speed-up vs dense SDPA on the same tokens'] == 'n/a'  # no dense row at keep 0.5


def test_failed_points_become_error_rows():
    timed_out = measure_attention_in_subprocess('gather', AttentionPoint(**TINY), timeout_s=0.01)
    assert timed_out == dict(method='gather', grid=[4, 5], keep=1.0, backward=False, heads=2, head_dim=8, num_global=1,
                             error='timed out after 0 s')
    crashed = measure_attention_in_subprocess('gather', AttentionPoint(**dict(TINY, window_size=0)), timeout_s=120)
    assert crashed['error'] == 'exit 1: ValueError: window_size must be an int >= 1, got 0'  # the worker's last line
    rows = table_rows(attention_table([timed_out, crashed]))
    assert [(r['method'], r['median time (s)']) for r in rows] == [('gather', timed_out['error']),
                                                                   ('gather', crashed['error'])]


def test_point_rejects_bad_settings():
    with pytest.raises(ValueError, match='keep must be a fraction in'):
        AttentionPoint(grid=(4, 4), keep=0)
    with pytest.raises(ValueError, match="method must be one of .* got 'sdpa'"):
        measure_attention('sdpa', AttentionPoint(**TINY))


@pytest.fixture(scope='module')
def tool():
    return runpy.run_path(str(TOOL))


def test_cli_runs_each_point_in_a_fresh_process(tool, tmp_path, capsys):
    """keep=0.4 keeps int(0.4 * 20) = 8 of a 4 x 5 grid (+ 1 global token); --backward is recorded and stated."""
    out = tmp_path / 'bench.json'
    tool['main'](['--grids', '4x5', '--methods', 'dense', 'gather', '--keep', '0.4', '--num-global', '1', '--heads',
                  '2', '--head-dim', '8', '--window-size', '2', '--warmup', '1', '--repeats', '2', '--backward',
                  '--device', 'cpu', '--timeout', '120', '--json', str(out)])
    data = json.loads(out.read_text())
    results = data['results']
    assert [(r['keep'], r['method'], r.get('tokens'), r['backward']) for r in results] == [
        (0.4, 'dense', 9, True), (0.4, 'gather', 9, True)]
    for r in results:
        assert r['median_s'] > 0 and r['median_cpu_s'] > 0 and r['process_peak_rss_bytes'] > 0, r
    assert data['settings']['backward'] and data['environment']['machine']['torch'] == torch.__version__
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert [(r['grid'], r['keep'], r['tokens (kept)'], r['method']) for r in rows] == [
        ('4x5', '0.4', '9', 'dense'), ('4x5', '0.4', '9', 'gather')]
    assert 'forward + backward' in printed and 'among the kept tokens only' in printed


@pytest.mark.parametrize('argv', [['--keep', '0'], ['--grids', '4by5'], ['--methods', 'dense_sdpa']])
def test_cli_usage_errors(tool, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        tool['parse_args'](argv)
    assert exc.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.parametrize('arch, image_size, expected', [
    ('uni2-h', 1344, dict(grid=(96, 96), heads=24, head_dim=64, num_global=9)),
    ('virchow2', 1344, dict(grid=(96, 96), heads=16, head_dim=80, num_global=5)),
    ('gigapath', 1344, dict(grid=(84, 84), heads=24, head_dim=64, num_global=1)),
    ('phikon', 230, dict(grid=(14, 14), heads=12, head_dim=64, num_global=1)),  # 230 // 16: whole patches only
])
def test_arch_point_takes_the_presets_shapes(arch, image_size, expected):
    point = arch_point(arch, image_size, repeats=3)
    assert {key: getattr(point, key) for key in expected} == expected and point.repeats == 3
    with pytest.raises(ValueError, match="image_size=8 is smaller than 'uni'"):
        arch_point('uni', 8)


def test_table_compares_each_arch_with_its_own_dense_row():
    """Two shapes on one grid (as two presets of one patch size): each sparse row's ratio is against the dense
    row of the same heads x head dim + global tokens, never the other model's."""
    small = measure_attention('gather', AttentionPoint(**TINY))
    wide = dict(small, heads=4, num_global=2, arch='wide')
    small = dict(small, arch='small')
    rows = table_rows(attention_table([dict(small, method='dense', median_s=2.0, median_cpu_s=2.0),
                                       dict(wide, method='dense', median_s=8.0, median_cpu_s=8.0),
                                       dict(small, median_s=1.0, median_cpu_s=1.0),
                                       dict(wide, median_s=1.0, median_cpu_s=1.0)]))
    assert [(r['arch'], r['heads x dim + global'], r['speed-up vs dense SDPA on the same tokens']) for r in rows] == [
        ('small', '2 x 8 + 1', '1.0x'), ('wide', '4 x 8 + 2', '1.0x'), ('small', '2 x 8 + 1', '2.0x'),
        ('wide', '4 x 8 + 2', '8.0x')]


def test_cli_measures_presets_by_name(tool, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    tool['main'](['--archs', 'phikon', 'hibou-b', '--image-size', '64', '--methods', 'dense', 'gather',
                  '--window-size', '2', '--warmup', '1', '--repeats', '1', '--device', 'cpu', '--timeout', '120',
                  '--json', str(out)])
    results = json.loads(out.read_text())['results']
    assert [(r['arch'], r['grid'], r['heads'], r['head_dim'], r['num_global'], r['tokens']) for r in results] == [
        ('phikon', [4, 4], 12, 64, 1, 17), ('phikon', [4, 4], 12, 64, 1, 17),
        ('hibou-b', [4, 4], 12, 64, 5, 21), ('hibou-b', [4, 4], 12, 64, 5, 21)]
    rows = table_rows(capsys.readouterr().out)
    assert [(r['arch'], r['method']) for r in rows] == [('phikon', 'dense'), ('phikon', 'gather'),
                                                        ('hibou-b', 'dense'), ('hibou-b', 'gather')]
    assert all(r['speed-up vs dense SDPA on the same tokens'].endswith('x') for r in rows)
