"""Extract frozen SparseViT embeddings (the model's prescribed embedding, CLS token, mean patch token) of a dataset.

One input size and attention mode per call; the output ``.npz`` is resumable: rerunning the same
command after an interruption continues where it stopped (see docs/feature_extraction.md).

Example (UNI-2 on PANDA ROIs at 896 px, sparse attention + token pruning)::

    python tools/extract_features.py --data-root data/panda --ann-file data/panda/labels.csv \\
        --weights checkpoints/uni2-h/pytorch_model.bin --size 896 --mode sparse+prune \\
        --out work_dirs/panda/features/sparse+prune_896.npz
"""
import argparse
from typing import List, Optional

from mmseg_sparsevit.classification.cli import add_extraction_args, base_config, extract_kwargs
from mmseg_sparsevit.classification.dataset import load_samples
from mmseg_sparsevit.classification.extraction import MODES, extract_features


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_extraction_args(parser)
    parser.add_argument('--size', type=int, required=True, help='input side in px (multiple of the patch size)')
    parser.add_argument('--mode', default='sparse+prune', choices=MODES)
    parser.add_argument('--out', required=True, help='output feature file (.npz)')
    parser.add_argument('--max-batches', type=int, help='stop after this many batches (the run stays resumable)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    samples, class_names = load_samples(args.data_root, args.ann_file)
    return extract_features(base_config(args, args.size, args.mode), samples, class_names, args.out,
                            max_batches=args.max_batches, **extract_kwargs(args))


if __name__ == '__main__':
    main()
