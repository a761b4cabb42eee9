"""Draw SparseViT's sparsity: the allowed-attention matrix of a small grid and the pruned tokens of a tile.

1. ``attention_pattern.png``: the (G + N) x (G + N) boolean matrix of which query may attend to which key
   (from the op's reference ``neighbourhood_mask``), next to the keys one query sees on the grid.
2. ``pruned_tokens.png``: an input tile and the same tile with the patch tokens that token pruning
   removes dimmed. Without ``--checkpoint`` the ViT has random weights, so the choice only shows the
   mechanics; with real weights (e.g. UNI-2) it shows what the model keeps.

Example::

    python tools/visualize_sparsity.py --grid 12 --window-size 4 --num-global 1 --out-dir work_dirs/sparsity
    python tools/visualize_sparsity.py --tile tile.png --arch uni2-h --checkpoint pytorch_model.bin
"""
import argparse
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch


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
    height, width = (args.grid * 2)[:2]
    if args.query is not None and not (0 <= args.query[0] < height and 0 <= args.query[1] < width):
        parser.error(f'--query {args.query[0]} {args.query[1]} is outside the {height}x{width} grid')
    return args


def synthetic_tile(size: int, seed: int = 0) -> np.ndarray:
    """H&E-like RGB tile: pink stroma, purple nuclei clusters, and a band of empty white glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    tile = np.empty((size, size, 3), dtype=np.float32)
    tile[:] = (232, 178, 206)
    tile += rng.normal(0, 6, tile.shape)
    for _ in range(size // 4):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(size / 90, size / 45, 2)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        tile[blob] = (96, 52, 140)
    glass = xx + 0.4 * yy > 1.05 * size
    tile[glass] = 246 + rng.normal(0, 2, (int(glass.sum()), 3))
    return tile.clip(0, 255).astype(np.uint8)


def load_tile(path: Optional[str], size: int, seed: int) -> np.ndarray:
    if path is None:
        return synthetic_tile(size, seed)
    from PIL import Image
    return np.asarray(Image.open(path).convert('RGB').resize((size, size), Image.BICUBIC))


def draw_attention_pattern(args: argparse.Namespace, path: Path) -> None:
    import matplotlib.pyplot as plt
    from mmseg_sparsevit.ops import neighbourhood_mask

    height, width = (args.grid * 2)[:2]
    G = args.num_global
    mask = neighbourhood_mask((height, width), G, args.window_size, args.neighbourhood)[0].numpy()
    row, col = args.query or (height // 4, width // 4)
    keys = mask[G + row * width + col, G:].reshape(height, width)

    fig, (ax_m, ax_q) = plt.subplots(1, 2, figsize=(11, 5.4), gridspec_kw=dict(width_ratios=[1.25, 1]),
                                     layout='constrained')
    ax_m.imshow(mask, cmap='Blues', interpolation='nearest', vmin=0, vmax=1.4)
    ax_m.axhline(G - 0.5, color='tab:red', lw=0.8)
    ax_m.axvline(G - 0.5, color='tab:red', lw=0.8)
    ax_m.set(title=f'allowed attention, {height}x{width} grid, window {args.window_size} ({args.neighbourhood}),'
                   f' G={G}\n{mask.mean():.1%} of {mask.size} query-key pairs',
             xlabel='key token (globals first, then patches row-major)', ylabel='query token')
    ax_q.imshow(keys, cmap='Blues', interpolation='nearest', vmin=0, vmax=1.4)
    ax_q.scatter([col], [row], marker='*', s=160, color='tab:red', label='query')
    ax_q.set_xticks(np.arange(-0.5, width, args.window_size), minor=False)
    ax_q.set_yticks(np.arange(-0.5, height, args.window_size), minor=False)
    ax_q.grid(True, color='grey', lw=0.6)
    ax_q.set(title=f'keys of patch ({row}, {col}) (+ all {G} global tokens)', xticklabels=[], yticklabels=[])
    ax_q.legend(loc='upper right')
    fig.savefig(path, dpi=130)
    plt.close(fig)


def kept_tokens(args: argparse.Namespace, tile: np.ndarray) -> tuple:
    """Run SparseViT with token pruning on the tile; return (kept grid positions, grid (H, W), model)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from mmseg_sparsevit.models import SparseViT

    torch.manual_seed(args.seed)
    model = SparseViT(args.arch, depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                      attn_mode='sparse', token_pruning=True, prune_ratio=args.prune_ratio,
                      prune_after=args.prune_after, pretrained=args.checkpoint).eval()
    model.init_weights()
    x = torch.from_numpy(tile).permute(2, 0, 1).float()[None] / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]) / torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    with torch.no_grad():
        out = model.forward_tokens(x)
    return out.kept_index[0].numpy(), out.grid_hw, model


def draw_pruned_tokens(args: argparse.Namespace, path: Path) -> None:
    import matplotlib.pyplot as plt

    size = args.size
    tile = load_tile(args.tile, size, args.seed)
    kept, (height, width), model = kept_tokens(args, tile)
    patch = model.patch_size
    keep_grid = np.zeros(height * width, dtype=bool)
    keep_grid[kept] = True
    dim = np.kron(~keep_grid.reshape(height, width), np.ones((patch, patch), dtype=bool))
    shown = tile.astype(np.float32)
    shown[dim] = shown[dim] * 0.25 + 20
    weights = 'random weights' if args.checkpoint is None else Path(args.checkpoint).name

    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(10, 5.6), layout='constrained')
    ax_t.imshow(tile)
    ax_t.set_title('input tile' + (' (synthetic)' if args.tile is None else ''))
    ax_p.imshow(shown.clip(0, 255).astype(np.uint8))
    ax_p.set_xticks(np.arange(0, size + 1, patch) - 0.5)
    ax_p.set_yticks(np.arange(0, size + 1, patch) - 0.5)
    ax_p.grid(True, color='white', lw=0.3, alpha=0.5)
    ax_p.set(xticklabels=[], yticklabels=[],
             title=f'kept {len(kept)} of {height * width} tokens (p={args.prune_ratio}, after block '
                   f'{model.prune_after})\n{args.arch}, {weights}')
    ax_t.set(xticks=[], yticks=[])
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw_attention_pattern(args, out_dir / 'attention_pattern.png')
    draw_pruned_tokens(args, out_dir / 'pruned_tokens.png')
    print(f'wrote {out_dir}/attention_pattern.png and {out_dir}/pruned_tokens.png')


if __name__ == '__main__':
    main()
