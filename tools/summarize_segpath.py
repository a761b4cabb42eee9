"""Summarize SegPath test runs (one ``segpath_metrics.json`` per antigen) into
the paper's MPA / IoU / Dice table with the mean over cell types.

Example::

    python tools/summarize_segpath.py 'work_dirs/**/segpath_metrics.json' \\
        --csv work_dirs/segpath_summary.csv --md work_dirs/segpath_summary.md
"""
import argparse
from pathlib import Path

from mmseg_sparsevit.evaluation.summary import (PAPER_METRICS,
                                                rows_to_markdown,
                                                summarize_segpath, write_csv)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        'inputs',
        nargs='+',
        help='result files, directories (searched recursively for '
        'segpath_metrics.json) or quoted glob patterns')
    parser.add_argument(
        '--metrics',
        nargs='+',
        default=list(PAPER_METRICS),
        help='SegPathMetric keys to tabulate (default: %(default)s)')
    parser.add_argument('--csv', type=Path, help='also write the table here')
    parser.add_argument(
        '--md', type=Path, help='also write the markdown table here')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rows = summarize_segpath(args.inputs, args.metrics)
    table = rows_to_markdown(rows, args.metrics)
    print(table)
    if args.csv:
        write_csv(rows, args.csv, args.metrics)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table + '\n')


if __name__ == '__main__':
    main()
