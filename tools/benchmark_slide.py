"""Whole-slide throughput and peak memory: sparse large tiles vs dense small tiles over the same tissue.

Thin CLI over :mod:`mmseg_sparsevit.slide.benchmark`; see docs/whole_slide.md for the figures.

Example::

    python tools/benchmark_slide.py --width 768 --depth 4 --heads 12     # ViT-B width: one 1344 px tile vs 36 x 224 px
"""
import sys

from mmseg_sparsevit.slide.benchmark import main

if __name__ == '__main__':
    sys.exit(main())
