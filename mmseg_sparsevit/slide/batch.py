"""A batch of slides through one per-slide pipeline (segmentation or embedding), reported slide by slide.

Both slide tools share this: one unreadable, tissue-free or failing slide is reported and the batch goes on;
under ``torchrun`` whole slides or the tiles of each slide are shared out (:mod:`.parallel`); rank 0 writes
``slides.json`` with every slide's status, and every rank returns the same list.
"""
import hashlib
import json
import os
import os.path as osp
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Sequence

import numpy as np
from mmengine.logging import print_log

from .parallel import SINGLE, Ranks, deal, resolve_split
from .reader import SlideReadError
from .tiling import TileGrid
from .writers import write_json

# process one slide: (path, the ranks sharing its tiles) -> result
SlideJob = Callable[[str, Ranks], 'SlideResult']


@dataclass
class SlideResult:
    """What happened to one slide: status 'done', 'skipped' (finished earlier), 'no_tissue' or 'failed'."""

    slide: str
    status: str
    message: str = ''
    outputs: Dict[str, str] = field(default_factory=dict)
    summary: Dict = field(default_factory=dict)


def slide_stem(path: str) -> str:
    """File name without its extension (``a.ome.tiff`` -> ``a.ome``)."""
    return osp.splitext(osp.basename(path))[0]


def run_fingerprint(path: str, grid: TileGrid, **settings: Any) -> str:
    """What a slide's partial state depends on (the slide file, the tile grid and ``settings``); a rerun whose
    fingerprint differs starts the slide afresh instead of resuming it."""
    key = dict(settings, slide=osp.abspath(path), size=os.path.getsize(path), mpp=grid.mpp, tile=grid.tile_size,
               overlap=grid.overlap, tiles=hashlib.sha1(np.ascontiguousarray(grid.origins).tobytes()).hexdigest())
    return json.dumps(key, sort_keys=True, default=str)


def check_unique_stems(paths: Sequence[str]) -> None:
    """Outputs are named after the slide: two slides with one file name would overwrite each other."""
    stems = [slide_stem(p) for p in paths]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise ValueError(f'slides share output names (same file name in different folders): {clashes}')


def run_reported(job: SlideJob, path: str, ranks: Ranks, label: str) -> SlideResult:
    """``job(path, ranks)``, with an unreadable or failing slide turned into a 'failed' result, and logged."""
    print_log(f'{label} {path}', logger='current')
    try:
        result = job(path, ranks)
    except SlideReadError as err:
        result = SlideResult(path, 'failed', str(err))
    except Exception as err:  # noqa: BLE001 - one bad slide must not stop a batch of hundreds; the report names it
        result = SlideResult(path, 'failed', f'{type(err).__name__}: {err}')
        print_log(traceback.format_exc(), logger='current', level=40)
    level = 40 if result.status == 'failed' else 20
    print_log(f'{path}: {result.status}' + (f' ({result.message})' if result.message else ''), logger='current',
              level=level)
    return result


def run_slides(job: SlideJob, paths: Sequence[str], out_dir: str, ranks: Ranks = SINGLE,
               split: str = 'auto') -> List[SlideResult]:
    """Run ``job`` on every slide (``split`` over ``ranks``: see :mod:`.parallel`) and write ``slides.json``."""
    if resolve_split(split, len(paths), ranks) == 'slides' and ranks.world_size > 1:
        mine = [(i, run_reported(job, p, SINGLE, f'[rank {ranks.rank}: {i + 1}/{len(paths)}]'))
                for i, p in deal(list(enumerate(paths)), ranks)]
        results = [r for _, r in sorted(sum(ranks.all_gather(mine), []), key=lambda item: item[0])]
    else:
        results = [run_reported(job, p, ranks, f'[{i}/{len(paths)}]') for i, p in enumerate(paths, 1)]
        results = ranks.broadcast(results)  # rank 0's view: it wrote the outputs
    if ranks.is_main:
        write_json(osp.join(out_dir, 'slides.json'), [asdict(r) for r in results])
    ranks.barrier()
    return results


def report_batch(results: Sequence[SlideResult], table: str, ranks: Ranks, where: str) -> int:
    """Print the batch's table and where its outputs are (rank 0); exit status 1 when a slide failed."""
    if ranks.is_main:
        print(table)
        print(f'{where} (slides.json lists every slide)')
    return 1 if any(r.status == 'failed' for r in results) else 0
