"""Wall time and peak memory of a full SparseViT backbone forward, per attention mode and resolution.

Attention modes (``models.modes``), side by side in one run: ``vanilla`` (dense, explicit softmax(QK^T)V),
``dense`` (``scaled_dot_product_attention``), ``sparse`` (windowed sparse attention) and ``sparse+prune``
(sparse + token pruning). Each point runs in a fresh subprocess (``mmseg_sparsevit.benchmark``): CPU peak memory is
that process's peak RSS, CUDA peak memory ``torch.cuda.max_memory_allocated``. ``--precision`` says how the
forward runs (``amp-bf16``: fp32 weights under bf16 autocast, as feature extraction on CUDA; ``bf16``: the
model cast to bf16); the outputs state it.

Example (CPU, ViT-B width, patch 14, reduced depth)::

    python tools/benchmark_backbone.py --arch vit-b --patch-size 14 --depth 6 \\
        --sizes 224 448 672 896 1344 --out-dir work_dirs/benchmark_backbone

``--max-memory GB`` instead searches, per mode, the largest input side (a multiple of the patch size)
whose peak memory stays within GB: doubling, then bisection.
"""
import argparse
import dataclasses
import json
import sys
from functools import partial
from typing import Any, Dict, List, Optional

import torch
from mmengine.config import DictAction
from mmengine.logging import print_log

from mmseg_sparsevit.benchmark import (MeasureSettings, largest_fitting_side, machine_info, measure_point,
                                       resolved_arch, write_reports)
from mmseg_sparsevit.models.modes import ATTENTION_MODES, PRECISIONS, describe_precision, mode_kwargs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='vit-b', help='SparseViT preset')
    parser.add_argument('--patch-size', type=int, help='override the preset patch size')
    parser.add_argument('--depth', type=int, help='override the preset depth (keeps CPU runs short)')
    parser.add_argument('--embed-dim', type=int, help='override the preset width')
    parser.add_argument('--num-heads', type=int, help='override the preset head count')
    parser.add_argument('--model-args', nargs='+', action=DictAction, default={},
                        help='any other SparseViT arguments, KEY=VALUE (e.g. mlp_ratio=2 reg_tokens=4)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 448, 896, 1344], help='input sides (px)')
    parser.add_argument('--modes', nargs='+', default=list(ATTENTION_MODES), choices=list(ATTENTION_MODES))
    parser.add_argument('--window-size', type=int, default=8)
    parser.add_argument('--prune-ratio', type=float, default=0.6)
    parser.add_argument('--prune-after', type=int, default=4, help='clipped to depth - 1')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3, help='timed forwards per point (median reported)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', default='fp32', choices=list(PRECISIONS),
                        help='amp-*: fp32 weights + autocast (as extraction); bf16 / fp16: the model cast')
    parser.add_argument('--backend', help='sparse_attention backend (default: automatic choice)')
    parser.add_argument('--mem-cap', type=float, help='GB; a point above it is stopped and reported as over')
    parser.add_argument('--max-memory', type=float, help='GB; search the largest side per mode that fits')
    parser.add_argument('--search-max-size', type=int, default=8192, help='largest side --max-memory tries')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per point')
    parser.add_argument('--out-dir', default='work_dirs/benchmark_backbone')
    return parser.parse_args(argv)


def base_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """SparseViT arguments shared by all modes (``mode_kwargs`` adds each mode's switches)."""
    overrides = dict(patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads)
    kwargs = dict(arch=args.arch, **{k: v for k, v in overrides.items() if v is not None}, **args.model_args)
    depth = resolved_arch(kwargs).depth
    return dict(kwargs, window_size=args.window_size, sparse_backend=args.backend, prune_ratio=args.prune_ratio,
                prune_after=min(args.prune_after, depth - 1))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    base = base_kwargs(args)
    models = {mode: mode_kwargs(base, mode) for mode in args.modes}
    cap = args.max_memory or args.mem_cap
    settings = MeasureSettings(device=args.device, precision=args.precision, batch_size=args.batch_size,
                               repeats=args.repeats, warmup=args.warmup, mem_cap_gb=cap, timeout_s=args.timeout)
    header = dict(command='python ' + ' '.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  machine=machine_info(args.device), arch=dataclasses.asdict(resolved_arch(base)), models=models,
                  batch_size=args.batch_size, precision=args.precision,
                  precision_description=describe_precision(args.precision), device=args.device)
    print_log(f'precision {args.precision}: {describe_precision(args.precision)}', logger='current')
    records: List[Dict[str, Any]] = []
    if args.max_memory:
        patch, fits = resolved_arch(base).patch_size, {}
        for mode, kwargs in models.items():
            probe = partial(measure_point, kwargs, settings=settings, label=mode)
            found = largest_fitting_side(probe, patch, min(args.sizes), args.search_max_size, args.max_memory)
            records += [dict(r, mode=mode) for r in found.pop('records')]
            fits[mode] = found
        header.update(max_memory_gb=args.max_memory, largest_side_that_fits=fits)
        print(json.dumps(fits, indent=1))
        sizes = sorted({r['size'] for r in records})
    else:
        sizes = args.sizes
        records = [dict(measure_point(models[mode], size, settings, mode), mode=mode)
                   for size in sizes for mode in args.modes]
    paths = write_reports(args.out_dir, records, args.modes, sizes, header)
    print_log(f"wrote {', '.join(str(p) for p in paths.values())}", logger='current')
    return dict(header, records=records, paths=paths)


if __name__ == '__main__':
    main()
