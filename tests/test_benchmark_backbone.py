"""The backbone benchmark on a tiny ViT: each mode measures a positive time and memory, precisions are what
they say, the sweep measures with extraction's network and precision, the --max-memory search finds the
largest fitting side, and the CLI's tables are computed from its measured records.

Only one point runs in a fresh process (the real path, ~5 s); the others call the worker in this process
with its clock and RSS probes replaced by ``FakeProbes``: timings and process RSS on a shared machine are
noise (at 32 px the real forward memory often reads 0.00 GB), so no assertion depends on them.
"""
import importlib.util
import itertools
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmseg_sparsevit.benchmark import MeasureSettings, largest_fitting_side, measure_point, write_reports
from mmseg_sparsevit.benchmark import measure as measure_mod
from mmseg_sparsevit.benchmark import worker as worker_mod
from mmseg_sparsevit.benchmark.measure import GB
from mmseg_sparsevit.benchmark.worker import run_point
from mmseg_sparsevit.classification import ExtractionConfig, build_backbone
from mmseg_sparsevit.classification import sweep as sweep_lib
from mmseg_sparsevit.models import SparseViT
from mmseg_sparsevit.models.modes import ATTENTION_MODES, PRECISIONS, Precision, describe_precision, mode_kwargs

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'benchmark_backbone.py'
TINY = dict(arch='vit-s', embed_dim=32, depth=3, num_heads=2, patch_size=8, window_size=2, prune_ratio=0.5,
            prune_after=2)
TINY_ARGS = ['--arch', 'vit-s', '--embed-dim', '32', '--depth', '3', '--num-heads', '2', '--patch-size', '8',
             '--window-size', '2', '--prune-after', '2', '--repeats', '1', '--device', 'cpu']


def load_tool():
    spec = importlib.util.spec_from_file_location('benchmark_backbone', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def point_spec(mode: str, precision: str = 'fp32', size: int = 32) -> dict:
    return dict(model=mode_kwargs(TINY, mode), size=size, device='cpu', precision=precision, batch_size=1,
                repeats=1, warmup=1, mem_cap_gb=None)


def weights_gb(mode: str) -> float:
    model = SparseViT(**mode_kwargs(TINY, mode))
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / GB


class FakeProbes:
    """Deterministic stand-ins for the worker's clock (``time.perf_counter``) and RSS probes, driven by the
    (real) forwards: the k-th forward of a model on a side-S input takes ``DURATION[k] * S / 64`` s and lifts
    the RSS from 1 GB to a peak of 1 + ((S / 32)^2 - 1) / 4 GB, i.e. nothing at 32 px (what made the real
    forward memory read 0.00 GB) and 0.75 GB at 64 px. Peaks start afresh with each model, as in a fresh process.
    """
    DURATION = (8, 1, 4, 2)  # warm-up, then timed forwards: median 2 (mean 7/3), warm-up excluded
    BASE = GB

    def __init__(self) -> None:
        self.now, self.model, self.calls, self.peak = 0.0, None, 0, self.BASE

    def after_forward(self, model: SparseViT, side: int) -> None:
        if model is not self.model:
            self.model, self.calls, self.peak = model, 0, self.BASE
        self.now += self.DURATION[self.calls] * side / 64
        self.calls += 1
        self.peak = max(self.peak, self.BASE + ((side // 32) ** 2 - 1) * GB // 4)

    @staticmethod
    def expected(side: int, repeats: int) -> dict:
        forward = ((side // 32) ** 2 - 1) / 4
        timed = sorted(FakeProbes.DURATION[1:1 + repeats])
        return dict(time_s=timed[len(timed) // 2] * side / 64, peak_gb=1 + forward, forward_gb=forward)


@pytest.fixture
def fake_probes(monkeypatch) -> FakeProbes:
    probes = FakeProbes()
    real_forward = SparseViT.forward_features

    def forward_features(self, x, *args, **kwargs):
        out = real_forward(self, x, *args, **kwargs)
        probes.after_forward(self, x.shape[-1])
        return out

    monkeypatch.setattr(SparseViT, 'forward_features', forward_features)
    monkeypatch.setattr(worker_mod, 'time', SimpleNamespace(perf_counter=lambda: probes.now, sleep=time.sleep))
    monkeypatch.setattr(worker_mod, 'current_rss_bytes', lambda: probes.BASE)
    monkeypatch.setattr(worker_mod, 'max_rss_bytes', lambda: probes.peak)
    return probes


@pytest.mark.parametrize('mode', list(ATTENTION_MODES))
def test_each_mode_reports_what_it_measured(mode, fake_probes):
    """Each mode runs its forwards; time is the median of the timed ones (warm-up excluded), peak the largest
    RSS, forward memory the peak minus the RSS before the forwards, weights the model's parameter bytes."""
    for side in (32, 64):
        record = run_point(dict(point_spec(mode, size=side), repeats=3))
        assert record == dict(status='ok', weights_gb=weights_gb(mode), **FakeProbes.expected(side, 3))


def test_fresh_process_point_reports_its_precision():
    """The real path, one fresh process; its time and RSS are the machine's, so only what they cannot break is
    checked: the record's fields, exact weights, and peak >= forward >= 0 (true by construction)."""
    settings = MeasureSettings(precision='amp-bf16', repeats=1, warmup=1)
    record = measure_point(mode_kwargs(TINY, 'sparse+prune'), 32, settings, label='sparse+prune')
    assert record['status'] == 'ok', record
    assert record['precision'] == 'amp-bf16' and record['size'] == 32 and record['tokens'] == 16
    assert record['weights_gb'] == weights_gb('sparse+prune')  # amp keeps fp32 weights
    assert record['peak_gb'] >= record['forward_gb'] >= 0 and record['time_s'] > 0


def test_precision_sets_weight_dtype():
    """Autocast keeps fp32 weights (as extraction does); casting the model halves them."""
    weights = {p: run_point(point_spec('sparse', p))['weights_gb'] for p in ('fp32', 'amp-bf16', 'bf16')}
    assert weights['amp-bf16'] == weights['fp32'] == pytest.approx(2 * weights['bf16'])
    assert describe_precision('amp-bf16') == 'fp32 weights, bf16 autocast'
    assert describe_precision('bf16') == 'bf16 weights, no autocast'


@pytest.mark.parametrize('precision, autocast', [('auto', None), ('fp32', None), ('amp-bf16', torch.bfloat16),
                                                 ('amp-fp16', torch.float16)])
def test_sweep_measures_extraction_network_at_extraction_precision(precision, autocast, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_lib, 'measure_point', lambda *args: calls.append(args) or dict(status='ok'))
    cfg = ExtractionConfig(size=48, mode='sparse+prune', prune_ratio=0.5, prune_after=2, window_size=2, arch='vit-s',
                           arch_overrides=dict(embed_dim=32, depth=3, num_heads=2, patch_size=8, mlp_ratio=2.0))
    sweep_lib.benchmark_measure('cpu', precision, batch_size=2, repeats=1)(cfg)
    (kwargs, size, settings, label), = calls
    assert size == 48 and label == cfg.tag and settings.batch_size == 2 and settings.device == 'cpu'
    assert PRECISIONS[settings.precision] == Precision(torch.float32, autocast)  # 'auto' is fp32 on CPU
    assert kwargs['mlp_ratio'] == 2.0 and kwargs['token_pruning'] and kwargs['pretrained'] is None
    measured, extracted = SparseViT(**kwargs), build_backbone(cfg)
    assert {k: v.shape for k, v in measured.state_dict().items()} == {
        k: v.shape for k, v in extracted.state_dict().items()}
    assert (measured.token_pruning, measured.prune_after, measured.attn_mode) == (True, 2, 'sparse')


@pytest.mark.parametrize('kwargs, size, error, match', [
    (dict(TINY, window=2), 32, TypeError, "unexpected keyword argument 'window'"),
    (TINY, 36, ValueError, 'size=36 must be a positive multiple of the patch size 8'),
])
def test_measure_point_rejects_bad_input_before_starting(kwargs, size, error, match):
    with pytest.raises(error, match=match):
        measure_point(kwargs, size, MeasureSettings())


def test_settings_reject_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of .* got 'float32'"):
        MeasureSettings(precision='float32')


def quadratic_memory(a: float):
    """Fake measurement: memory a * side^2 GB, so the answer is known without running a model."""
    return lambda side: dict(status='ok', peak_gb=a * side ** 2)


@pytest.mark.parametrize('a, limit, patch, start, max_side', [
    (1e-6, 0.01, 8, 32, 4096), (1e-6, 0.02, 14, 28, 4096), (3e-7, 0.5, 16, 16, 8192), (1e-6, 0.0011, 8, 32, 4096),
])
def test_search_finds_largest_side_under_the_limit(a, limit, patch, start, max_side):
    found = largest_fitting_side(quadratic_memory(a), patch, start, max_side, limit)
    expected = max(s for s in range(patch, max_side + 1, patch) if a * s ** 2 <= limit)
    assert found['largest_side'] == expected and not found['hit_search_max_size']
    tried = {r['peak_gb'] for r in found['records']}
    assert a * expected ** 2 in tried and a * (expected + patch) ** 2 in tried  # both sides of the boundary
    assert len(found['records']) <= 2 * math.log2(max_side / patch) + 2


@pytest.mark.parametrize('limit, largest, hit', [(100.0, 1000, True), (1e-9, None, False)])
def test_search_reports_cap_and_no_fit(limit, largest, hit):
    found = largest_fitting_side(quadratic_memory(1e-6), 8, 32, 1007, limit)
    assert (found['largest_side'], found['hit_search_max_size']) == (largest, hit)


def test_search_counts_over_status_as_no_fit():
    def measure(side):
        return dict(status='over') if side > 40 else dict(status='ok', peak_gb=0.0)
    assert largest_fitting_side(measure, 8, 8, 512, 1.0)['largest_side'] == 40


def table(md: str, title: str) -> dict:
    """``{row label: {column: cell}}`` of the first markdown table after ``title``."""
    lines = md.split(title, 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('|'))
    block = list(itertools.takewhile(lambda ln: ln.startswith('|'), lines[start:]))
    columns = [c.strip() for c in block[0].strip('|').split('|')]
    rows = [[c.strip() for c in ln.strip('|').split('|')] for ln in block[2:]]
    return {row[0]: dict(zip(columns[1:], row[1:])) for row in rows}


def assert_ratio_cell(cell: str, num: float, den: float) -> None:
    """A 2-decimal ratio cell equals num / den, or is 'n/a' where den is 0 (no ratio)."""
    if den == 0:
        assert cell == 'n/a'
    else:
        assert float(cell.rstrip('x')) == pytest.approx(num / den, abs=6e-3)


def test_cli_tables_come_from_measured_records(tmp_path, monkeypatch, fake_probes):
    """Every table cell against the records (whatever their values); the probes make the 32 px forward memory 0,
    the case where the growth table used to vanish: it is written, with n/a for the undefined ratios."""
    monkeypatch.setattr(measure_mod, '_run_worker', lambda spec, timeout_s: run_point(spec))  # in-process
    out = tmp_path / 'bench'
    load_tool().main([*TINY_ARGS, '--sizes', '32', '64', '--precision', 'amp-bf16', '--out-dir', str(out)])
    data = json.loads((out / 'benchmark.json').read_text())
    md = (out / 'benchmark.md').read_text()
    assert (out / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert data['precision'] == 'amp-bf16' and md.startswith('Precision: **amp-bf16** (fp32 weights, bf16 autocast)')
    rec = {(r['mode'], r['size']): r for r in data['records']}
    assert set(rec) == {(m, s) for m in ATTENTION_MODES for s in (32, 64)}
    assert all(r['status'] == 'ok' and r['precision'] == 'amp-bf16' for r in rec.values())

    main = table(md, 'Precision:')
    for mode in ATTENTION_MODES:
        assert float(main['64'][f'{mode} time s']) == pytest.approx(rec[mode, 64]['time_s'], abs=6e-4)
        assert float(main['32'][f'{mode} peak GB']) == pytest.approx(rec[mode, 32]['peak_gb'], abs=6e-3)
    for key, title in (('peak_gb', 'peak memory growth'), ('forward_gb', 'forward memory growth')):
        growth = table(md, title)
        assert set(growth) == set(ATTENTION_MODES)
        for mode in ATTENTION_MODES:
            assert_ratio_cell(growth[mode]['32->64'], rec[mode, 64][key], rec[mode, 32][key])
    assert {rec[m, 32]['forward_gb'] for m in ATTENTION_MODES} == {0.0}  # the probes' zero case happened
    assert {cells['32->64'] for cells in table(md, 'forward memory growth').values()} == {'n/a'}
    ratios = table(md, 'ratio to dense (time / forward memory):')
    for mode in ATTENTION_MODES:
        for size in (32, 64):
            time_cell, memory_cell = ratios[str(size)][mode].split(' / ')
            assert_ratio_cell(time_cell, rec[mode, size]['time_s'], rec['dense', size]['time_s'])
            assert_ratio_cell(memory_cell, rec[mode, size]['forward_gb'], rec['dense', size]['forward_gb'])


def test_cli_max_memory_search(tmp_path, monkeypatch):
    """Fake worker with memory 1e-6 * side^2 (x4 for vanilla) GB: the limit 0.01 GB fits 96 px (48 vanilla)."""
    def fake_worker(spec, timeout_s):
        peak = 1e-6 * spec['size'] ** 2 * (4 if spec['model'].get('fused_attn') is False else 1)
        return dict(status='ok' if peak <= spec['mem_cap_gb'] else 'over', time_s=1.0, peak_gb=peak,
                    forward_gb=peak / 2, weights_gb=0.001)

    monkeypatch.setattr(measure_mod, '_run_worker', fake_worker)
    out = tmp_path / 'search'
    result = load_tool().main([*TINY_ARGS, '--modes', 'vanilla', 'dense', '--sizes', '32', '--max-memory', '0.01',
                               '--search-max-size', '512', '--out-dir', str(out)])
    data = json.loads((out / 'benchmark.json').read_text())
    assert data['largest_side_that_fits'] == result['largest_side_that_fits'] == dict(
        vanilla=dict(largest_side=48, hit_search_max_size=False),
        dense=dict(largest_side=96, hit_search_max_size=False))
    assert {(r['mode'], r['size']) for r in data['records']} >= {('vanilla', 48), ('vanilla', 56), ('dense', 104)}
    assert table((out / 'benchmark.md').read_text(), 'Precision:')['104']['tokens'] == '169'


def test_reports_without_a_finished_point(tmp_path):
    """Every point over the cap: no curve to draw, yet all three files are written and say why."""
    records = [dict(mode='sparse', size=64, tokens=64, precision='fp32', status='over')]
    paths = write_reports(str(tmp_path), records, ['sparse'], [64], dict(precision='fp32', device='cpu', batch_size=1))
    assert json.loads(paths['json'].read_text())['records'] == records
    assert table(paths['md'].read_text(), 'Precision:') == {
        '64': {'tokens': '64', 'sparse time s': 'over', 'sparse peak GB': 'over', 'sparse fwd GB': 'over'}}
    assert paths['png'].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_growth_tables_are_written_for_zero_and_missing_measurements(tmp_path):
    """Hand-made records: a ratio over a 0 GB measurement is n/a, a pair with a point over the cap is '-', and the
    tables are there either way (they used to be left out when no ratio was defined)."""
    def ok(mode, size, peak, forward):
        return dict(mode=mode, size=size, tokens=(size // 8) ** 2, precision='fp32', status='ok', time_s=1.0,
                    peak_gb=peak, forward_gb=forward, weights_gb=0.1)

    records = [ok('dense', 32, 1.0, 0.0), ok('dense', 64, 1.5, 0.5), ok('sparse', 32, 1.0, 0.0),
               dict(mode='sparse', size=64, tokens=64, precision='fp32', status='over')]
    paths = write_reports(str(tmp_path), records, ['dense', 'sparse'], [32, 64],
                          dict(precision='fp32', device='cpu', batch_size=1))
    md = paths['md'].read_text()
    assert table(md, 'peak memory growth') == {'dense': {'32->64': '1.50x'}, 'sparse': {'32->64': '-'}}
    assert table(md, 'forward memory growth') == {'dense': {'32->64': 'n/a'}, 'sparse': {'32->64': '-'}}
    assert table(md, 'ratio to dense') == {'32': {'dense': '1.00 / n/a', 'sparse': '1.00 / n/a'},
                                           '64': {'dense': '1.00 / 1.00', 'sparse': '-'}}
