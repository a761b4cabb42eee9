"""Command-line arguments shared by ``tools/extract_features.py``, ``eval_features.py`` and ``sweep_resolution.py``.

Model overrides: patch size, depth, width and heads on top of the ``--arch`` preset. A sweep's time/memory
measurement (``sweep.benchmark_measure``) builds its network from the same ``ExtractionConfig`` as extraction.
"""
import argparse
from typing import Any, Dict

import torch

from .dataset import RESIZE_MODES
from .extraction import EXTRACTION_PRECISIONS, ExtractionConfig
from .probing import DEFAULT_C_GRID, FEATURE_KINDS, KNN_K

ARCH_OVERRIDES = ('patch_size', 'depth', 'embed_dim', 'num_heads')


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('data')
    group.add_argument('--data-root', required=True, help='image folder (CSV paths are relative to it)')
    group.add_argument('--ann-file', help='CSV with image,label[,split]; without it: class sub-folders')
    group.add_argument('--resize', default='stretch', choices=RESIZE_MODES,
                       help='stretch: whole ROI to size x size (paper); pad: fit + pad; center-crop: fill + crop')


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model')
    group.add_argument('--arch', default='uni2-h', help='SparseViT preset (uni2-h, uni, virchow2, vit-s, ...)')
    for name in ARCH_OVERRIDES:
        group.add_argument(f'--{name.replace("_", "-")}', type=int, help=f'override the preset {name}')
    weights = group.add_mutually_exclusive_group(required=True)
    weights.add_argument('--weights', help='local timm/hub checkpoint (.bin, .pth, .safetensors)')
    weights.add_argument('--random-init', action='store_true', help='random weights seeded by --seed (tests)')
    group.add_argument('--seed', type=int, default=0, help='random-init and evaluation seed')
    group.add_argument('--prune-ratio', type=float, default=0.6, help='fraction of patch tokens removed')
    group.add_argument('--prune-after', type=int, default=4, help='prune after this many blocks')
    group.add_argument('--window-size', type=int, default=8, help='sparse attention window (patches)')


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('runtime')
    group.add_argument('--batch-size', type=int, default=8)
    group.add_argument('--num-workers', type=int, default=4, help='data loader worker processes')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    group.add_argument('--precision', default='auto', choices=EXTRACTION_PRECISIONS,
                       help='fp32 weights, autocast dtype amp-*; auto = amp-bf16 (amp-fp16 if unsupported) on CUDA, '
                       'fp32 on CPU')
    group.add_argument('--overwrite', action='store_true', help='discard existing or unfinished results')


def add_extraction_args(parser: argparse.ArgumentParser) -> None:
    """Data, model and runtime arguments: everything an extraction run needs besides size and mode."""
    add_data_args(parser)
    add_model_args(parser)
    add_runtime_args(parser)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('evaluation')
    group.add_argument('--feature', choices=FEATURE_KINDS,
                       help="embedding to probe (default: the model's prescribed 'embedding', cls for files without)")
    group.add_argument('--c-grid', type=float, nargs='+', default=list(DEFAULT_C_GRID),
                       help='LogisticRegression C values tried on the val split')
    group.add_argument('--knn-k', type=int, default=KNN_K, help='neighbours (clamped to the train size)')
    group.add_argument('--val-fraction', type=float, default=0.2, help='held out of train when no val split')
    group.add_argument('--test-fraction', type=float, default=0.25, help='held out of train when no test split')


def base_config(args: argparse.Namespace, size: int, mode: str) -> ExtractionConfig:
    """The extraction config described by ``add_data_args`` + ``add_model_args`` for one size and mode."""
    overrides = {k: getattr(args, k) for k in ARCH_OVERRIDES if getattr(args, k) is not None}
    return ExtractionConfig(
        size=size, mode=mode, prune_ratio=args.prune_ratio, prune_after=args.prune_after,
        window_size=args.window_size, resize=args.resize, arch=args.arch, arch_overrides=overrides,
        weights=args.weights, seed=args.seed)


def extract_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, precision=args.precision,
                overwrite=args.overwrite)


def eval_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(feature=args.feature, c_grid=args.c_grid, knn_k=args.knn_k, val_fraction=args.val_fraction,
                test_fraction=args.test_fraction, seed=args.seed)
