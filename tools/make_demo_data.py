"""Generate a small deterministic SegPath-like dataset for tests and CPU demos.

Example::

    python tools/make_demo_data.py data/segpath_demo --archives data/segpath_demo_download
    python tools/make_demo_data.py data/segpath_demo --antigens panCK aSMA --tiles 24 --tile-size 984
"""
import argparse
import sys
from typing import List, Optional

from mmengine.logging import print_log

from mmseg_sparsevit.datasets.segpath import SEGPATH_ANTIGENS
from mmseg_sparsevit.datasets.synthetic import DEFAULT_DEMO_ANTIGENS, make_demo_data


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('data_root', help='output folder in the layout SegPathDataset reads')
    parser.add_argument('--antigens', nargs='+', default=list(DEFAULT_DEMO_ANTIGENS),
                        help=f'antigens to generate, from {list(SEGPATH_ANTIGENS)} (default: %(default)s)')
    parser.add_argument('--tiles', type=int, default=12, help='tiles per antigen (default: %(default)s)')
    parser.add_argument('--tile-size', type=int, default=256, help='tile side in px; 984 is the real size')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--archives', metavar='DIR',
                        help='also write the download layout (tar.gz + fileinfo CSV) here, for prepare_segpath.py')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    counts = make_demo_data(args.data_root, args.antigens, args.tiles, args.tile_size, args.seed, args.archives)
    for antigen, per_split in counts.items():
        print_log(f'{antigen}: ' + ', '.join(f'{s} {n}' for s, n in per_split.items()), logger='current')
    print_log(f'demo data written to {args.data_root}' + (f', archives to {args.archives}' if args.archives else ''),
              logger='current')
    return 0


if __name__ == '__main__':
    sys.exit(main())
