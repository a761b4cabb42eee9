"""Embed whole-slide images tile by tile with SparseViT for MIL: one HDF5 per slide (CLAM / TRIDENT layout).

Each slide's tissue is tiled at ``--mpp`` into ``--tile-size`` px tiles (any multiple of the ViT patch, e.g.
448-2688 px), every tile is embedded in dense, sparse or sparse+prune mode with the model's prescribed
embedding, and ``<out-dir>/<slide>.h5`` holds ``features`` (N, D) and ``coords`` (N, 2, level-0 px). A rerun
skips finished slides and continues a killed one; ``torchrun`` shares slides or tiles among processes and
writes the same files. See docs/whole_slide.md ("Slide embeddings for MIL").

Examples::

    python tools/extract_slide_features.py slides/ --out-dir work_dirs/feats --arch uni2-h \\
        --weights checkpoints/uni2-h/pytorch_model.bin --mode sparse+prune --tile-size 1344 --device cuda
    torchrun --nproc_per_node 4 tools/extract_slide_features.py slides/ --out-dir feats --arch virchow2 \\
        --weights virchow2.bin --mode sparse --device cuda
    python tools/extract_slide_features.py scan.png --out-dir feats --slide-mpp 0.25 --random-init --arch vit-s
"""
import argparse
import sys
from typing import List, Optional

from mmengine.logging import print_log

from mmseg_sparsevit.classification.cli import add_model_args, base_config
from mmseg_sparsevit.classification.extraction import EXTRACTION_PRECISIONS, MODES
from mmseg_sparsevit.slide import TissueSettings, list_slides
from mmseg_sparsevit.slide.batch import report_batch
from mmseg_sparsevit.slide.features import EmbeddingSettings, build_embedder, embed_slides, result_table
from mmseg_sparsevit.slide.parallel import SPLITS, init_ranks, rank_device

DEFAULTS = EmbeddingSettings()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('slides', nargs='+', help='slide / image files, or folders holding them')
    parser.add_argument('--out-dir', required=True, help='output folder (reruns continue in it)')
    add_model_args(parser)
    parser.add_argument('--mode', default='sparse+prune', choices=MODES, help='attention mode')
    tiles = parser.add_argument_group('tiles')
    tiles.add_argument('--mpp', type=float, default=DEFAULTS.mpp, help='µm/px to embed at (default: %(default)s, 20x)')
    tiles.add_argument('--slide-mpp', type=float,
                       help='µm per level-0 px of the slides, for files whose metadata lacks it (overrides it)')
    tiles.add_argument('--tile-size', type=int, default=DEFAULTS.tile_size,
                       help='tile side in px at --mpp, a multiple of the ViT patch size (default: %(default)s)')
    tiles.add_argument('--overlap', type=int, default=DEFAULTS.overlap, help='overlap of neighbouring tiles in px')
    tiles.add_argument('--min-tissue', type=float, default=DEFAULTS.min_tissue,
                       help='keep tiles whose tissue share exceeds this (default: any tissue)')
    tiles.add_argument('--no-tissue-detection', action='store_true', help='tile the whole image')
    tiles.add_argument('--tissue-mpp', type=float, default=DEFAULTS.tissue.mpp,
                       help='µm/px of the thumbnail tissue is detected on (default: %(default)s)')
    run = parser.add_argument_group('runtime')
    run.add_argument('--batch-size', type=int, default=DEFAULTS.batch_size, help='tiles per forward')
    run.add_argument('--workers', type=int, default=DEFAULTS.num_workers, help='DataLoader workers reading tiles')
    run.add_argument('--device', default='cpu', help="'cpu', 'cuda' (under torchrun: each process its GPU), 'cuda:N'")
    run.add_argument('--precision', default='auto', choices=EXTRACTION_PRECISIONS,
                     help='auto: bf16 autocast on CUDA (fp16 if unsupported), fp32 on CPU')
    run.add_argument('--checkpoint-every', type=int, default=DEFAULTS.checkpoint_every,
                     help='tiles between saves of a slide in progress (default: %(default)s)')
    run.add_argument('--split', choices=SPLITS, default=DEFAULTS.split,
                     help='torchrun: whole slides per process, the tiles of each slide, or auto (default)')
    run.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    slides = list_slides(args.slides)
    if not slides:
        print_log(f'no slides found in {args.slides}', logger='current', level=40)
        return 1
    ranks = init_ranks(args.device)
    settings = EmbeddingSettings(
        mpp=args.mpp, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
        num_workers=args.workers, slide_mpp=args.slide_mpp,
        tissue=None if args.no_tissue_detection else TissueSettings(mpp=args.tissue_mpp), min_tissue=args.min_tissue,
        checkpoint_every=args.checkpoint_every, split=args.split, progress=not args.no_progress)
    args.resize = 'stretch'  # base_config's data argument; tiles are cut at their size, never resized
    embedder = build_embedder(base_config(args, args.tile_size, args.mode), rank_device(args.device), args.precision)
    try:
        results = embed_slides(embedder, slides, args.out_dir, settings, ranks)
    finally:
        ranks.close()
    return report_batch(results, result_table(results), ranks, f'features in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
