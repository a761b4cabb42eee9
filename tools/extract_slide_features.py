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

from mmseg_sparsevit.classification.cli import add_model_args, base_config
from mmseg_sparsevit.classification.extraction import EXTRACTION_PRECISIONS, MODES
from mmseg_sparsevit.slide.batch import report_batch
from mmseg_sparsevit.slide.cli import add_slide_arguments, settings_kwargs, slides_to_run
from mmseg_sparsevit.slide.features import EmbeddingSettings, build_embedder, embed_slides, result_table
from mmseg_sparsevit.slide.parallel import init_ranks, rank_device

DEFAULTS = EmbeddingSettings()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_slide_arguments(parser, DEFAULTS, mpp_help='µm/px to embed at (default: %(default)s, 20x)')
    add_model_args(parser)
    parser.add_argument('--mode', default='sparse+prune', choices=MODES, help='attention mode')
    parser.add_argument('--precision', default='auto', choices=EXTRACTION_PRECISIONS,
                        help='auto: bf16 autocast on CUDA (fp16 if unsupported), fp32 on CPU')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    slides = slides_to_run(args)
    ranks = init_ranks(args.device)
    settings = EmbeddingSettings(**settings_kwargs(args), split=args.split)
    args.resize = 'stretch'  # base_config's data argument; tiles are cut at their size, never resized
    embedder = build_embedder(base_config(args, args.tile_size, args.mode), rank_device(args.device), args.precision)
    try:
        results = embed_slides(embedder, slides, args.out_dir, settings, ranks)
    finally:
        ranks.close()
    return report_batch(results, result_table(results), ranks, f'features in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
