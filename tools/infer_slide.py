"""Segment whole-slide images at full resolution with a config + checkpoint of this project.

Writes, per slide, a pyramidal class-map TIFF (OpenSlide / QuPath open it), a QuPath GeoJSON of the classes
in level-0 px, an overlay PNG and a summary JSON; ``slides.json`` lists every slide's status. A rerun skips
finished slides and continues a killed one from its last saved tile. See docs/whole_slide.md.

Examples::

    python tools/infer_slide.py CONFIG CKPT slides/ --out-dir work_dirs/slides
    python tools/infer_slide.py CONFIG CKPT a.svs b.ndpi --out-dir out --tile-size 1344 --overlap 112 --device cuda
    python tools/infer_slide.py CONFIG CKPT scan.png --out-dir out --slide-mpp 0.25   # no µm/px in the file
    torchrun --nproc_per_node 4 tools/infer_slide.py CONFIG CKPT slides/ --out-dir out --device cuda  # 4 GPUs
"""
import argparse
import sys
from typing import List, Optional

from mmengine.config import DictAction
from mmengine.logging import print_log

from mmseg_sparsevit.slide import TissueSettings, list_slides
from mmseg_sparsevit.slide.batch import report_batch
from mmseg_sparsevit.slide.inference import SlideSettings, build_segmenter, result_table, segment_slides
from mmseg_sparsevit.slide.parallel import SPLITS, init_ranks, rank_device

DEFAULTS = SlideSettings()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmseg config of this project')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('slides', nargs='+', help='slide / image files, or folders holding them')
    parser.add_argument('--out-dir', required=True, help='output folder (reruns continue in it)')
    parser.add_argument('--mpp', type=float, help="µm/px to run at (default: the config's model_mpp)")
    parser.add_argument('--slide-mpp', type=float,
                        help='µm per level-0 px of the slides, for files whose metadata lacks it (overrides it)')
    parser.add_argument('--tile-size', type=int, default=DEFAULTS.tile_size,
                        help='tile side in px at --mpp, a multiple of the ViT patch size (default: %(default)s)')
    parser.add_argument('--overlap', type=int, default=DEFAULTS.overlap,
                        help='overlap of neighbouring tiles in px, blended (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=DEFAULTS.batch_size, help='tiles per forward')
    parser.add_argument('--workers', type=int, default=DEFAULTS.num_workers, help='DataLoader workers reading tiles')
    parser.add_argument('--device', default='cpu',
                        help="'cpu', 'cuda' (under torchrun: each process its GPU) or 'cuda:N'")
    parser.add_argument('--split', choices=SPLITS, default='auto',
                        help='torchrun: whole slides per process, the tiles of each slide, or auto (default)')
    parser.add_argument('--no-amp', action='store_true', help='run CUDA in fp32 (CPU always does)')
    parser.add_argument('--min-tissue', type=float, default=DEFAULTS.min_tissue,
                        help='keep tiles whose tissue share exceeds this (default: any tissue)')
    parser.add_argument('--no-tissue-detection', action='store_true',
                        help='tile the whole image (regions of interest, TMA cores: all tissue)')
    parser.add_argument('--tissue-mpp', type=float, default=DEFAULTS.tissue.mpp,
                        help='µm/px of the thumbnail tissue is detected on (default: %(default)s)')
    parser.add_argument('--window', choices=('cosine', 'linear'), default=DEFAULTS.window, help='blending window')
    parser.add_argument('--checkpoint-every', type=int, default=DEFAULTS.checkpoint_every,
                        help='tiles between saves of a slide in progress (default: %(default)s)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    slides = list_slides(args.slides)
    if not slides:
        print_log(f'no slides found in {args.slides}', logger='current', level=40)
        return 1
    settings = SlideSettings(
        mpp=args.mpp, tile_size=args.tile_size, overlap=args.overlap, batch_size=args.batch_size,
        num_workers=args.workers, amp=not args.no_amp, slide_mpp=args.slide_mpp,
        tissue=None if args.no_tissue_detection else TissueSettings(mpp=args.tissue_mpp),
        min_tissue=args.min_tissue, window=args.window,
        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    ranks = init_ranks(args.device)
    try:
        segmenter = build_segmenter(args.config, args.checkpoint, rank_device(args.device), amp=settings.amp,
                                    cfg_options=args.cfg_options)
        results = segment_slides(segmenter, slides, args.out_dir, settings, ranks, args.split)
    finally:
        ranks.close()
    return report_batch(results, result_table(results), ranks, f'outputs in {args.out_dir}')


if __name__ == '__main__':
    sys.exit(main())
