"""Wall time and peak memory of a full SparseViT backbone forward, per attention mode and resolution.

Modes, side by side in one run: ``vanilla`` (dense, explicit softmax(QK^T)V), ``sdpa`` (dense,
``scaled_dot_product_attention``), ``sparse`` (windowed sparse attention) and ``sparse_pruned`` (sparse +
token pruning). Each point runs in a fresh subprocess, so CPU peak memory is that process's peak RSS
(``ru_maxrss``) and nothing leaks between points; on CUDA it is ``torch.cuda.max_memory_allocated``.
Two numbers are kept: ``peak`` (whole process / all allocations, weights included) and ``forward``
(peak minus what was held just before the forward: the activations).

Example (CPU, ViT-B width, patch 14, reduced depth)::

    python tools/benchmark_backbone.py --arch vit-b --patch-size 14 --depth 6 \\
        --sizes 224 448 672 896 1344 --out-dir work_dirs/benchmark_backbone

``--max-memory GB`` instead searches, per mode, the largest input side (a multiple of the patch size)
whose forward stays within GB: doubling, then bisection.
"""
import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

MODES: Dict[str, dict] = {
    'vanilla': dict(attn_mode='dense', fused_attn=False),
    'sdpa': dict(attn_mode='dense', fused_attn=True),
    'sparse': dict(attn_mode='sparse'),
    'sparse_pruned': dict(attn_mode='sparse', token_pruning=True),
}
GB = 1024 ** 3


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='vit-b', help='SparseViT preset')
    parser.add_argument('--patch-size', type=int, help='override the preset patch size')
    parser.add_argument('--depth', type=int, help='override the preset depth (keeps CPU runs short)')
    parser.add_argument('--embed-dim', type=int, help='override the preset width')
    parser.add_argument('--num-heads', type=int, help='override the preset head count')
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 448, 896, 1344], help='input sides (px)')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=list(MODES))
    parser.add_argument('--window-size', type=int, default=8)
    parser.add_argument('--prune-ratio', type=float, default=0.6)
    parser.add_argument('--prune-after', type=int, default=4, help='clipped to depth - 1')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3, help='timed forwards per point (median reported)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cuda' if _cuda_available() else 'cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--backend', help='sparse_attention backend (default: automatic choice)')
    parser.add_argument('--mem-cap', type=float, help='GB; a point above it is stopped and reported as over')
    parser.add_argument('--max-memory', type=float, help='GB; search the largest side per mode that fits')
    parser.add_argument('--search-max-size', type=int, default=8192, help='largest side --max-memory tries')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per point')
    parser.add_argument('--out-dir', default='work_dirs/benchmark_backbone')
    parser.add_argument('--worker', help=argparse.SUPPRESS)  # JSON point spec, internal
    return parser.parse_args(argv)


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def model_config(args: argparse.Namespace, mode: str) -> dict:
    """SparseViT keyword arguments for one mode (unset overrides left out)."""
    from mmseg_sparsevit.models import get_arch
    overrides = dict(patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads)
    cfg = dict(arch=args.arch, **{k: v for k, v in overrides.items() if v is not None}, **MODES[mode])
    if cfg['attn_mode'] == 'sparse':
        cfg.update(window_size=args.window_size, sparse_backend=args.backend)
    if cfg.get('token_pruning'):
        depth = get_arch(args.arch, depth=args.depth).depth
        cfg.update(prune_ratio=args.prune_ratio, prune_after=min(args.prune_after, depth - 1))
    return cfg


# ----------------------------------------------------------------------------------------------- worker
def _current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _rss_watchdog(limit_bytes: int) -> None:
    """Stop this process as soon as its resident set exceeds the cap, before the machine starts to swap."""
    while True:
        rss = _current_rss_bytes()
        if rss > limit_bytes:
            print(json.dumps(dict(status='over', peak_gb=rss / GB)), flush=True)
            os._exit(3)
        time.sleep(0.005)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_point(spec: dict) -> dict:
    """Build the model, run warm-up and timed forwards on one input size, return time and memory."""
    import torch
    from mmseg_sparsevit.models import SparseViT

    device, size = torch.device(spec['device']), spec['size']
    cuda = device.type == 'cuda'
    cap = spec.get('mem_cap_gb')
    if cap and not cuda:
        threading.Thread(target=_rss_watchdog, args=(int(cap * GB),), daemon=True).start()
    if cap and cuda:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / torch.cuda.get_device_properties(device).total_memory))
    dtype = getattr(torch, spec['dtype'])
    model = SparseViT(**spec['model']).eval().to(device=device, dtype=dtype)
    x = torch.randn(spec['batch_size'], 3, size, size, device=device, dtype=dtype)

    def forward() -> None:
        model.extract_features(x)
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _current_rss_bytes()
    times = []
    try:
        with torch.inference_mode():
            for i in range(spec['warmup'] + spec['repeats']):
                start = time.perf_counter()
                forward()
                if i >= spec['warmup']:
                    times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return dict(status='over')
    peak = torch.cuda.max_memory_allocated(device) if cuda else _max_rss_bytes()
    status = 'over' if cap and peak > cap * GB else 'ok'
    return dict(status=status, time_s=statistics.median(times), peak_gb=peak / GB,
                forward_gb=(peak - before) / GB)


# ----------------------------------------------------------------------------------------------- driver
def measure(args: argparse.Namespace, mode: str, size: int, cap_gb: Optional[float]) -> dict:
    """One point in a fresh interpreter; returns its record (``status`` ok / over / error)."""
    spec = dict(model=model_config(args, mode), size=size, device=args.device, dtype=args.dtype,
                batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, mem_cap_gb=cap_gb)
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(spec)]
    record = dict(mode=mode, size=size, tokens=(size // _patch(args)) ** 2)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(record, status='timeout')
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    if lines:
        record.update(json.loads(lines[-1]))
    if not lines or (proc.returncode != 0 and record.get('status') != 'over'):
        record.update(status='error', error=proc.stderr.strip().splitlines()[-1:] or [f'rc={proc.returncode}'])
    if record['status'] == 'ok':
        detail = f"{record['time_s']:.3f} s  peak {record['peak_gb']:.2f} GB  forward {record['forward_gb']:.2f} GB"
    elif record['status'] == 'over':
        detail = f"stopped above the {cap_gb} GB cap" + (f" at {record['peak_gb']:.3f} GB" if 'peak_gb' in record else '')
    else:
        detail = str(record.get('error', ''))
    print(f"{mode:>14} {size:>5} px: {record['status']:>7} {detail}", flush=True)
    return record


def _patch(args: argparse.Namespace) -> int:
    from mmseg_sparsevit.models import get_arch
    return get_arch(args.arch, patch_size=args.patch_size).patch_size


def largest_fitting_side(probe: Callable[[int], dict], patch: int, start: int, max_side: int) -> Optional[int]:
    """Largest multiple of ``patch`` (<= ``max_side``) whose probe is ok, assuming memory grows with side:
    doubling from ``start`` until a probe fails, then bisection between the last success and the failure."""
    def ok(k: int) -> bool:
        return probe(k * patch)['status'] == 'ok'

    lo, hi = max(1, start // patch), None
    if not ok(lo):
        return None
    while hi is None:
        nxt = min(2 * lo, max_side // patch)
        if nxt == lo:
            return lo * patch
        if ok(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * patch


def growth_ratios(records: List[dict], key: str) -> Dict[str, Dict[str, float]]:
    """Per mode, memory ratio between each side and its double (4x tokens), e.g. '672->1344'."""
    table: Dict[str, Dict[str, float]] = {}
    ok = {(r['mode'], r['size']): r for r in records if r['status'] == 'ok'}
    for (mode, size), rec in ok.items():
        double = ok.get((mode, 2 * size))
        if double:
            table.setdefault(mode, {})[f'{size}->{2 * size}'] = double[key] / rec[key]
    return table


def markdown(records: List[dict], modes: List[str], sizes: List[int], header: dict) -> str:
    """Side-by-side table (time, peak, forward memory per mode), ratio tables and the run's settings."""
    by = {(r['mode'], r['size']): r for r in records}
    lines = ['| px | tokens | ' + ' | '.join(f'{m} time s | {m} peak GB | {m} fwd GB' for m in modes) + ' |',
             '|---|---|' + '---|---|---|' * len(modes)]
    for size in sizes:
        cells = []
        for mode in modes:
            r = by.get((mode, size), dict(status='-'))
            cells += ([f"{r['time_s']:.3f}", f"{r['peak_gb']:.2f}", f"{r['forward_gb']:.2f}"]
                      if r['status'] == 'ok' else [r['status']] * 3)
        tokens = next((r['tokens'] for r in records if r['size'] == size), '')
        lines.append(f'| {size} | {tokens} | ' + ' | '.join(cells) + ' |')
    for key, title in (('peak_gb', 'peak'), ('forward_gb', 'forward')):
        growth = growth_ratios(records, key)
        if growth:
            pairs = sorted({p for g in growth.values() for p in g}, key=lambda p: int(p.split('->')[0]))
            lines += ['', f'{title} memory growth when the token count grows 4x:', '',
                      '| mode | ' + ' | '.join(pairs) + ' |', '|---|' + '---|' * len(pairs)]
            lines += [f'| {m} | ' + ' | '.join(f"{growth[m][p]:.2f}x" if p in growth[m] else '-' for p in pairs)
                      + ' |' for m in modes if m in growth]
    ref = 'sdpa' if 'sdpa' in modes else modes[0]
    lines += ['', f'ratio to {ref} (time / forward memory):', '',
              '| px | ' + ' | '.join(modes) + ' |', '|---|' + '---|' * len(modes)]
    for size in sizes:
        base = by.get((ref, size))
        cells = []
        for mode in modes:
            r = by.get((mode, size))
            good = base and r and base['status'] == r['status'] == 'ok'
            cells.append(f"{r['time_s'] / base['time_s']:.2f} / {r['forward_gb'] / base['forward_gb']:.2f}"
                         if good else '-')
        lines.append(f'| {size} | ' + ' | '.join(cells) + ' |')
    lines += ['', '```', json.dumps(header, indent=1), '```']
    return '\n'.join(lines) + '\n'


def plot(records: List[dict], modes: List[str], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in modes:
        pts = sorted((r['size'], r) for r in records if r['mode'] == mode and r['status'] == 'ok')
        sides = [s for s, _ in pts]
        for ax, key in zip(axes, ('peak_gb', 'forward_gb', 'time_s')):
            ax.plot(sides, [r[key] for _, r in pts], marker='o', label=mode)
    for ax, title in zip(axes, ('peak memory (GB)', 'forward memory (GB)', 'time per forward (s)')):
        ax.set(xlabel='input side (px)', title=title, xscale='log', yscale='log')
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info(args: argparse.Namespace) -> dict:
    import torch
    info = dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                logical_cpus=os.cpu_count())
    if args.device.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name(args.device)
    return info


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_point(json.loads(args.worker))), flush=True)
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from mmseg_sparsevit.models import get_arch
    arch = get_arch(args.arch, patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
                    num_heads=args.num_heads)
    header = dict(command='python ' + ' '.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  machine=machine_info(args), arch=dataclasses.asdict(arch),
                  models={m: model_config(args, m) for m in args.modes},
                  batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    records: List[dict] = []
    if args.max_memory:
        fits = {}
        for mode in args.modes:
            def probe(size: int, mode: str = mode) -> dict:
                rec = measure(args, mode, size, args.max_memory)
                records.append(rec)
                return rec
            side = largest_fitting_side(probe, _patch(args), min(args.sizes), args.search_max_size)
            limit = args.search_max_size // _patch(args) * _patch(args)
            fits[mode] = dict(largest_side=side, hit_search_max_size=side == limit)
        header['max_memory_gb'] = args.max_memory
        header['largest_side_that_fits'] = fits
        print(json.dumps(fits, indent=1))
        sizes = sorted({r['size'] for r in records})
    else:
        sizes = args.sizes
        records = [measure(args, mode, size, args.mem_cap) for size in sizes for mode in args.modes]
    (out_dir / 'benchmark.json').write_text(json.dumps(dict(header, records=records), indent=1))
    (out_dir / 'benchmark.md').write_text(markdown(records, args.modes, sizes, header))
    plot(records, args.modes, out_dir / 'benchmark.png')
    print(f'wrote {out_dir}/benchmark.json, benchmark.md, benchmark.png')


if __name__ == '__main__':
    main()
