"""One benchmark point inside the current process: build a SparseViT, time its forwards, read peak memory.

``measure.measure_point`` runs this module as ``python -m mmseg_sparsevit.benchmark.worker SPEC_JSON`` in a
fresh interpreter, so that CPU peak RSS (``ru_maxrss``) belongs to this point alone; the last stdout line is
the JSON record. On CUDA the peak is ``torch.cuda.max_memory_allocated``.
"""
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Dict

import torch

from mmseg_sparsevit.models.modes import PRECISIONS, autocast
from mmseg_sparsevit.models.sparse_vit import SparseViT

from .measure import GB
from .process import current_rss_bytes, max_rss_bytes


def _rss_watchdog(limit_bytes: int) -> None:
    """Stop this process as soon as its resident set exceeds the cap, before the machine starts to swap."""
    while True:
        rss = current_rss_bytes()
        if rss > limit_bytes:
            print(json.dumps(dict(status='over', peak_gb=rss / GB)), flush=True)
            os._exit(3)
        time.sleep(0.005)


def run_point(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Warm-up and timed ``forward_features`` calls on one input size; returns status, time and memory.

    ``spec``: ``model`` (SparseViT kwargs), ``size``, ``device``, ``precision`` (a ``PRECISIONS`` key),
    ``batch_size``, ``repeats``, ``warmup``, ``mem_cap_gb``. The model's weights are cast to the precision's
    weight dtype and the forwards run under ``torch.autocast`` where the precision says so, as extraction does.
    A CPU memory cap starts a watchdog that ends the process, so call this in-process only without a cap.
    """
    device, size = torch.device(spec['device']), spec['size']
    cuda = device.type == 'cuda'
    cap = spec.get('mem_cap_gb')
    if cap and not cuda:
        threading.Thread(target=_rss_watchdog, args=(int(cap * GB),), daemon=True).start()
    if cap and cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / total))
    dtype = PRECISIONS[spec['precision']].weights
    model = SparseViT(**spec['model']).eval().to(device=device, dtype=dtype)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    x = torch.randn(spec['batch_size'], 3, size, size, device=device, dtype=dtype)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss_bytes()
    times = []
    try:
        with torch.inference_mode(), autocast(spec['precision'], device.type):
            for i in range(spec['warmup'] + spec['repeats']):
                start = time.perf_counter()
                model.forward_features(x)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= spec['warmup']:
                    times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return dict(status='over')
    # The kernel's RSS counters are synchronised lazily, so ru_maxrss can trail the current RSS a little.
    peak = torch.cuda.max_memory_allocated(device) if cuda else max(max_rss_bytes(), current_rss_bytes(), before)
    status = 'over' if cap and peak > cap * GB else 'ok'
    return dict(status=status, time_s=statistics.median(times), peak_gb=peak / GB, forward_gb=(peak - before) / GB,
                weights_gb=weights / GB)


if __name__ == '__main__':
    print(json.dumps(run_point(json.loads(sys.argv[1]))), flush=True)
