"""Unpack and validate SegPath downloads into the layout SegPathDataset reads.

Put the files from the Zenodo records ({antigen}_{CellType}.tar.gz and {antigen}_fileinfo.csv)
in one folder, then::

    python tools/prepare_segpath.py downloads/ data/segpath --strict

Every tile and mask is decoded in full, in --workers processes. Exit status 1 when nothing usable
was found, or with --strict when any problem was reported.
"""
import argparse
import sys
from typing import List, Optional

from mmseg_sparsevit.datasets.prepare import default_workers, prepare_segpath
from mmseg_sparsevit.datasets.segpath import SEGPATH_ANTIGENS


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('src_dir', help='folder with the downloaded archives (or unpacked folders) and CSVs')
    parser.add_argument('data_root', help='output root: {data_root}/{antigen}/ tiles + cleaned split CSV')
    parser.add_argument('--antigens', nargs='+',
                        help=f'only these (default: every one found), from {list(SEGPATH_ANTIGENS)}')
    parser.add_argument('--expected-size', type=int, default=984,
                        help='tile side in px every tile must have; 0 disables the check (default: %(default)s)')
    parser.add_argument('--normalise', action='store_true',
                        help='rewrite RGBA tiles as RGB and {0, 255} masks as {0, 1} in data_root')
    parser.add_argument('--workers', type=int, default=default_workers(),
                        help='processes decoding tiles; 1 decodes in this process (default: %(default)s, '
                        'the usable CPUs up to 8)')
    parser.add_argument('--strict', action='store_true', help='exit with status 1 if any problem was found')
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f'--workers must be >= 1, got {args.workers}')
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    report = prepare_segpath(args.src_dir, args.data_root, args.antigens, args.expected_size, args.normalise,
                             args.workers)
    failed = report.usable == 0 or (args.strict and bool(report.problems))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
