"""Whole-slide throughput: sparse large tiles against dense small tiles over the same tissue, side by side.

Both modes run the whole pipeline (tiles read in a DataLoader worker, the segmentor's preprocessor and
``predict``, stitching, the four output files) over one synthetic slide that is tissue everywhere, so they
segment the same area. Each mode runs in a fresh interpreter, so its peak memory is its own; both use the
same ViT (width, depth, heads) inside the demo config's adapter and head, with random weights (speed does not
depend on them), and the same pixels per forward (small tiles are batched). The figure of merit is tissue area
per CPU-second (this process and its DataLoader worker, slide reading to files written; wall time is also
reported but swings on a shared machine).
"""
import argparse
import json
import os
import os.path as osp
import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..benchmark.process import run_worker
from ..utils.markdown import markdown_table

DEMO_CONFIG = 'configs/demo/mask2former_tiny-sparse-adapter_1xb4-300_segpath-demo-112x112.py'
_PACKAGE_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@dataclass(frozen=True)
class SlideBenchmark:
    """What is compared: ``modes`` are (name, attention mode, tile px); the slide is ``side`` px at ``mpp``."""

    config: str = osp.join(_PACKAGE_ROOT, DEMO_CONFIG)
    side: int = 1344
    mpp: float = 0.5
    width: int = 768
    depth: int = 4
    heads: int = 12
    window: int = 8
    modes: Tuple[Tuple[str, str, int], ...] = (('sparse', 'sparse', 1344), ('dense', 'dense', 224))
    threads: Optional[int] = None  # torch threads per run (None: torch's default)

    def batch_size(self, tile: int) -> int:
        """Tiles per forward so that every mode pushes the same pixels per forward (the largest tile's)."""
        largest = max(t for _, _, t in self.modes)
        return max(1, (largest // tile) ** 2)

    def __post_init__(self) -> None:
        for name, _, tile in self.modes:
            if self.side % tile:
                raise ValueError(f'mode {name}: tile {tile} px does not divide the slide side {self.side} px, '
                                 'so the modes would not cover the same area')


def cfg_options(bench: SlideBenchmark, attn_mode: str) -> Dict[str, Any]:
    """Config overrides that give the demo model this benchmark's ViT and attention mode."""
    vit = dict(embed_dim=bench.width, depth=bench.depth, num_heads=bench.heads, attn_mode=attn_mode,
               window_size=bench.window)
    options = {f'model.backbone.vit_cfg.{k}': v for k, v in vit.items()}
    options['model.decode_head.in_channels'] = [bench.width] * 4
    return options


def _worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One mode in this (fresh) process: build the model, segment the slide, return its summary."""
    import torch

    from .inference import SlideSettings, build_segmenter, segment_slide
    if spec['threads']:
        torch.set_num_threads(spec['threads'])
    segmenter = build_segmenter(spec['config'], None, 'cpu', cfg_options=spec['cfg_options'])
    settings = SlideSettings(mpp=spec['mpp'], tile_size=spec['tile'], overlap=0, batch_size=spec['batch_size'],
                             num_workers=1,
                             tissue=None, progress=False)
    before = _cpu_seconds()
    result = segment_slide(segmenter, spec['slide'], spec['out_dir'], settings)
    return dict(result.summary, cpu_s=_cpu_seconds() - before)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_mode(bench: SlideBenchmark, name: str, attn_mode: str, tile: int, slide: str, out_dir: str
             ) -> Dict[str, Any]:
    """Run one mode in a fresh interpreter; its slide summary (time, area, peak memory)."""
    spec = dict(config=bench.config, cfg_options=cfg_options(bench, attn_mode), mpp=bench.mpp, tile=tile,
                batch_size=bench.batch_size(tile), slide=slide, out_dir=osp.join(out_dir, name), threads=bench.threads)
    run = run_worker('mmseg_sparsevit.slide.benchmark', spec, timeout_s=None)
    if run.returncode != 0 or run.record is None:
        raise RuntimeError(f'benchmark mode {name} failed (exit {run.returncode}): {run.tail}')
    return run.record


def run_benchmark(bench: SlideBenchmark, out_dir: str) -> List[Dict[str, Any]]:
    """Write the slide, run every mode; one row per mode."""
    from .demo import make_demo_slide
    os.makedirs(out_dir, exist_ok=True)
    slide = osp.join(out_dir, 'benchmark_slide.tiff')
    make_demo_slide(slide, (bench.side, bench.side), bench.mpp, glass=False)
    rows = []
    for name, attn_mode, tile in bench.modes:
        summary = run_mode(bench, name, attn_mode, tile, slide, out_dir)
        rows.append(dict(mode=name, attention=attn_mode, tile=tile, batch=bench.batch_size(tile),
                         tiles=summary['tiles'],
                         tissue_mm2=summary['tissue_area_mm2'], time_s=summary['time_s'], cpu_s=summary['cpu_s'],
                         mm2_per_cpu_s=summary['tissue_area_mm2'] / summary['cpu_s'],
                         peak_rss_gb=summary['peak_memory']['cpu_rss_gb']))
    return rows


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table; area rates per CPU-second (robust on a shared machine), relative to the last mode."""
    base = rows[-1]['mm2_per_cpu_s']
    header = ['mode', 'tile px', 'batch', 'tiles', 'tissue mm²', 'wall s', 'CPU s', 'tissue mm² per CPU-s',
              'vs last', 'peak RSS GB']
    body = [[r['mode'], r['tile'], r['batch'], r['tiles'], f"{r['tissue_mm2']:.3f}", f"{r['time_s']:.1f}",
             f"{r['cpu_s']:.1f}", f"{r['mm2_per_cpu_s']:.4f}", f"{r['mm2_per_cpu_s'] / base:.2f}x",
             f"{r['peak_rss_gb']:.2f}"]
            for r in rows]
    return markdown_table(header, body, align=['left'] + ['right'] * 9)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out-dir', default='work_dirs/benchmark_slide')
    defaults = SlideBenchmark()
    for field in ('side', 'width', 'depth', 'heads', 'window', 'threads'):
        parser.add_argument(f'--{field}', type=int, default=getattr(defaults, field),
                            help=f'default: {getattr(defaults, field)}')
    parser.add_argument('--sparse-tile', type=int, default=1344)
    parser.add_argument('--dense-tile', type=int, default=224)
    args = parser.parse_args(argv)
    bench = SlideBenchmark(side=args.side, width=args.width, depth=args.depth, heads=args.heads, window=args.window,
                           threads=args.threads,
                           modes=(('sparse', 'sparse', args.sparse_tile), ('dense', 'dense', args.dense_tile)))
    rows = run_benchmark(bench, args.out_dir)
    table = format_rows(rows)
    print(table)
    with open(osp.join(args.out_dir, 'benchmark.json'), 'w') as f:
        json.dump(dict(settings=asdict(bench), rows=rows), f, indent=2)
    return 0


if __name__ == '__main__':  # one mode in a fresh interpreter (run_mode): prints its summary as JSON
    print(json.dumps(_worker(json.loads(sys.argv[1]))), flush=True)
