"""Train-step and inference time and peak memory of a full segmentor from any config, per input side and
setting (attention mode + memory levers), with the memory broken down by part; one fresh process per point.

Settings are ``MODE[:LEVER,...]`` (``mmseg_sparsevit.engine.segmentor_benchmark``: modes dense / sparse /
vanilla, levers vit-cp, adapter-cp, freeze-vit, bf16, fp16), all measured side by side in one run. Writes ``segmentor.json``,
``segmentor.md`` and ``segmentor.png`` to ``--out-dir``, rewritten after every point.

Example (CPU proxy of the SegPath UNI-2 config: ViT-B width, depth 4, BN)::

    python tools/benchmark_segmentor.py \\
        configs/segpath/panCK/mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-panCK-560x560.py \\
        --sizes 224 448 --settings dense sparse sparse:adapter-cp --threads 2 \\
        --cfg-options model.backbone.vit_cfg.embed_dim=768 model.backbone.vit_cfg.num_heads=12 \\
            model.backbone.vit_cfg.depth=4 model.decode_head.in_channels=[768,768,768,768] \\
            model.backbone.norm_cfg.type=BN
"""
import argparse
import sys
from typing import Any, Dict, List, Optional

import torch
from mmengine.config import DictAction
from mmengine.logging import print_log

from mmseg_sparsevit.benchmark import machine_info
from mmseg_sparsevit.engine.segmentor_benchmark import (PHASES, SegmentorPoint, Setting, measure_segmentor_point,
                                                        write_segmentor_reports)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='segmentor config (a SparseViT / SparseViTAdapter backbone)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[560, 1120], help='square input sides (px)')
    parser.add_argument('--settings', nargs='+', default=['dense', 'sparse'],
                        help='MODE[:LEVER,...], e.g. dense sparse sparse:adapter-cp,bf16')
    parser.add_argument('--phases', nargs='+', default=['train'], choices=PHASES)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={}, help='override config keys')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=2, help='timed steps per point (median reported)')
    parser.add_argument('--threads', type=int, help='torch threads in each worker')
    parser.add_argument('--no-breakdown', action='store_true', help='skip the tracked step (parts)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--timeout', type=float, default=1800, help='seconds per point')
    parser.add_argument('--out-dir', default='work_dirs/benchmark_segmentor')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    settings = [Setting.parse(s).name for s in args.settings]  # fail on a typo before any process starts
    header = dict(command='python ' + ' '.join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                  machine=machine_info(args.device), config=args.config, cfg_options=dict(args.cfg_options),
                  device=args.device, batch_size=args.batch_size, threads=args.threads, warmup=args.warmup,
                  repeats=args.repeats)
    records = []
    for phase in args.phases:
        for size in args.sizes:
            for setting in settings:
                point = SegmentorPoint(args.config, setting, size, phase, dict(args.cfg_options), args.device,
                                       args.batch_size, args.warmup, args.repeats, args.threads,
                                       not args.no_breakdown)
                record = measure_segmentor_point(point, args.timeout)
                detail = (f"{record['time_s']:.2f} s/step  peak {record['peak_gb']:.2f} GB"
                          if record['status'] == 'ok' else record.get('error', ''))
                print_log(f'{phase:>5} {size:>5} px {setting:>24}: {record["status"]} {detail}', logger='current')
                records.append(record)
                paths = write_segmentor_reports(args.out_dir, records, header)  # an interrupted run keeps its points
    print_log(f"wrote {', '.join(str(p) for p in paths.values())}", logger='current')
    return dict(header, records=records, paths=paths)


if __name__ == '__main__':
    main()
