"""Command-line options both slide tools share (tiling, tissue, runtime), and the settings they give.

``tools/infer_slide.py`` and ``tools/extract_slide_features.py`` add their own options (model, outputs) and
build their settings class (``SlideSettings`` / ``EmbeddingSettings``) from :func:`settings_kwargs`.
"""
import argparse
from typing import Any, Dict, List

from mmengine.logging import print_log

from .parallel import SPLITS
from .reader import list_slides
from .tissue import TissueSettings


def add_slide_arguments(parser: argparse.ArgumentParser, defaults: Any, mpp_help: str) -> None:
    """The options of :func:`settings_kwargs`; ``defaults`` is the tool's settings instance."""
    parser.add_argument('slides', nargs='+', help='slide / image files, or folders holding them')
    parser.add_argument('--out-dir', required=True, help='output folder (reruns continue in it)')
    tiles = parser.add_argument_group('tiles')
    tiles.add_argument('--mpp', type=float, default=defaults.mpp, help=mpp_help)
    tiles.add_argument('--slide-mpp', type=float,
                       help='µm per level-0 px of the slides, for files whose metadata lacks it (overrides it)')
    tiles.add_argument('--tile-size', type=int, default=defaults.tile_size,
                       help='tile side in px at --mpp, a multiple of the ViT patch size (default: %(default)s)')
    tiles.add_argument('--overlap', type=int, default=defaults.overlap,
                       help='overlap of neighbouring tiles in px (default: %(default)s)')
    tiles.add_argument('--min-tissue', type=float, default=defaults.min_tissue,
                       help='keep tiles whose tissue share exceeds this (default: any tissue)')
    tiles.add_argument('--no-tissue-detection', action='store_true',
                       help='tile the whole image (regions of interest, TMA cores: all tissue)')
    tiles.add_argument('--tissue-mpp', type=float, default=defaults.tissue.mpp,
                       help='µm/px of the thumbnail tissue is detected on (default: %(default)s)')
    run = parser.add_argument_group('runtime')
    run.add_argument('--batch-size', type=int, default=defaults.batch_size, help='tiles per forward')
    run.add_argument('--workers', type=int, default=defaults.num_workers, help='DataLoader workers reading tiles')
    run.add_argument('--device', default='cpu', help="'cpu', 'cuda' (under torchrun: each process its GPU), 'cuda:N'")
    run.add_argument('--checkpoint-every', type=int, default=defaults.checkpoint_every,
                     help='tiles between saves of a slide in progress (default: %(default)s)')
    run.add_argument('--split', choices=SPLITS, default='auto',
                     help='torchrun: whole slides per process, the tiles of each slide, or auto (default)')
    run.add_argument('--no-progress', action='store_true', help='no progress bar')


def settings_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings fields both tools take, from the options of :func:`add_slide_arguments`."""
    return dict(mpp=args.mpp, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
                num_workers=args.workers, slide_mpp=args.slide_mpp, min_tissue=args.min_tissue,
                tissue=None if args.no_tissue_detection else TissueSettings(mpp=args.tissue_mpp),
                checkpoint_every=args.checkpoint_every, progress=not args.no_progress)


def slides_to_run(args: argparse.Namespace) -> List[str]:
    """The slides the options name (folders expanded); exits with status 1, as argparse does, when there are none."""
    slides = list_slides(args.slides)
    if not slides:
        print_log(f'no slides found in {args.slides}', logger='current', level=40)
        raise SystemExit(1)
    return slides
