"""Op-level benchmark: dense vs windowed sparse attention, side by side, one fresh process per point.

Methods: ``vanilla`` (explicit softmax(QK^T)V, the paper's "vanilla" attention), ``dense``
(``F.scaled_dot_product_attention``), ``gather`` and ``flex`` (``sparse_attention`` backends; flex is
compiled and its one-off compile time is reported apart) and ``auto`` (``sparse_attention``'s own
backend choice); see ``mmseg_sparsevit.benchmark.attention``. ``--keep`` measures token pruning (a seeded
random subset of grid cells; the dense methods attend among the kept tokens only), ``--backward`` times
forward + backward. ``--archs`` measures named ViT presets at ``--image-size`` px: each model's own patch grid,
heads x head dim and CLS + register tokens (instead of ``--grids``, ``--heads``, ``--head-dim``, ``--num-global``).

Example (the default is ViT-B width at 1344 px / patch 14 = 96 x 96 patches + 9 global tokens)::

    python tools/benchmark_attention.py --grids 32x32 64x64 96x96 --json work_dirs/bench_attention.json
    python tools/benchmark_attention.py --grids 96x96 --methods gather flex auto --keep 1.0 0.4
    python tools/benchmark_attention.py --archs uni uni2-h virchow2 --image-size 1344 --methods dense auto
"""
import argparse
import dataclasses
import itertools
import json
import os
import sys
from typing import List, Optional, Tuple

import torch

from mmseg_sparsevit.benchmark import machine_info
from mmseg_sparsevit.benchmark.attention import (METHODS, AttentionPoint, arch_point, attention_table,
                                                 measure_attention_in_subprocess)
from mmseg_sparsevit.models.presets import ARCH_PRESETS


def _grid(text: str) -> Tuple[int, int]:
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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--grids', type=_grid, nargs='+', default=[(96, 96)], help='patch grids, HxW')
    parser.add_argument('--archs', nargs='+', choices=sorted(ARCH_PRESETS), metavar='PRESET',
                        help=f'ViT presets measured at --image-size (one of {", ".join(sorted(ARCH_PRESETS))})')
    parser.add_argument('--image-size', type=int, default=1344, help='input side (px) for --archs')
    parser.add_argument('--methods', nargs='+', choices=METHODS, default=list(METHODS))
    parser.add_argument('--keep', type=_fraction, nargs='+', default=[1.0],
                        help='fractions of grid cells kept (token pruning; seeded random subset)')
    parser.add_argument('--backward', action='store_true', help='time forward + backward (gradients of q, k, v)')
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
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    common = dict(batch=args.batch, window_size=args.window_size, neighbourhood=args.neighbourhood,
                  backward=args.backward, device=args.device, warmup=max(args.warmup, 1), repeats=args.repeats)
    if args.archs:
        shapes = [(arch, arch_point(arch, args.image_size, **common)) for arch in args.archs]
        settings = dict(common, archs=args.archs, image_size=args.image_size)
    else:
        settings = dict(common, num_global=args.num_global, heads=args.heads, head_dim=args.head_dim)
        shapes = [(None, AttentionPoint(grid=grid, **settings)) for grid in args.grids]
    cold = not args.warm_compile_cache
    environment = dict(command=' '.join(['python tools/benchmark_attention.py'] + argv),
                       machine=machine_info(args.device), cold_compile=cold, load_average_start=os.getloadavg())
    results = []
    for (arch, shape), keep, method in itertools.product(shapes, args.keep, args.methods):
        point = dataclasses.replace(shape, keep=keep)
        results.append(measure_attention_in_subprocess(method, point, args.timeout, cold_compile=cold))
        if arch:
            results[-1]['arch'] = arch
        label = f'{arch} ' if arch else ''
        print(f'{label}{"x".join(map(str, point.grid))} keep={keep:g} {method}: '
              f'{results[-1].get("error") or format(results[-1]["median_s"], ".3f") + " s"}', flush=True)
    environment['load_average_end'] = os.getloadavg()
    print(attention_table(results))
    print(f'\nload average (1, 5, 15 min) at start {environment["load_average_start"]}, '
          f'at end {environment["load_average_end"]}')
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(environment=environment, settings=settings, results=results), f, indent=2)


if __name__ == '__main__':
    main()
