"""Benchmark outputs: ``benchmark.json`` (settings + records), ``benchmark.md`` (side-by-side table, memory
growth per 4x tokens, ratios to a reference mode) and ``benchmark.png`` (log-log curves).

Records are ``measure_point`` results with a ``mode`` key added; every ratio is computed from them.
"""
import json
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mmseg_sparsevit.models.modes import describe_precision
from mmseg_sparsevit.utils.markdown import markdown_table

Record = Dict[str, Any]


def _ratio(num: float, den: float) -> Optional[float]:
    return num / den if den > 0 else None


def growth_ratios(records: Sequence[Record], key: str) -> Dict[str, Dict[str, Optional[float]]]:
    """Per mode, ``key`` at each side's double over ``key`` at the side (4x tokens), e.g. ``'672->1344'``, for
    every pair measured ok at both sides; None where the side's value is 0 (e.g. a forward too small to show in
    the process RSS), so the pair is still listed."""
    table: Dict[str, Dict[str, Optional[float]]] = {}
    ok = {(r['mode'], r['size']): r for r in records if r['status'] == 'ok'}
    for (mode, size), rec in ok.items():
        double = ok.get((mode, 2 * size))
        if double:
            table.setdefault(mode, {})[f'{size}->{2 * size}'] = _ratio(double[key], rec[key])
    return table


def mode_ratios(records: Sequence[Record], ref: str) -> Dict[str, Dict[int, Dict[str, Optional[float]]]]:
    """Per mode and side, ``time`` and ``forward`` memory over the ``ref`` mode's at the same side."""
    ok = {(r['mode'], r['size']): r for r in records if r['status'] == 'ok'}
    table: Dict[str, Dict[int, Dict[str, Optional[float]]]] = {}
    for (mode, size), rec in ok.items():
        base = ok.get((ref, size))
        if base:
            table.setdefault(mode, {})[size] = dict(time=_ratio(rec['time_s'], base['time_s']),
                                                     forward=_ratio(rec['forward_gb'], base['forward_gb']))
    return table


def _fmt(value: Optional[float], suffix: str = '') -> str:
    return 'n/a' if value is None else f'{value:.2f}{suffix}'


def markdown(records: Sequence[Record], modes: Sequence[str], sizes: Sequence[int], header: Dict[str, Any]) -> str:
    """Precision line, side-by-side table (time, peak, forward memory per mode), growth and ratio tables,
    and the run's settings as JSON.

    The growth tables are written whenever two measured sides are a factor 2 apart, whatever the values: a
    ratio cell is ``n/a`` where its denominator is 0 and ``-`` where a point was not measured ok."""
    by = {(r['mode'], r['size']): r for r in records}
    rows = []
    for size in sizes:
        cells = []
        for mode in modes:
            r = by.get((mode, size), dict(status='-'))
            cells += ([f"{r['time_s']:.3f}", f"{r['peak_gb']:.2f}", f"{r['forward_gb']:.2f}"]
                      if r['status'] == 'ok' else [r['status']] * 3)
        rows.append([size, next((r['tokens'] for r in records if r['size'] == size), ''), *cells])
    columns = ['px', 'tokens'] + [f'{m} {what}' for m in modes for what in ('time s', 'peak GB', 'fwd GB')]
    lines = [f"Precision: **{header['precision']}** ({describe_precision(header['precision'])}), device "
             f"{header['device']}, batch {header['batch_size']}.", '', markdown_table(columns, rows)]
    sides = sorted(set(sizes) | {r['size'] for r in records})
    pairs = [f'{s}->{2 * s}' for s in sides if 2 * s in sides]
    for key, title in (('peak_gb', 'peak'), ('forward_gb', 'forward')):
        growth = growth_ratios(records, key)
        if pairs:
            rows = [[m, *(_fmt(growth[m][p], 'x') if p in growth.get(m, {}) else '-' for p in pairs)] for m in modes]
            lines += ['', f'{title} memory growth when the token count grows 4x:', '',
                      markdown_table(['mode', *pairs], rows)]
    ref = 'dense' if 'dense' in modes else modes[0]
    ratios = mode_ratios(records, ref)
    rows = [[size, *(f"{_fmt(c['time'])} / {_fmt(c['forward'])}" if c else '-'
                     for c in (ratios.get(mode, {}).get(size) for mode in modes))] for size in sizes]
    lines += ['', f'ratio to {ref} (time / forward memory):', '', markdown_table(['px', *modes], rows)]
    lines += ['', '```', json.dumps(header, indent=1), '```']
    return '\n'.join(lines) + '\n'


def plot(records: Sequence[Record], modes: Sequence[str], path: Path, precision: str) -> None:
    """Peak memory, forward memory and time per forward against the input side, one line per mode; log-log
    where the values allow it (an axis with no positive value, e.g. every point over the cap, stays linear)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (('peak_gb', 'peak memory (GB)'), ('forward_gb', 'forward memory (GB)'),
              ('time_s', 'time per forward (s)'))
    for ax, (key, title) in zip(axes, panels):
        values = []
        for mode in modes:
            pts = sorted((r['size'], r[key]) for r in records if r['mode'] == mode and r['status'] == 'ok')
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker='o', label=mode)
            values += [v for _, v in pts]
        ax.set(xlabel='input side (px)', title=title, xscale='log' if values else 'linear',
               yscale='log' if any(v > 0 for v in values) else 'linear')
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend()
    fig.suptitle(f'precision {precision} ({describe_precision(precision)})')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info(device: str) -> Dict[str, Any]:
    """Software and hardware the numbers were measured on (they mean little without it)."""
    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                logical_cpus=os.cpu_count())
    if device.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def write_reports(out_dir: str, records: List[Record], modes: Sequence[str], sizes: Sequence[int],
                  header: Dict[str, Any]) -> Dict[str, Path]:
    """Write ``benchmark.json`` / ``.md`` / ``.png`` to ``out_dir``; ``header`` needs ``precision``, ``device``
    and ``batch_size`` (the markdown's first line) and may hold any other settings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / 'benchmark.json', md=out / 'benchmark.md', png=out / 'benchmark.png')
    paths['json'].write_text(json.dumps(dict(header, records=records), indent=1))
    paths['md'].write_text(markdown(records, modes, sizes, header))
    plot(records, modes, paths['png'], header['precision'])
    return paths
