"""Whole-slide segmentation at full resolution with any mmseg config + checkpoint of this project.

slide -> tissue mask -> tile grid at the model's µm/px -> tiles read in DataLoader workers -> the model's
own data preprocessor and ``predict`` (AMP on GPU) -> blended scores -> class map -> outputs:

- ``<stem>.classes.tiff``: pyramidal tiled palette TIFF of class indices at the target µm/px (255: not
  analysed), resolution tags set, opened by OpenSlide and QuPath;
- ``<stem>.geojson``: one QuPath annotation per class (MultiPolygon, level-0 px);
- ``<stem>.overlay.png``: the slide (at the target µm/px, at most ``overlay_max_side`` px) with the classes
  painted in; ``<stem>.tiles.png``: the same view with the tissue outline and the tiles that were run;
- ``<stem>.summary.json``: areas in mm², tiles, time, peak memory. Written last: its presence marks a slide
  done, so a rerun skips it.

A slide in progress keeps ``<stem>.partial/`` (class map as a memory-mapped ``.npy`` plus the stitcher's
blocks in progress, saved atomically every ``checkpoint_every`` tiles); a rerun continues from there and
gives the same outputs as an uninterrupted run.
"""
import contextlib
import json
import logging
import os
import os.path as osp
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.logging import print_log

from mmseg_sparsevit.benchmark.process import max_rss_bytes

from .batch import SlideResult, check_unique_stems, run_fingerprint, run_slides, slide_stem
from .dataset import run_tiles
from .parallel import SINGLE, Ranks
from .reader import open_slide
from .stitching import Block, Stitcher
from .tiling import TileGrid, check_tile_size, plan_tiles
from .tissue import TissueSettings, tissue_mask
from .writers import (NOT_ANALYSED, geojson_features, overlay, read_state, tiling_preview, write_geojson, write_json,
                      write_png, write_pyramidal_tiff, write_state)

GB = 1024 ** 3
_STATE_VERSION = 1


@dataclass(frozen=True)
class SlideSettings:
    """How slides are tiled and run. Sizes are px at the target µm/px."""

    mpp: Optional[float] = None  # target µm/px; None: the µm/px the model was trained at (config `model_mpp`)
    tile_size: int = 1344
    overlap: int = 112
    batch_size: int = 2
    num_workers: int = 2
    amp: bool = True  # fp16 autocast on CUDA; CPU always runs fp32
    slide_mpp: Optional[float] = None  # µm per level-0 px when the metadata lacks it (overrides it if given)
    tissue: Optional[TissueSettings] = field(default_factory=TissueSettings)  # None: all of the slide is tissue
    min_tissue: float = 0.0  # keep tiles whose tissue share exceeds this
    window: str = 'cosine'  # blending window: 'cosine' or 'linear'
    checkpoint_every: int = 64  # tiles between saves of a slide in progress (rounded up to whole batches)
    polygon_min_area_px: float = 4.0  # GeoJSON leaves out pieces smaller than this (px at the target µm/px)
    overlay_max_side: int = 2048  # the overlay PNG is at the target µm/px, or coarser to fit this side
    progress: bool = True


class TileSegmenter:
    """Per-tile class scores from an mmseg segmentor, through its own data preprocessor and ``predict``.

    Call with an (B, h, w, 3) uint8 RGB batch; returns (B, C, h, w) float32 scores at tile resolution (for
    Mask2Former, the class-probability-weighted mask scores mmseg argmaxes itself)."""

    def __init__(self, model: torch.nn.Module, mpp: Optional[float], patch_size: int, amp: bool = True,
                 name: str = ''):
        self.model, self.mpp, self.patch_size, self.name = model.eval(), mpp, patch_size, name
        self.device = next(model.parameters()).device
        self.amp = amp and self.device.type == 'cuda'
        self.num_classes = int(model.decode_head.num_classes)
        meta = getattr(model, 'dataset_meta', None) or {}
        classes, palette = meta.get('classes'), meta.get('palette')
        if classes is None or len(classes) != self.num_classes or palette is None or len(palette) < self.num_classes:
            classes = [f'class_{i}' for i in range(self.num_classes)]
            palette = [np.random.default_rng(i).integers(0, 256, 3) for i in range(self.num_classes)]
        self.classes = list(classes)
        self.palette = [tuple(int(v) for v in color) for color in palette[:self.num_classes]]

    @torch.no_grad()
    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        from mmseg.structures import SegDataSample
        height, width = tiles.shape[1:3]
        # The preprocessor expects BGR CHW (what LoadImageFromFile gives) and converts to RGB itself.
        inputs = [tile.flip(-1).permute(2, 0, 1).contiguous() for tile in tiles]
        samples = [SegDataSample(metainfo=dict(ori_shape=(height, width), img_shape=(height, width)))
                   for _ in inputs]
        amp = torch.autocast(self.device.type, dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with amp:
            results = self.model.test_step(dict(inputs=inputs, data_samples=samples))
        return np.stack([r.seg_logits.data.float().cpu().numpy() for r in results])


def model_mpp(cfg) -> Optional[float]:
    """The µm/px a config's model was trained at (its ``model_mpp`` key), or None."""
    value = cfg.get('model_mpp', None)
    return None if value is None else float(value)


def model_patch_size(model: torch.nn.Module, cfg) -> int:
    """The ViT patch size (tiles must be a multiple of it): from the backbone, else the config."""
    backbone = model.backbone
    for owner in (backbone, getattr(backbone, 'vit', None)):
        if owner is not None and isinstance(getattr(owner, 'patch_size', None), int):
            return owner.patch_size
    return int(cfg.get('patch_size', None) or cfg.model.get('data_preprocessor', {}).get('size_divisor', None) or 1)


def build_segmenter(config: str, checkpoint: Optional[str], device: str = 'cpu', amp: bool = True,
                    cfg_options: Optional[dict] = None) -> TileSegmenter:
    """Build a config's model with mmseg's ``init_model`` and load ``checkpoint`` (None: random weights)."""
    from mmengine.config import Config
    from mmseg.apis import init_model
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = init_model(cfg, checkpoint, device=device)
    return TileSegmenter(model, model_mpp(cfg), model_patch_size(model, cfg), amp,
                         name=f'{osp.basename(config)}:{osp.basename(checkpoint) if checkpoint else "random"}')


def output_paths(out_dir: str, stem: str) -> Dict[str, str]:
    """Where the outputs of slide ``stem`` go."""
    return {'tiff': osp.join(out_dir, f'{stem}.classes.tiff'), 'geojson': osp.join(out_dir, f'{stem}.geojson'),
            'overlay': osp.join(out_dir, f'{stem}.overlay.png'), 'tiles': osp.join(out_dir, f'{stem}.tiles.png'),
            'summary': osp.join(out_dir, f'{stem}.summary.json')}


class PartialRun:
    """On-disk state of a slide in progress: the class map (memory-mapped) and the stitcher's open blocks.

    A state of another run, or a damaged one (warned about, naming the file), starts the slide afresh."""

    def __init__(self, folder: str, grid: TileGrid, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.map_path, self.state_path = osp.join(folder, 'classes.npy'), osp.join(folder, 'state.npz')
        width, height = grid.canvas_size
        self.state = read_state(self.state_path, fingerprint, required=('added',))
        self.class_map = None if self.state is None else self._saved_map((height, width))
        self.resumed = self.class_map is not None
        if not self.resumed:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            self.class_map = np.lib.format.open_memmap(self.map_path, 'w+', np.uint8, (height, width))
            self.class_map[:] = NOT_ANALYSED

    def _saved_map(self, shape: Tuple[int, int]) -> Optional[np.ndarray]:
        try:  # read-only first: mapped 'r+', numpy would silently extend a file cut short with zeros
            saved = np.load(self.map_path, mmap_mode='r')
        except (OSError, ValueError) as err:
            problem = f'{type(err).__name__}: {err}'
        else:
            if saved.shape == shape and saved.dtype == np.uint8:
                return np.load(self.map_path, mmap_mode='r+')
            problem = f'a {saved.dtype} map of shape {saved.shape}, expected uint8 {shape}'
        print_log(f'{self.map_path}: unreadable partial class map ({problem}); starting the slide afresh',
                  logger='current', level=logging.WARNING)
        return None

    def write_block(self, block: Block) -> None:
        h, w = block.covered.shape
        classes = block.scores.argmax(0).astype(np.uint8)
        self.class_map[block.y:block.y + h, block.x:block.x + w] = np.where(block.covered, classes, NOT_ANALYSED)

    def restore(self, stitcher: Stitcher) -> None:
        if self.resumed:
            stitcher.load_state_dict(self.state)
        self.state = None  # the stitcher has it now

    def save(self, stitcher: Stitcher) -> None:
        """Flush the class map, then replace the state: a kill at any point leaves a consistent pair."""
        self.class_map.flush()
        write_state(self.state_path, self.fingerprint, stitcher.state_dict())

    def remove(self) -> None:
        del self.class_map
        shutil.rmtree(self.folder, ignore_errors=True)


def _class_pixels(class_map: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Pixel count per class value (256 bins), in row strips."""
    counts = np.zeros(256, np.int64)
    for y in range(0, class_map.shape[0], rows):
        counts += np.bincount(np.asarray(class_map[y:y + rows]).ravel(), minlength=256)
    return counts


def peak_memory_gb() -> Dict[str, float]:
    """Peak resident memory of this process and of its finished children (DataLoader workers), and CUDA."""
    peak = {'cpu_rss_gb': max_rss_bytes() / GB, 'cpu_rss_workers_gb': max_rss_bytes(resource.RUSAGE_CHILDREN) / GB}
    if torch.cuda.is_available():
        peak['cuda_gb'] = torch.cuda.max_memory_allocated() / GB
    return {k: round(v, 3) for k, v in peak.items()}


def target_mpp(segmenter: Callable, settings: SlideSettings) -> float:
    """The µm/px to run at (``settings.mpp``, else the model's), after checking the tile size against the model."""
    check_tile_size(settings.tile_size, segmenter.patch_size)
    mpp = settings.mpp or segmenter.mpp
    if mpp is None:
        raise ValueError('the model records no µm/px (config key model_mpp): pass the target µm/px (--mpp)')
    return mpp


def segment_slide(segmenter: Callable, path: str, out_dir: str, settings: SlideSettings = SlideSettings(),
                  on_batch: Optional[Callable[[int], None]] = None, ranks: Ranks = SINGLE) -> SlideResult:
    """Segment one slide into ``out_dir`` (see the module docstring); skip it when its summary exists.

    ``segmenter`` is a :class:`TileSegmenter` or any callable with the same attributes (``num_classes``,
    ``classes``, ``palette``, ``patch_size``, ``mpp``, ``name``). ``on_batch(tiles_done)`` is called after
    each batch (tests use it to simulate a kill). With several ``ranks`` (torchrun) every rank calls this for
    the slide and segments its share of the tiles; rank 0 stitches them in tile order and writes."""
    stem = slide_stem(path)
    outputs = output_paths(out_dir, stem)
    if osp.isfile(outputs['summary']):
        with open(outputs['summary']) as f:
            summary = json.load(f)
        return SlideResult(path, 'skipped', f'finished earlier ({summary.get("status")})', outputs, summary)
    mpp = target_mpp(segmenter, settings)
    start = time.perf_counter()
    with open_slide(path, settings.slide_mpp) as reader:
        tissue = tissue_mask(reader, settings.tissue)[0] if settings.tissue is not None else None
        grid = plan_tiles(reader.dimensions, reader.mpp, mpp, settings.tile_size, settings.overlap, tissue,
                          settings.min_tissue)
        width, height = reader.dimensions
        tissue_mm2 = tissue.area_mm2 if tissue is not None else width * height * reader.mpp[0] * reader.mpp[1] * 1e-6
        slide_info = dict(slide=osp.abspath(path), reader=type(reader).__name__,
                          vendor=getattr(reader, 'vendor', 'image'), slide_size=list(reader.dimensions),
                          slide_mpp=list(reader.mpp), levels=len(reader.level_dimensions))
        slide_mpp = reader.mpp
        view = reader.thumbnail(mpp, max_side=settings.overlay_max_side) if len(grid) and ranks.is_main else None
    summary = dict(status='done', **slide_info, mpp=mpp, canvas_size=list(grid.canvas_size),
                   tile_size=grid.tile_size, overlap=grid.overlap, tiles=len(grid),
                   tissue_area_mm2=round(tissue_mm2, 4), model=segmenter.name)
    os.makedirs(out_dir, exist_ok=True)
    if len(grid) == 0:
        summary.update(status='no_tissue', time_s=round(time.perf_counter() - start, 2))
        if ranks.is_main:
            write_json(outputs['summary'], summary)
        return SlideResult(path, 'no_tissue', 'no tissue found: nothing to segment', {'summary': outputs['summary']},
                           summary)

    partial = stitcher = None
    if ranks.is_main:
        partial = PartialRun(osp.join(out_dir, f'{stem}.partial'), grid,
                             run_fingerprint(path, grid, version=_STATE_VERSION, model=segmenter.name,
                                             classes=segmenter.num_classes, window=settings.window,
                                             batch=settings.batch_size))
        stitcher = Stitcher(grid, segmenter.num_classes, partial.write_block, settings.window)
        partial.restore(stitcher)
    todo = np.flatnonzero(~ranks.broadcast(None if stitcher is None else stitcher.added))
    resumed_tiles = len(grid) - len(todo)
    run_start = time.perf_counter()
    for save_now, indices, scores in run_tiles(segmenter, path, grid, todo, settings, ranks, stem):
        for index, tile_scores in zip(indices.tolist(), scores):
            stitcher.add(index, tile_scores)
        if save_now:
            partial.save(stitcher)
        if on_batch is not None:
            on_batch(int(stitcher.added.sum()))
    run_time = time.perf_counter() - run_start
    if not ranks.is_main:
        return SlideResult(path, 'done', f'{len(grid)} tiles (written by rank 0)', outputs, summary)
    assert stitcher.finished, 'every tile was added, so every block was written'

    class_map = partial.class_map
    palette = list(segmenter.palette)
    write_pyramidal_tiff(outputs['tiff'], class_map, (mpp, mpp * slide_mpp[1] / slide_mpp[0]), palette=palette)
    write_geojson(outputs['geojson'], geojson_features(class_map, grid.downsample, segmenter.classes, palette,
                                                       min_area_px=settings.polygon_min_area_px))
    write_png(outputs['overlay'], overlay(view.image, class_map, palette))
    write_png(outputs['tiles'], tiling_preview(view.image, view.downsample, grid.level0_coords(),
                                               grid.level0_tile_size, None if tissue is None else tissue.mask))
    counts = _class_pixels(class_map)
    px_mm2 = grid.downsample[0] * grid.downsample[1] * slide_mpp[0] * slide_mpp[1] * 1e-6
    analysed = counts[:segmenter.num_classes].sum() * px_mm2
    new_tiles = len(grid) - resumed_tiles
    summary.update(
        class_area_mm2={name: round(float(counts[i] * px_mm2), 4) for i, name in enumerate(segmenter.classes)},
        analysed_area_mm2=round(float(analysed), 4), tiles_resumed=resumed_tiles,
        time_s=round(time.perf_counter() - start, 2),
        tiles_per_s=round(new_tiles / run_time, 3) if run_time > 0 else None,
        tissue_mm2_per_s=round(tissue_mm2 * new_tiles / len(grid) / run_time, 4) if run_time > 0 else None,
        peak_memory=peak_memory_gb(), processes=ranks.world_size,
        outputs={k: osp.basename(v) for k, v in outputs.items() if k != 'summary'})
    write_json(outputs['summary'], summary)
    partial.remove()
    return SlideResult(path, 'done', f'{len(grid)} tiles', outputs, summary)


def segment_slides(segmenter: Callable, paths: Sequence[str], out_dir: str,
                   settings: SlideSettings = SlideSettings(), ranks: Ranks = SINGLE,
                   split: str = 'auto') -> List[SlideResult]:
    """Segment each slide; a slide that cannot be read or fails is reported and the batch goes on.

    Also writes ``out_dir/slides.json`` listing every slide's status. Several ``ranks`` (torchrun) share whole
    slides or the tiles of each slide (``split``, see :mod:`.parallel`) and write what one process writes."""
    check_unique_stems(paths)
    target_mpp(segmenter, settings)
    return run_slides(lambda path, job_ranks: segment_slide(segmenter, path, out_dir, settings, ranks=job_ranks),
                      paths, out_dir, ranks, split)


def result_table(results: Sequence[SlideResult]) -> str:
    """A plain-text table of slide, status, tiles, tissue mm² and where the outputs are."""
    rows = [('slide', 'status', 'tiles', 'tissue mm2', 'outputs / message')]
    for r in results:
        files = [r.outputs[k] for k in ('tiff', 'geojson', 'overlay') if k in r.outputs]
        out = r.message if r.status == 'failed' else ', '.join(files)
        rows.append((osp.basename(r.slide), r.status, str(r.summary.get('tiles', '')),
                     str(r.summary.get('tissue_area_mm2', '')), out or r.message))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row[:4], widths)) + '  ' + row[4] for row in rows)


__all__ = ['SlideSettings', 'SlideResult', 'TileSegmenter', 'build_segmenter', 'model_mpp', 'model_patch_size',
           'segment_slide', 'segment_slides', 'output_paths', 'result_table', 'peak_memory_gb', 'PartialRun']
