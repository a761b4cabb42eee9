"""Write a small synthetic whole-slide image (pyramidal tiled TIFF with known µm/px) for demos and tests.

Example::

    python tools/make_demo_slide.py data/demo_slide/demo_panCK.tiff --size 3072 2048 --mpp 0.5 --mask-png mask.png
"""
import argparse
import sys
from typing import List, Optional

import cv2

from mmseg_sparsevit.datasets.segpath import SEGPATH_ANTIGENS
from mmseg_sparsevit.slide.demo import make_demo_slide


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('path', help='output TIFF')
    parser.add_argument('--size', type=int, nargs=2, default=(3072, 2048), metavar=('W', 'H'),
                        help='level-0 size in px (default: %(default)s)')
    parser.add_argument('--mpp', type=float, default=0.5, help='µm per level-0 px (default: %(default)s)')
    parser.add_argument('--antigen', default='panCK', choices=list(SEGPATH_ANTIGENS), help='cell type drawn')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--mask-png', help='also write the ground-truth {0, 255} mask here')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    _, mask = make_demo_slide(args.path, tuple(args.size), args.mpp, args.antigen, args.seed)
    if args.mask_png and not cv2.imwrite(args.mask_png, mask * 255):
        raise OSError(f'could not write {args.mask_png}')
    print(f'demo slide written to {args.path} ({args.size[0]} x {args.size[1]} px at {args.mpp} µm/px)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
