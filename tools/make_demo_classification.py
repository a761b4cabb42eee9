"""Write deterministic synthetic classification tiles (3 texture classes) for tests and CPU demos.

Example::

    python tools/make_demo_classification.py work_dirs/demo_cls --counts 8 4 4
"""
import argparse
from typing import List, Optional

from mmseg_sparsevit.classification.demo import make_demo_classification


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('out_dir')
    parser.add_argument('--counts', type=int, nargs=3, default=[8, 4, 4], metavar=('TRAIN', 'VAL', 'TEST'),
                        help='tiles per class and split')
    parser.add_argument('--size-range', type=int, nargs=2, default=[40, 64], metavar=('MIN', 'MAX'),
                        help='tile height and width are drawn from [MIN, MAX]')
    parser.add_argument('--layout', default='csv', choices=['csv', 'folders'])
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    info = make_demo_classification(args.out_dir, args.counts, tuple(args.size_range), args.seed, args.layout)
    print(f"wrote demo data to {info['data_root']}" + (f" (labels: {info['ann_file']})" if info['ann_file'] else ''))
    return info


if __name__ == '__main__':
    main()
