"""Draw SparseViT's sparsity: the allowed-attention matrix of a small grid and the pruned tokens of a tile.

1. ``attention_pattern.png``: the (G + N) x (G + N) boolean matrix of which query may attend to which key
   (from the op's reference ``neighbourhood_mask``), next to the keys one query sees on the grid.
2. ``pruned_tokens.png``: an input tile and the same tile with the patch tokens that token pruning
   removes dimmed. Without ``--checkpoint`` the ViT has random weights, so the choice only shows the
   mechanics; with real weights (e.g. UNI-2) it shows what the model keeps.

The figures are drawn by ``mmseg_sparsevit.visualization``.

Example::

    python tools/visualize_sparsity.py --grid 12 --window-size 4 --num-global 1 --out-dir work_dirs/sparsity
    python tools/visualize_sparsity.py --tile tile.png --arch uni2-h --checkpoint pytorch_model.bin
"""
import argparse
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from mmseg_sparsevit.models import SparseViT
from mmseg_sparsevit.models.modes import mode_kwargs
from mmseg_sparsevit.visualization import (attention_pattern_figure, kept_patch_tokens, pruned_tokens_figure,
                                           synthetic_tile)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--grid', type=int, nargs='+', default=[12], help='patch grid H [W] of the pattern')
    parser.add_argument('--window-size', type=int, default=4)
    parser.add_argument('--num-global', type=int, default=1)
    parser.add_argument('--neighbourhood', default='block', choices=['block', 'sliding'])
    parser.add_argument('--query', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                        help='grid cell whose keys are drawn (default: a quarter into the grid)')
    parser.add_argument('--tile', help='RGB tile image; a synthetic H&E-like tile when omitted')
    parser.add_argument('--size', type=int, default=224, help='tile side fed to the model (px)')
    parser.add_argument('--arch', default='uni2-h')
    parser.add_argument('--depth', type=int, help='override the preset depth (random-weight demos)')
    parser.add_argument('--embed-dim', type=int, help='override the preset width (random-weight demos)')
    parser.add_argument('--num-heads', type=int, help='override the preset head count')
    parser.add_argument('--checkpoint', help='timm / hub state dict for the arch (pytorch_model.bin, ...)')
    parser.add_argument('--prune-ratio', type=float, default=0.6)
    parser.add_argument('--prune-after', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out-dir', default='work_dirs/sparsity')
    args = parser.parse_args(argv)
    if len(args.grid) > 2:
        parser.error(f'--grid takes H or H W, got {args.grid}')
    args.grid = tuple((args.grid * 2)[:2])
    if args.query is not None and not (0 <= args.query[0] < args.grid[0] and 0 <= args.query[1] < args.grid[1]):
        parser.error(f'--query {args.query[0]} {args.query[1]} is outside the {args.grid[0]}x{args.grid[1]} grid')
    return args


def load_tile(path: Optional[str], size: int, seed: int) -> np.ndarray:
    if path is None:
        return synthetic_tile(size, seed)
    from PIL import Image
    return np.asarray(Image.open(path).convert('RGB').resize((size, size), Image.BICUBIC))


def main(argv: Optional[List[str]] = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = attention_pattern_figure(args.grid, args.num_global, args.window_size, args.neighbourhood,
                                   None if args.query is None else tuple(args.query))
    fig.savefig(out_dir / 'attention_pattern.png', dpi=130)
    plt.close(fig)

    torch.manual_seed(args.seed)
    base = dict(arch=args.arch, depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                prune_ratio=args.prune_ratio, prune_after=args.prune_after, pretrained=args.checkpoint)
    model = SparseViT(**mode_kwargs(base, 'sparse+prune'))
    model.init_weights()
    tile = load_tile(args.tile, args.size, args.seed)
    kept, grid = kept_patch_tokens(model, tile)
    weights = 'random weights' if args.checkpoint is None else Path(args.checkpoint).name
    fig = pruned_tokens_figure(tile, kept, grid, model.patch_size,
                               f'p={args.prune_ratio}, after block {model.prune_after}; {args.arch}, {weights}',
                               'input tile' + (' (synthetic)' if args.tile is None else ''))
    fig.savefig(out_dir / 'pruned_tokens.png', dpi=130)
    plt.close(fig)
    print(f'wrote {out_dir}/attention_pattern.png and {out_dir}/pruned_tokens.png')


if __name__ == '__main__':
    main()
