"""Resolution / pruning-ratio / window-size sweeps: extraction + probes + cost per run, paper-style tables.

Table 1 crosses input sizes with attention modes; table 2 varies the pruning ratio and table 3 the
window size at one ablation size. Runs shared between tables are done once. Each finished run is saved
to ``runs/<tag>.json`` and reused by a later sweep with the same settings, and extraction itself
resumes, so an interrupted sweep continues where it stopped. Time and memory come from an injected
``measure`` callable: ``benchmark_measure``, the backbone benchmark's fresh-process measurement of each run's
network at extraction's precision.
"""
import csv
import dataclasses
import itertools
import json
import math
import os
import os.path as osp
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from mmengine.logging import print_log

from mmseg_sparsevit.benchmark import MeasureSettings, measure_point
from mmseg_sparsevit.models.modes import SPARSE_MODES, is_pruned, is_sparse
from mmseg_sparsevit.utils.markdown import markdown_table

from .dataset import Sample
from .extraction import MODES, ExtractionConfig, extract_features, resolve_extraction_precision
from .feature_store import load_features
from .probing import METRIC_NAMES, evaluate_features

Measure = Callable[[ExtractionConfig], Dict[str, Any]]
TABLES = ('resolution', 'prune_ratio', 'window_size')
TABLE_TITLES = dict(resolution='Table 1: input size x attention mode', prune_ratio='Table 2: pruning ratio',
                    window_size='Table 3: window size')
PROBES = ('linear_probe', 'knn')


def plan_runs(base: ExtractionConfig, sizes: Sequence[int], modes: Sequence[str],
              prune_ratios: Sequence[float] = (), window_sizes: Sequence[int] = (),
              ablation_size: Optional[int] = None,
              window_mode: str = 'sparse+prune') -> Dict[str, List[ExtractionConfig]]:
    """Configs per table; ``base`` gives the model, defaults (prune ratio, window) and resize mode."""
    bad = [m for m in modes if m not in MODES]
    if bad or window_mode not in SPARSE_MODES:
        raise ValueError(f'modes must be from {MODES} and window_mode from {SPARSE_MODES}, got {list(modes)}, '
                         f'{window_mode!r}')
    size = ablation_size or max(sizes)
    replace = dataclasses.replace
    return dict(
        resolution=[replace(base, size=s, mode=m) for s in sizes for m in modes],
        prune_ratio=[replace(base, size=size, mode='sparse+prune', prune_ratio=p) for p in prune_ratios],
        window_size=[replace(base, size=size, mode=window_mode, window_size=w) for w in window_sizes])


def benchmark_measure(device: str, precision: str = 'auto', batch_size: int = 1, repeats: int = 3,
                      mem_cap_gb: Optional[float] = None) -> Measure:
    """``cfg -> record``: time and peak memory of the network ``cfg`` extracts with, one fresh process each.

    The model gets all of ``cfg.backbone_kwargs()`` and runs as extraction does (fp32 weights under
    ``torch.autocast`` to what ``precision`` resolves to on ``device``), but with random weights: their values
    change neither time nor memory, and loading a checkpoint would add its transient copy to the CPU peak.
    """
    settings = MeasureSettings(device=device, precision=resolve_extraction_precision(precision, torch.device(device)),
                               batch_size=batch_size, repeats=repeats, mem_cap_gb=mem_cap_gb)

    def measure(cfg: ExtractionConfig) -> Dict[str, Any]:
        return measure_point(dict(cfg.backbone_kwargs(), pretrained=None, frozen=True), cfg.size, settings, cfg.tag)

    return measure


def _run_record(cfg: ExtractionConfig, samples: Sequence[Sample], class_names: List[str], work_dir: str,
                extract_kwargs: Dict[str, Any], eval_kwargs: Dict[str, Any], measure: Measure) -> Dict[str, Any]:
    features = osp.join(work_dir, 'features', f'{cfg.tag}.npz')
    record: Dict[str, Any] = dict(config=dataclasses.asdict(cfg), features=features)
    try:
        extract_features(cfg, samples, class_names, features, **extract_kwargs)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        print_log(f'{cfg.tag}: out of memory during extraction', logger='current', level=30)
        return dict(record, status='oom', measurement=measure(cfg))
    if torch.cuda.is_available():  # hand cached blocks back before the measurement process needs them
        torch.cuda.empty_cache()
    data = load_features(features)
    return dict(record, status='ok', num_kept=int(data['num_kept'][0]),
                evaluation=evaluate_features(data, **eval_kwargs), measurement=measure(cfg))


def run_sweep(tables: Dict[str, List[ExtractionConfig]], samples: Sequence[Sample], class_names: List[str],
              work_dir: str, measure: Measure, extract_kwargs: Optional[Dict[str, Any]] = None,
              eval_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Run every distinct config once (or reuse ``runs/<tag>.json`` unless overwriting); records by tag."""
    extract_kwargs, eval_kwargs = extract_kwargs or {}, eval_kwargs or {}
    os.makedirs(osp.join(work_dir, 'runs'), exist_ok=True)
    records: Dict[str, Dict[str, Any]] = {}
    for cfg in (c for configs in tables.values() for c in configs):
        if cfg.tag in records:
            continue
        run_file = osp.join(work_dir, 'runs', f'{cfg.tag}.json')
        settings = dict(config=dataclasses.asdict(cfg), eval_kwargs=eval_kwargs)
        if osp.isfile(run_file) and not extract_kwargs.get('overwrite'):
            with open(run_file) as f:
                old = json.load(f)
            if old.get('settings') == json.loads(json.dumps(settings)):
                print_log(f'{cfg.tag}: reusing {run_file}', logger='current')
                records[cfg.tag] = old
                continue
        record = dict(_run_record(cfg, samples, class_names, work_dir, extract_kwargs, eval_kwargs, measure),
                      settings=settings)
        records[cfg.tag] = record
        with open(run_file, 'w') as f:
            json.dump(record, f, indent=1)
    return records


def table_rows(configs: Sequence[ExtractionConfig], records: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Flat rows: settings, linear-probe and KNN test metrics, kept tokens, time and memory (NaN if absent)."""
    rows = []
    for cfg in configs:
        rec = records[cfg.tag]
        row: Dict[str, Any] = dict(tag=cfg.tag, size=cfg.size, mode=cfg.mode, status=rec['status'],
                                   prune_ratio=cfg.prune_ratio if is_pruned(cfg.mode) else 0.0,
                                   window_size=cfg.window_size if is_sparse(cfg.mode) else '',
                                   num_kept=rec.get('num_kept', ''))
        evaluation = rec.get('evaluation', {})
        for probe in PROBES:
            test = evaluation.get(probe, {}).get('test', {})
            row.update({f'{probe}_{name}': test.get(name, math.nan) for name in METRIC_NAMES})
        meas = rec.get('measurement') or {}
        ok = meas.get('status') == 'ok'
        row.update(time_s=meas['time_s'] if ok else math.nan, peak_gb=meas['peak_gb'] if ok else math.nan,
                   forward_gb=meas['forward_gb'] if ok else math.nan, measure_status=meas.get('status', ''))
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return '-' if math.isnan(value) else f'{value:.{digits}f}'
    return str(value)


def rows_to_markdown(rows: Sequence[Dict[str, Any]], title: str) -> str:
    """The paper's columns: accuracy, F1, AUROC (linear probe), KNN accuracy, time and memory."""
    header = ['size', 'mode', 'prune', 'window', 'kept', 'acc', 'bal. acc', 'F1', 'AUROC', 'KNN acc',
              'time (s)', 'memory (GB)']
    body = []
    for r in rows:
        failed = r['status'] != 'ok'
        body.append([
            r['size'], r['mode'], _fmt(r['prune_ratio'], 2), r['window_size'], r['num_kept'],
            *(r['status'] if failed else _fmt(r[f'linear_probe_{m}']) for m in METRIC_NAMES),
            r['status'] if failed else _fmt(r['knn_accuracy']),
            _fmt(r['time_s']) if r['measure_status'] in ('ok', '') else r['measure_status'],
            _fmt(r['peak_gb'], 2) if r['measure_status'] in ('ok', '') else r['measure_status']])
    return f'### {title}\n\n{markdown_table(header, [[str(c) for c in row] for row in body])}\n'


def _plot_vs_size(rows: Sequence[Dict[str, Any]], key: str, ylabel: str, path: str, log_y: bool = False) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = (('o', '-'), ('s', '--'), ('^', ':'))  # distinct, so that coinciding curves stay visible
    for (marker, line), mode in zip(itertools.cycle(styles), dict.fromkeys(r['mode'] for r in rows)):
        pts = sorted((r['size'], r[key]) for r in rows if r['mode'] == mode and not math.isnan(r[key]))
        if pts:
            ax.plot(*zip(*pts), marker=marker, linestyle=line, markerfacecolor='none', label=mode)
    ax.set(xlabel='input size (px)', ylabel=ylabel, xscale='log', yscale='log' if log_y else 'linear',
           xticks=sorted({r['size'] for r in rows}))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:  # plain numbers; over a decade or more only some minor ticks get a label
        values = [r[key] for r in rows if not math.isnan(r[key])]
        plain = FuncFormatter(lambda v, _: f'{v:.3g}')
        ax.yaxis.set_major_formatter(plain)
        wide = values and max(values) > 10 * min(values)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False) if wide else plain)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(tables: Dict[str, List[ExtractionConfig]], records: Dict[str, Dict[str, Any]],
                  work_dir: str) -> Dict[str, str]:
    """``table_<name>.md/.csv`` per non-empty table, ``sweep.json``, ``sweep.md`` and the two figure-1 PNGs."""
    written, sections, all_rows = {}, [], {}
    for name in TABLES:
        if not tables.get(name):
            continue
        rows = table_rows(tables[name], records)
        all_rows[name] = rows
        sections.append(rows_to_markdown(rows, TABLE_TITLES[name]))
        written[f'{name}_csv'] = osp.join(work_dir, f'table_{name}.csv')
        with open(written[f'{name}_csv'], 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written[f'{name}_md'] = osp.join(work_dir, f'table_{name}.md')
        with open(written[f'{name}_md'], 'w') as f:
            f.write(sections[-1])
    written['md'] = osp.join(work_dir, 'sweep.md')
    with open(written['md'], 'w') as f:
        f.write('\n'.join(sections))
    written['json'] = osp.join(work_dir, 'sweep.json')
    with open(written['json'], 'w') as f:
        json.dump(dict(tables=all_rows, runs=records), f, indent=1)
    if all_rows.get('resolution'):
        written['accuracy_png'] = osp.join(work_dir, 'accuracy_vs_resolution.png')
        _plot_vs_size(all_rows['resolution'], 'linear_probe_accuracy', 'linear-probe accuracy',
                      written['accuracy_png'])
        written['memory_png'] = osp.join(work_dir, 'memory_vs_resolution.png')
        _plot_vs_size(all_rows['resolution'], 'peak_gb', 'peak memory (GB)', written['memory_png'], log_y=True)
    return written
