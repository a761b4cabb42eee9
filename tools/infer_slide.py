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

from mmseg_sparsevit.slide.batch import report_batch
from mmseg_sparsevit.slide.cli import add_slide_arguments, settings_kwargs, slides_to_run
from mmseg_sparsevit.slide.inference import SlideSettings, build_segmenter, result_table, segment_slides
from mmseg_sparsevit.slide.parallel import init_ranks, rank_device

DEFAULTS = SlideSettings()


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmseg config of this project')
    parser.add_argument('checkpoint', help='checkpoint file')
    add_slide_arguments(parser, DEFAULTS, mpp_help="µm/px to run at (default: the config's model_mpp)")
    parser.add_argument('--no-amp', action='store_true', help='run CUDA in fp32 (CPU always does)')
    parser.add_argument('--window', choices=('cosine', 'linear'), default=DEFAULTS.window, help='blending window')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    slides = slides_to_run(args)
    settings = SlideSettings(**settings_kwargs(args), amp=not args.no_amp, window=args.window)
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
