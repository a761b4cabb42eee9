"""Isolated time / peak-memory measurement of a SparseViT forward, and the largest-side search.

Each point runs in a fresh interpreter (:mod:`.worker`), so CPU peak memory is that process's peak RSS and
nothing leaks between points; on CUDA it is ``torch.cuda.max_memory_allocated``. A record holds ``peak_gb``
(whole process / all allocations, weights included), ``forward_gb`` (peak minus what was held just before
the forwards: the activations), ``weights_gb`` (parameters and buffers at the measured precision), the
median ``time_s`` per forward and the ``precision`` it was measured at.
"""
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

from mmengine.logging import print_log

from mmseg_sparsevit.models.modes import check_precision
from mmseg_sparsevit.models.presets import ARCH_FIELDS, ViTArch, get_arch
from mmseg_sparsevit.models.sparse_vit import SparseViT

from .process import run_worker

GB = 1024 ** 3


@dataclass(frozen=True)
class MeasureSettings:
    """How each point is measured; everything except the model and the input side."""

    device: str = 'cpu'
    precision: str = 'fp32'
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1
    mem_cap_gb: Optional[float] = None
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name, least in (('batch_size', 1), ('repeats', 1), ('warmup', 0)):
            if getattr(self, name) < least:
                raise ValueError(f'{name} must be >= {least}, got {getattr(self, name)}')
        if self.mem_cap_gb is not None and self.mem_cap_gb <= 0:
            raise ValueError(f'mem_cap_gb must be > 0, got {self.mem_cap_gb}')


def resolved_arch(model_kwargs: Mapping[str, Any]) -> ViTArch:
    """The architecture SparseViT builds from these kwargs (preset + overrides)."""
    return get_arch(model_kwargs.get('arch', 'uni2-h'), **{k: v for k, v in model_kwargs.items() if k in ARCH_FIELDS})


def _run_worker(spec: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """Run :mod:`.worker` on ``spec`` in a fresh interpreter; its record, or a timeout / error record."""
    run = run_worker('mmseg_sparsevit.benchmark.worker', spec, timeout_s)
    if run.returncode is None:
        return dict(status='timeout')
    record = run.record or {}
    if run.record is None or (run.returncode != 0 and record.get('status') != 'over'):
        record.update(status='error', error=[run.tail])
    return record


def measure_point(model_kwargs: Mapping[str, Any], size: int, settings: MeasureSettings,
                  label: str = '') -> Dict[str, Any]:
    """Time and peak memory of ``SparseViT(**model_kwargs).forward_features`` on ``size`` x ``size`` inputs.

    ``model_kwargs`` are any SparseViT arguments (preset, overrides, attention mode, pruning, ...); they are
    checked here so a typo fails before a process starts. Returns ``size``, ``tokens``, ``precision`` and
    ``status`` (``ok``, ``over`` the memory cap / out of memory, ``timeout`` or ``error``) with, when ok,
    ``time_s``, ``peak_gb``, ``forward_gb`` and ``weights_gb``; ``label`` names the point in the log.
    """
    try:
        inspect.signature(SparseViT).bind(**model_kwargs)
    except TypeError as err:
        raise TypeError(f'model_kwargs are not SparseViT arguments: {err}') from None
    patch = resolved_arch(model_kwargs).patch_size
    if size < patch or size % patch:
        raise ValueError(f'size={size} must be a positive multiple of the patch size {patch}')
    spec = dict(model=dict(model_kwargs), size=size, device=settings.device, precision=settings.precision,
                batch_size=settings.batch_size, repeats=settings.repeats, warmup=settings.warmup,
                mem_cap_gb=settings.mem_cap_gb)
    record = dict(size=size, tokens=(size // patch) ** 2, precision=settings.precision,
                  **_run_worker(spec, settings.timeout_s))
    if record['status'] == 'ok':
        detail = (f"{record['time_s']:.3f} s  peak {record['peak_gb']:.2f} GB  forward {record['forward_gb']:.2f} GB"
                  f"  ({settings.precision})")
    elif record['status'] == 'over':
        peak = f" at {record['peak_gb']:.3f} GB" if 'peak_gb' in record else ''
        detail = f'stopped above the {settings.mem_cap_gb} GB cap{peak}'
    else:
        detail = str(record.get('error', ''))
    print_log(f"{label:>14} {size:>5} px: {record['status']:>7} {detail}", logger='current')
    return record


def largest_fitting_side(measure: Callable[[int], Dict[str, Any]], patch_size: int, start: int, max_side: int,
                         max_memory_gb: float) -> Dict[str, Any]:
    """Largest multiple of ``patch_size`` (<= ``max_side``) whose measurement is ok with ``peak_gb`` within
    ``max_memory_gb``, assuming memory grows with the side: doubling from ``start`` until a side does not
    fit, then bisection between the last fit and the first miss.

    Returns ``largest_side`` (None if ``start`` already misses), ``hit_search_max_size`` (the search stopped
    at ``max_side``, so larger sides may fit too) and ``records`` (every measurement, in order).
    """
    if not patch_size <= start <= max_side:
        raise ValueError(f'need patch_size <= start <= max_side, got {patch_size}, {start}, {max_side}')
    records = []

    def fits(k: int) -> bool:
        records.append(measure(k * patch_size))
        return records[-1]['status'] == 'ok' and records[-1]['peak_gb'] <= max_memory_gb

    lo, hi, top = start // patch_size, None, max_side // patch_size
    if not fits(lo):
        return dict(largest_side=None, hit_search_max_size=False, records=records)
    while hi is None and lo < top:
        nxt = min(2 * lo, top)
        lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return dict(largest_side=lo * patch_size, hit_search_max_size=lo == top, records=records)
