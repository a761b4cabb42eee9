"""Segmentor benchmark: the tool's records (every part, one fresh process per point), the markdown from the
records, and the breakdown by part as deterministic live-tensor byte counts (never wall time or RSS)."""
from pathlib import Path

import pytest
import torch

from mmseg_sparsevit.engine.segmentor_benchmark import (OWNERS, PARTS, LiveTensorBytes, SegmentorPoint, Setting,
                                                        run_point, segmentor_markdown)

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / 'configs/demo/mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py')


def test_live_tensor_bytes_counts_storages_once_until_freed():
    counter = LiveTensorBytes(lambda: 'vit')
    with counter:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # same storage: not counted again
        a.add_(1)  # in place: same storage
        b = a * 2
        assert counter.total == counter.live['vit'] == 8000
        del b
        assert counter.total == 4000
    assert counter.peak == 8000 and counter.at_peak['vit'] == 8000
    assert view.untyped_storage().nbytes() == 4000


def test_settings_parse_and_reject_unknown_levers():
    setting = Setting.parse('sparse:adapter-cp,bf16')
    assert (setting.mode, setting.levers, setting.amp) == ('sparse', ('adapter-cp', 'bf16'), 'bf16')
    assert setting.cfg_options() == {'model.backbone.with_cp': True}
    with pytest.raises(ValueError, match='unknown lever'):
        Setting.parse('sparse:cp')
    with pytest.raises(ValueError, match='attention mode'):
        Setting.parse('sprase')
    with pytest.raises(ValueError, match='one of'):
        Setting.parse('dense:bf16,fp16')


def breakdown(depth: int, setting: str = 'sparse') -> dict:
    point = SegmentorPoint(DEMO, setting, 112, 'train', {'model.backbone.vit_cfg.depth': depth}, warmup=0, repeats=1,
                           threads=2)
    return run_point(point)


def test_breakdown_is_exact_and_the_vit_part_grows_with_depth():
    shallow, deep = breakdown(4), breakdown(8)
    for record in (shallow, deep):
        at_end, at_peak = record['parts_at_forward_end_gb'], record['parts_at_peak_gb']
        assert set(at_end) == set(at_peak) == set(OWNERS)
        assert all(v >= 0 for v in (*at_end.values(), *at_peak.values()))
        # Every part of the demo segmentor leaves tensors for the backward pass; nothing is counted twice.
        assert all(at_end[part] > 0 for part in PARTS), at_end
        assert sum(at_end.values()) == pytest.approx(record['tensor_forward_end_gb'], rel=1e-9)
        assert sum(at_peak.values()) == pytest.approx(record['tensor_peak_gb'], rel=1e-9)
        assert record['tensor_peak_gb'] >= record['tensor_forward_end_gb']
    assert deep['parts_at_forward_end_gb']['vit'] > 1.5 * shallow['parts_at_forward_end_gb']['vit']
    assert deep['parts_at_forward_end_gb']['pixel_decoder'] == shallow['parts_at_forward_end_gb']['pixel_decoder']


def test_adapter_checkpointing_frees_the_adapter_activations():
    plain, cp = breakdown(4), breakdown(4, 'sparse:adapter-cp')
    for part in ('vit', 'injectors'):  # only the interactions' outputs stay; the rest is recomputed
        assert cp['parts_at_forward_end_gb'][part] < plain['parts_at_forward_end_gb'][part]
    assert cp['parts_at_forward_end_gb']['pixel_decoder'] == plain['parts_at_forward_end_gb']['pixel_decoder']


def test_tool_runs_each_point_in_a_fresh_process_and_writes_reports(tmp_path):
    import os
    import sys
    sys.path.insert(0, str(ROOT / 'tools'))
    from benchmark_segmentor import main
    out = main([DEMO, '--sizes', '112', '--settings', 'dense', 'sparse', '--warmup', '0', '--repeats', '1',
                '--threads', '2', '--out-dir', str(tmp_path)])
    records = out['records']
    assert [(r['setting'], r['status']) for r in records] == [('dense', 'ok'), ('sparse', 'ok')]
    pids = {r['pid'] for r in records}
    assert len(pids) == 2 and os.getpid() not in pids
    for r in records:
        assert set(r['parts_at_peak_gb']) == set(r['parts_at_forward_end_gb']) == set(OWNERS)
    md = (tmp_path / 'segmentor.md').read_text()
    assert md == segmentor_markdown(records, {k: v for k, v in out.items() if k not in ('records', 'paths')})
    for r in records:
        assert f"| train | 112 | {r['setting']}" in md.replace('  ', ' ').replace('  ', ' ')
        assert f"{r['time_s']:.2f}" in md
    assert (tmp_path / 'segmentor.png').stat().st_size > 0 and (tmp_path / 'segmentor.json').is_file()
