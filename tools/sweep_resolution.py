"""Paper tables 1-3: extraction, linear probe / KNN and time / memory per input size and attention mode,
plus pruning-ratio and window-size ablations, written as markdown, CSV, JSON and PNG plots.

Time and peak memory come from ``mmseg_sparsevit.benchmark`` (one fresh process per point, random weights,
batch of ``--measure-batch-size``, extraction's precision). Rerunning the same command resumes an
interrupted sweep.

Example (UNI-2 on PANDA, table 1 and both ablations at 896 px)::

    python tools/sweep_resolution.py --data-root data/panda --ann-file data/panda/labels.csv \\
        --weights checkpoints/uni2-h/pytorch_model.bin --sizes 224 448 896 1344 \\
        --prune-ratios 0.2 0.4 0.6 0.8 --window-sizes 2 4 8 16 --ablation-size 896 \\
        --work-dir work_dirs/panda_sweep
"""
import argparse
from pathlib import Path
from typing import Dict, List, Optional

from mmengine.logging import print_log

from mmseg_sparsevit.classification.cli import (add_eval_args, add_extraction_args, base_config, eval_kwargs,
                                                extract_kwargs)
from mmseg_sparsevit.classification.dataset import load_samples
from mmseg_sparsevit.classification.extraction import MODES
from mmseg_sparsevit.models.modes import SPARSE_MODES
from mmseg_sparsevit.classification.sweep import benchmark_measure, plan_runs, run_sweep, write_outputs


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_extraction_args(parser)
    add_eval_args(parser)
    parser.add_argument('--work-dir', required=True, help='features/, runs/, tables and plots go here')
    parser.add_argument('--sizes', type=int, nargs='+', required=True, help='input sides for table 1 (px)')
    parser.add_argument('--modes', nargs='+', default=['dense', 'sparse', 'sparse+prune'], choices=MODES,
                        help='table 1 modes')
    parser.add_argument('--prune-ratios', type=float, nargs='*', default=[], help='table 2 (sparse+prune)')
    parser.add_argument('--window-sizes', type=int, nargs='*', default=[], help='table 3')
    parser.add_argument('--window-mode', default='sparse+prune', choices=SPARSE_MODES, help='table 3 mode')
    parser.add_argument('--ablation-size', type=int, help='input side of tables 2 and 3 (default: largest size)')
    parser.add_argument('--measure-batch-size', type=int, default=1)
    parser.add_argument('--measure-repeats', type=int, default=3, help='timed forwards per point (median)')
    parser.add_argument('--mem-cap', type=float, help='GB; a measurement above it is reported as over')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, str]:
    args = parse_args(argv)
    samples, class_names = load_samples(args.data_root, args.ann_file)
    tables = plan_runs(base_config(args, args.sizes[0], args.modes[0]), args.sizes, args.modes,
                       args.prune_ratios, args.window_sizes, args.ablation_size, args.window_mode)
    measure = benchmark_measure(args.device, args.precision, args.measure_batch_size, args.measure_repeats,
                                args.mem_cap)
    records = run_sweep(tables, samples, class_names, args.work_dir, measure, extract_kwargs(args), eval_kwargs(args))
    written = write_outputs(tables, records, args.work_dir)
    print(Path(written['md']).read_text())
    print_log(f'wrote {", ".join(sorted(written.values()))}', logger='current')
    return written


if __name__ == '__main__':
    main()
