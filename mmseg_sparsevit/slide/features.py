"""Region embeddings of whole slides for multiple-instance learning: one HDF5 per slide, CLAM / TRIDENT layout.

slide -> tissue mask -> tile grid at the target µm/px (tiles of any multiple of the ViT patch, e.g. 1344 px)
-> tiles read in DataLoader workers -> SparseViT in dense, sparse or sparse+prune mode, under the precision
of ``models.modes`` (autocast on GPU) -> the model's prescribed embedding (``SparseViT.pool``) per tile ->
``<stem>.h5`` with

- ``features`` (N, D) float32 and ``coords`` (N, 2) int64, the top-left (x, y) of each tile in level-0 px,
  the two datasets CLAM and TRIDENT write, so MIL code (CLAM, ABMIL, TransMIL, TRIDENT's slide encoders)
  reads them unchanged;
- on ``coords`` the attributes those tools read: CLAM's ``patch_size``, ``patch_level``, ``downsample``,
  ``level_dim``, ``downsampled_level_dim``, ``name``; TRIDENT's ``patch_size`` (px at the target resolution),
  ``patch_size_level0``, ``level0_magnification`` / ``target_magnification`` (10 / µm per px, the 40x =
  0.25 µm/px convention), ``level0_width`` / ``level0_height``, ``overlap``; and ``mpp`` / ``slide_mpp``;
- on ``features`` and the file: the encoder (arch, mode, window size, prune ratio, embedding recipe,
  precision, weights).

A slide in progress keeps ``<stem>.partial.npz`` (the features so far and which tiles they cover, replaced
atomically every ``checkpoint_every`` tiles); a rerun continues from it, skips slides whose ``.h5`` exists,
and gives the file an uninterrupted run gives. Several processes (``torchrun``) share slides or the tiles of
each slide (:mod:`.parallel`) and write the same files as one process.
"""
import json
import os
import os.path as osp
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from mmengine.logging import print_log

from mmseg_sparsevit.classification.extraction import ExtractionConfig, build_backbone
from mmseg_sparsevit.engine.run_lock import locked_work_dir
from mmseg_sparsevit.models.modes import autocast, describe_precision, is_pruned, is_sparse, resolve_precision
from mmseg_sparsevit.models.presets import IMAGENET_MEAN, IMAGENET_STD, PRETRAINED
from mmseg_sparsevit.models.sparse_vit import SparseViT

from .batch import SlideResult, check_unique_stems, run_fingerprint, run_slides, slide_stem
from .dataset import run_tiles
from .inference import peak_memory_gb
from .parallel import SINGLE, Ranks
from .reader import open_slide
from .tiling import TileGrid, check_tile_size, plan_tiles
from .tissue import TissueSettings, tissue_mask
from .writers import atomic_path, read_state, write_state

LOCK_NAME = '.extract_slide_features.lock'
_STATE_VERSION = 1
UM_PER_PX_AT_1X = 10.0  # magnification = 10 / (µm per px): 40x = 0.25 µm/px, 20x = 0.5 µm/px


@dataclass(frozen=True)
class EmbeddingSettings:
    """How slides are tiled and run. Sizes are px at the target µm/px."""

    mpp: float = 0.5  # target µm/px (20x, the resolution the pathology foundation models were trained at)
    tile_size: int = 1344
    overlap: int = 0
    batch_size: int = 1
    num_workers: int = 2
    slide_mpp: Optional[float] = None  # µm per level-0 px when the metadata lacks it (overrides it if given)
    tissue: Optional[TissueSettings] = field(default_factory=TissueSettings)  # None: all of the slide is tissue
    min_tissue: float = 0.0  # keep tiles whose tissue share exceeds this
    checkpoint_every: int = 32  # tiles between saves of a slide in progress (all ranks together)
    split: str = 'auto'  # how torchrun ranks share the work: 'slides', 'tiles' or 'auto' (see .parallel)
    progress: bool = True


class TileEmbedder:
    """The prescribed embedding (``model.pool``) of (B, h, w, 3) uint8 RGB tiles, as (B, D) float32.

    Tiles are scaled to 0-1 and normalised with ``mean`` / ``std`` (the preset's constants), and the forward
    runs under ``precision`` (a ``models.modes.PRECISIONS`` name, fp32 weights)."""

    def __init__(self, model: SparseViT, mean: Sequence[float], std: Sequence[float], precision: str = 'fp32',
                 name: str = 'sparsevit', attrs: Optional[Dict[str, Any]] = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.precision = precision
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.patch_size = model.patch_size
        self.dim = model.embed_dim * (2 if model.global_pool == 'token+avg' else 1)
        self.name = name
        self.attrs = dict(attrs or {}, embedding_recipe=model.global_pool, precision=precision, feature_dim=self.dim)

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        x = (x - self.mean) / self.std
        with autocast(self.precision, self.device.type):
            tokens = self.model.forward_tokens(x).tokens
            embedding = self.model.pool(tokens)
        return embedding.float().cpu().numpy()


def build_embedder(cfg: ExtractionConfig, device: str = 'cpu', precision: str = 'auto') -> TileEmbedder:
    """SparseViT of ``cfg`` (arch, overrides, weights, mode, window, pruning; ``cfg.size`` = the tile size) on
    ``device`` at ``precision`` (``auto``: bf16 autocast on CUDA, fp32 on CPU), normalising like its preset."""
    dev = torch.device(device)
    precision = resolve_precision(precision, dev)
    model = build_backbone(cfg).to(dev)
    card = PRETRAINED.get(cfg.arch)
    mean, std = (card.mean, card.std) if card else (IMAGENET_MEAN, IMAGENET_STD)
    attrs: Dict[str, Any] = dict(arch=cfg.arch, mode=cfg.mode, weights=cfg.weights or f'random (seed {cfg.seed})',
                                 arch_overrides=json.dumps(cfg.arch_overrides, sort_keys=True),
                                 mean=list(mean), std=list(std))
    if is_sparse(cfg.mode):
        attrs['window_size'] = cfg.window_size
    if is_pruned(cfg.mode):
        attrs.update(prune_ratio=cfg.prune_ratio, prune_after=cfg.prune_after)
    name = f'{cfg.arch}:{cfg.mode}:{osp.basename(cfg.weights) if cfg.weights else f"random{cfg.seed}"}'
    print_log(f'embedding with {name} ({describe_precision(precision)}, recipe {model.global_pool})',
              logger='current')
    return TileEmbedder(model, mean, std, precision, name, attrs)


def features_path(out_dir: str, stem: str) -> str:
    return osp.join(out_dir, f'{stem}.h5')


def partial_path(out_dir: str, stem: str) -> str:
    return osp.join(out_dir, f'{stem}.partial.npz')


class PartialSlide:
    """Features of a slide in progress (rank 0's copy) and their atomic save / restore."""

    def __init__(self, path: str, num_tiles: int, dim: int, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.features = np.zeros((num_tiles, dim), np.float32)
        self.done = np.zeros(num_tiles, bool)
        state = read_state(path, fingerprint, required=('features', 'done'))
        if state is not None:
            self.features, self.done = state['features'], state['done']

    def add(self, indices: np.ndarray, features: np.ndarray) -> None:
        self.features[indices] = features
        self.done[indices] = True

    def save(self) -> None:
        write_state(self.path, self.fingerprint, dict(features=self.features, done=self.done))

    def remove(self) -> None:
        if osp.exists(self.path):
            os.remove(self.path)


def coords_attrs(grid: TileGrid, reader, stem: str) -> Dict[str, Any]:
    """The ``coords`` attributes of CLAM (``patch_size``, ``patch_level``, ...) and TRIDENT (``patch_size_level0``,
    magnifications, ...) for tiles of ``grid`` read from ``reader``."""
    level = reader.best_level(min(grid.downsample))
    width, height = reader.dimensions
    return dict(
        name=stem, patch_size=grid.tile_size, patch_size_level0=int(round(grid.level0_tile_size[0])),
        patch_level=level, downsample=list(grid.downsample), level_dim=list(reader.level_dimensions[level]),
        downsampled_level_dim=list(grid.canvas_size), level0_width=width, level0_height=height,
        overlap=grid.overlap, mpp=grid.mpp, slide_mpp=list(reader.mpp),
        target_magnification=UM_PER_PX_AT_1X / grid.mpp, level0_magnification=UM_PER_PX_AT_1X / reader.mpp[0])


def _h5_value(value: Any) -> Any:
    """An HDF5-storable attribute: dicts as JSON text, tuples as lists."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return list(value) if isinstance(value, tuple) else value


def write_features_h5(path: str, features: np.ndarray, coords: np.ndarray, coords_info: Dict[str, Any],
                      encoder_info: Dict[str, Any]) -> None:
    """``features`` (N, D) float32 and ``coords`` (N, 2) int64 with their attributes, atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, 'w') as f:
            feats = f.create_dataset('features', data=np.asarray(features, np.float32))
            dset = f.create_dataset('coords', data=np.asarray(coords, np.int64))
            for key, value in coords_info.items():
                dset.attrs[key] = _h5_value(value)
            for key, value in encoder_info.items():
                feats.attrs[key] = f.attrs[key] = _h5_value(value)


def read_features_h5(path: str) -> Dict[str, Any]:
    """``features``, ``coords`` and the attributes of ``coords`` / ``features`` of a file written here."""
    with h5py.File(path, 'r') as f:
        return dict(features=f['features'][:], coords=f['coords'][:], coords_attrs=dict(f['coords'].attrs),
                    features_attrs=dict(f['features'].attrs))


def embed_slide(embedder: Callable, path: str, out_dir: str, settings: EmbeddingSettings = EmbeddingSettings(),
                ranks: Ranks = SINGLE, on_round: Optional[Callable[[int], None]] = None) -> SlideResult:
    """Embed one slide into ``out_dir/<stem>.h5`` (see the module docstring); skip it when that file exists.

    ``embedder`` is a :class:`TileEmbedder` or any callable with its attributes (``patch_size``, ``dim``,
    ``name``, ``attrs``). With several ``ranks`` every rank calls this for the slide and embeds its share of
    the tiles; rank 0 writes. ``on_round(tiles_done)`` runs on rank 0 after each save of the partial state (tests
    use it to simulate a kill)."""
    stem = slide_stem(path)
    final = features_path(out_dir, stem)
    if osp.isfile(final):
        with h5py.File(final, 'r') as f:
            num = len(f['coords'])
        return SlideResult(path, 'skipped', 'finished earlier', {'h5': final}, dict(tiles=num))
    check_tile_size(settings.tile_size, embedder.patch_size)
    start = time.perf_counter()
    with open_slide(path, settings.slide_mpp) as reader:
        tissue = tissue_mask(reader, settings.tissue)[0] if settings.tissue is not None else None
        grid = plan_tiles(reader.dimensions, reader.mpp, settings.mpp, settings.tile_size, settings.overlap,
                          tissue, settings.min_tissue)
        width, height = reader.dimensions
        tissue_mm2 = tissue.area_mm2 if tissue is not None else width * height * reader.mpp[0] * reader.mpp[1] * 1e-6
        coords_info = coords_attrs(grid, reader, stem)
    summary: Dict[str, Any] = dict(slide=osp.abspath(path), mpp=grid.mpp, tile_size=grid.tile_size,
                                   overlap=grid.overlap, tiles=len(grid), tissue_area_mm2=round(tissue_mm2, 4),
                                   model=embedder.name)
    if len(grid) == 0:
        return SlideResult(path, 'no_tissue', 'no tissue found: nothing to embed', {}, summary)

    partial = None
    if ranks.is_main:
        os.makedirs(out_dir, exist_ok=True)
        partial = PartialSlide(partial_path(out_dir, stem), len(grid), embedder.dim,
                               run_fingerprint(path, grid, version=_STATE_VERSION, model=embedder.name,
                                               attrs=embedder.attrs))
    done = ranks.broadcast(None if partial is None else partial.done)
    todo = np.flatnonzero(~done)
    resumed = len(grid) - len(todo)
    run_start = time.perf_counter()
    for save_now, indices, features in run_tiles(embedder, path, grid, todo, settings, ranks, stem):
        partial.add(indices, features)
        if save_now:
            partial.save()
            if on_round is not None:
                on_round(int(partial.done.sum()))
    run_time = time.perf_counter() - run_start
    if partial is None:
        return SlideResult(path, 'done', f'{len(grid)} tiles (written by rank 0)', {'h5': final}, summary)
    assert partial.done.all(), 'every tile was embedded'
    write_features_h5(final, partial.features, grid.level0_coords(), coords_info,
                      dict(embedder.attrs, encoder=embedder.name, tile_size=grid.tile_size, mpp=grid.mpp))
    partial.remove()
    new = len(todo)
    summary.update(feature_dim=embedder.dim, tiles_resumed=resumed, time_s=round(time.perf_counter() - start, 2),
                   tiles_per_s=round(new / run_time, 3) if run_time > 0 else None,
                   tissue_mm2_per_s=round(tissue_mm2 * new / len(grid) / run_time, 4) if run_time > 0 else None,
                   peak_memory=peak_memory_gb(), processes=ranks.world_size)
    return SlideResult(path, 'done', f'{len(grid)} tiles', {'h5': final}, summary)


def embed_slides(embedder: Callable, paths: Sequence[str], out_dir: str,
                 settings: EmbeddingSettings = EmbeddingSettings(), ranks: Ranks = SINGLE) -> List[SlideResult]:
    """Embed each slide; an unreadable, tissue-free or failing slide is reported and the batch goes on.

    Holds a lock on ``out_dir`` (a second extraction into it refuses). Rank 0 writes ``out_dir/slides.json``
    listing every slide's status; every rank returns the full list."""
    check_unique_stems(paths)
    check_tile_size(settings.tile_size, embedder.patch_size)
    with locked_work_dir(out_dir, LOCK_NAME, 'slide feature folder'):
        return run_slides(lambda path, job_ranks: embed_slide(embedder, path, out_dir, settings, job_ranks),
                          paths, out_dir, ranks, settings.split)


def result_table(results: Sequence[SlideResult]) -> str:
    """A plain-text table of slide, status, tiles, tissue mm², tiles/s and the output or the message."""
    rows: List[Tuple[str, ...]] = [('slide', 'status', 'tiles', 'tissue mm2', 'tiles/s', 'output / message')]
    for r in results:
        out = r.outputs.get('h5', '') if r.status in ('done', 'skipped') else r.message
        rows.append((osp.basename(r.slide), r.status, str(r.summary.get('tiles', '')),
                     str(r.summary.get('tissue_area_mm2', '')), str(r.summary.get('tiles_per_s', '')), out))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row[:5], widths)) + '  ' + row[5] for row in rows)


__all__ = ['EmbeddingSettings', 'TileEmbedder', 'build_embedder', 'embed_slide', 'embed_slides', 'features_path',
           'partial_path', 'read_features_h5', 'write_features_h5', 'coords_attrs', 'result_table', 'LOCK_NAME']
