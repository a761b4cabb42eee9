"""Op-level benchmark: dense vs windowed sparse attention, side by side, one fresh process per point.

Methods: ``dense_eager`` (explicit softmax(QK^T)V, the paper's "vanilla" attention), ``dense_sdpa``
(``F.scaled_dot_product_attention``), ``gather`` and ``flex`` (``sparse_attention`` backends; flex is
compiled and its one-off compile time is reported apart) and ``auto`` (``sparse_attention``'s own
backend choice).  Each point runs in its own subprocess so peak memory is that point's alone: CUDA
``max_memory_allocated``, or on CPU the resident set size sampled during the timed calls (and the
process' lifetime peak, which includes compilation).

``--keep`` measures token pruning: a fraction ``keep`` < 1 keeps a seeded random subset of the grid
cells (the same sorted subset for every batch row), passed to the sparse methods as ``patch_index``.
The dense methods then attend densely among the kept tokens only (no window), i.e. they are what a
pruned dense ViT would compute.

Example (the default is ViT-B width at 1344 px / patch 14 = 96 x 96 patches + 9 global tokens)::

    python tools/benchmark_attention.py --grids 32x32 64x64 96x96 --json work_dirs/bench_attention.json
    python tools/benchmark_attention.py --grids 96x96 --methods gather flex auto --keep 1.0 0.4
"""
import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

METHODS = ('dense_eager', 'dense_sdpa', 'gather', 'flex', 'auto')
COMPILED = ('flex', 'auto')  # first call may compile flex: its excess over the median is reported


def dense_eager(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """timm's non-fused attention path: the full N x N probability matrix is materialised."""
    attn = (q * q.shape[-1]**-0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def kept_patch_index(grid: tuple[int, int], keep: float, batch: int, device: torch.device) -> Tensor:
    """A seeded random, sorted subset of ``max(1, int(cells * keep))`` grid cells, the same for every
    batch row, so each point of a run (and each run) prunes the same tokens."""
    cells = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    kept = torch.randperm(cells, generator=gen)[:max(1, int(cells * keep))].sort().values
    return kept.to(device).expand(batch, -1).contiguous()


def _runner(method: str, spec: dict,
            patch_index: Optional[Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    if method == 'dense_eager':
        return dense_eager
    if method == 'dense_sdpa':
        return F.scaled_dot_product_attention
    from mmseg_sparsevit.ops import sparse_attention
    grid, backend = tuple(spec['grid']), None if method == 'auto' else method
    return lambda q, k, v: sparse_attention(q, k, v, grid, spec['num_global'], spec['window_size'],
                                            spec['neighbourhood'], patch_index=patch_index, backend=backend)


def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class _RssSampler:
    """Polls the resident set size in a thread while the op runs (the op releases the GIL)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak, self._stop = interval_s, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> '_RssSampler':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(method: str, spec: dict) -> dict:
    """Time one method at one grid in this process: warm-up (incl. compile), then timed repeats."""
    device = torch.device(spec['device'])
    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    keep = spec.get('keep', 1.0)
    patch_index = kept_patch_index(spec['grid'], keep, spec['batch'], device) if keep < 1 else None
    num_patches = spec['grid'][0] * spec['grid'][1] if patch_index is None else patch_index.shape[1]
    shape = (spec['batch'], spec['heads'], spec['num_global'] + num_patches, spec['head_dim'])
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device=device) for _ in range(3))
    run = _runner(method, spec, patch_index)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        run(q, k, v)
        sync()
        first_call_s = time.perf_counter() - start
        for _ in range(spec['warmup'] - 1):
            run(q, k, v)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
        times, cpu_times = [], []
        with _RssSampler() as sampler:
            for _ in range(spec['repeats']):
                start, cpu_start = time.perf_counter(), time.process_time()
                run(q, k, v)
                sync()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak
    return dict(method=method, grid=list(spec['grid']), keep=keep, tokens=shape[2], median_s=median,
                times_s=times, median_cpu_s=statistics.median(cpu_times),
                compile_s=first_call_s - median if method in COMPILED else None,
                op_peak_bytes=peak - base, peak_bytes=peak,
                process_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure_in_subprocess(method: str, spec: dict, timeout_s: float, cold_compile: bool) -> dict:
    """Run :func:`measure` in a fresh interpreter; a crash or OOM kill becomes an ``error`` entry.
    ``cold_compile`` gives the worker an empty inductor cache, so compile time is the first-ever one."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(dict(spec, method=method))]
    failed = dict(method=method, grid=spec['grid'], keep=spec['keep'])
    try:
        with tempfile.TemporaryDirectory(prefix='bench_inductor_') as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache) if cold_compile else None
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return dict(failed, error=f'timed out after {timeout_s:.0f} s')
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f'exit code {proc.returncode}']
        return dict(failed, error=f'exit {proc.returncode}: {tail[0]}')
    return json.loads(lines[-1])


def markdown_table(results: list[dict]) -> str:
    """One row per (grid, keep, method) with the speed-up over dense SDPA at the same grid and keep, in
    wall time and in process CPU time (all threads; steadier than wall time on a shared machine)."""
    def point(r: dict) -> tuple:
        return tuple(r['grid']), r.get('keep', 1.0)

    sdpa = {point(r): r for r in results if r['method'] == 'dense_sdpa' and 'error' not in r}
    rows = ['| grid | keep | tokens (kept) | method | median time (s) '
            '| speed-up vs dense SDPA on the same tokens | median CPU time (s) | CPU-time speed-up '
            '| compile (s) | op peak memory (GiB) | process peak RSS (GiB) |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
    gib = 2.0**30
    for r in results:
        grid, keep = 'x'.join(map(str, r['grid'])), f'{r.get("keep", 1.0):g}'
        if 'error' in r:
            rows.append(f'| {grid} | {keep} | | {r["method"]} | {r["error"]} | | | | | | |')
            continue
        ref = sdpa.get(point(r))
        speedup, cpu_speedup = ((f'{ref[key] / r[key]:.1f}x' if ref else 'n/a')
                                for key in ('median_s', 'median_cpu_s'))
        compile_s = f'{r["compile_s"]:.1f}' if r['compile_s'] is not None else ''
        rows.append(f'| {grid} | {keep} | {r["tokens"]} | {r["method"]} | {r["median_s"]:.3f} | {speedup} '
                    f'| {r["median_cpu_s"]:.3f} | {cpu_speedup} | {compile_s} '
                    f'| {r["op_peak_bytes"] / gib:.2f} | {r["process_peak_rss_bytes"] / gib:.2f} |')
    if any(r.get('keep', 1.0) < 1 and r['method'].startswith('dense') for r in results):
        rows.append('\nRows with keep < 1: the sparse methods get the kept cells as `patch_index`; the dense '
                    'methods attend densely among the kept tokens only (no window).')
    return '\n'.join(rows)


def _grid(text: str) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'grid must look like 96x96, got {text!r}')
    return height, width


def _fraction(text: str) -> float:
    error = argparse.ArgumentTypeError(f'keep must be a fraction in (0, 1], got {text!r}')
    try:
        keep = float(text)
    except ValueError:
        raise error
    if not 0 < keep <= 1:
        raise error
    return keep


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--grids', type=_grid, nargs='+', default=[(96, 96)], help='patch grids, HxW')
    parser.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS))
    parser.add_argument('--keep', type=_fraction, nargs='+', default=[1.0],
                        help='fractions of grid cells kept (token pruning; seeded random subset)')
    parser.add_argument('--num-global', type=int, default=9, help='CLS + register tokens')
    parser.add_argument('--heads', type=int, default=12)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--window-size', type=int, default=8)
    parser.add_argument('--neighbourhood', choices=('block', 'sliding'), default='block')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls; the first compiles flex')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per point')
    parser.add_argument('--warm-compile-cache', action='store_true',
                        help="reuse inductor's on-disk cache (compile time then shows a cache hit)")
    parser.add_argument('--json', help='write all results and the environment here')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec.pop('method'), spec)))
        return
    spec = dict(num_global=args.num_global, heads=args.heads, head_dim=args.head_dim, batch=args.batch,
                window_size=args.window_size, neighbourhood=args.neighbourhood, device=args.device,
                warmup=max(args.warmup, 1), repeats=args.repeats)
    environment = dict(command=' '.join([os.path.relpath(__file__)] + argv), torch=torch.__version__,
                       device=args.device, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                       platform=platform.platform(), load_average_start=os.getloadavg(),
                       cold_compile=not args.warm_compile_cache)
    results = []
    for grid, keep, method in itertools.product(args.grids, args.keep, args.methods):
        results.append(measure_in_subprocess(method, dict(spec, grid=list(grid), keep=keep), args.timeout,
                                             cold_compile=not args.warm_compile_cache))
        print(f'{"x".join(map(str, grid))} keep={keep:g} {method}: '
              f'{results[-1].get("error") or format(results[-1]["median_s"], ".3f") + " s"}', flush=True)
    environment['load_average_end'] = os.getloadavg()
    print(markdown_table(results))
    print(f'\nload average (1, 5, 15 min) at start {environment["load_average_start"]}, '
          f'at end {environment["load_average_end"]}')
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(environment=environment, settings=spec, results=results), f, indent=2)


if __name__ == '__main__':
    main(sys.argv[1:])
