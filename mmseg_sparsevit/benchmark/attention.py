"""Op-level benchmark: dense vs windowed sparse attention on random q, k, v, one fresh process per point.

Methods: the dense attention modes ``vanilla`` (explicit softmax(QK^T)V, the full probability matrix
materialised) and ``dense`` (``F.scaled_dot_product_attention``), the ``sparse_attention`` backends
(``gather``, ``flex``; flex is compiled and its one-off compile time is reported apart) and ``auto`` (the op's
own backend choice). Peak memory is CUDA ``max_memory_allocated``, or on CPU the resident set size sampled
during the timed calls (and the process' lifetime peak, which includes compilation).

``keep`` < 1 measures token pruning: a seeded random subset of the grid cells (the same sorted subset for every
batch row) is passed to the sparse methods as ``patch_index``; the dense methods then attend densely among the
kept tokens only (no window), i.e. what a pruned dense ViT would compute. ``backward`` times forward + backward
(gradients of q, k and v) instead of the forward alone.

``arch_point`` gives a ViT preset's shapes at an input side (its patch grid, heads x head dim, CLS + registers),
so that a model's own attention is measured by its name.

Run as ``python -m mmseg_sparsevit.benchmark.attention POINT_JSON`` it measures one point and prints the record.
"""
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mmseg_sparsevit.models.modes import ATTENTION_MODES, is_sparse
from mmseg_sparsevit.models.presets import get_arch
from mmseg_sparsevit.ops import sparse_attention
from mmseg_sparsevit.ops.sparse_attention import BACKENDS
from mmseg_sparsevit.utils.markdown import markdown_table

from .process import RssSampler, current_rss_bytes, max_rss_bytes, run_worker

DENSE_METHODS = tuple(mode for mode in ATTENTION_MODES if not is_sparse(mode))  # 'vanilla', 'dense'
METHODS = DENSE_METHODS + BACKENDS + ('auto',)
COMPILED = ('flex', 'auto')  # the first call may compile flex: its excess over the median is reported
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class AttentionPoint:
    """One measured configuration, apart from the method: shapes, sparsity, device and repeats."""

    grid: Tuple[int, int]
    num_global: int = 9
    heads: int = 12
    head_dim: int = 64
    batch: int = 1
    window_size: int = 8
    neighbourhood: str = 'block'
    keep: float = 1.0
    backward: bool = False
    device: str = 'cpu'
    warmup: int = 2
    repeats: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, 'grid', tuple(self.grid))  # JSON gives a list
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f'grid must be two positive sides, got {self.grid}')
        if not 0 < self.keep <= 1:
            raise ValueError(f'keep must be a fraction in (0, 1], got {self.keep}')
        for name in ('warmup', 'repeats'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')


def arch_point(arch: str, image_size: int, **settings: Any) -> AttentionPoint:
    """The point of preset ``arch``'s attention at a square input of ``image_size`` px: grid side
    ``image_size // patch_size``, its heads and head dim, CLS + registers as the global tokens."""
    vit = get_arch(arch)
    if image_size < vit.patch_size:
        raise ValueError(f'image_size={image_size} is smaller than {arch!r}\'s patch size {vit.patch_size}')
    side = image_size // vit.patch_size
    return AttentionPoint(grid=(side, side), heads=vit.num_heads, head_dim=vit.embed_dim // vit.num_heads,
                          num_global=vit.num_prefix_tokens, **settings)


SHAPE_FIELDS = ('grid', 'keep', 'backward', 'heads', 'head_dim', 'num_global')


def _shape_key(fields: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of a point (``dataclasses.asdict``) or a record that identify a measured shape besides the
    method; ``grid`` as a list, as JSON gives it back."""
    return {name: list(fields[name]) if name == 'grid' else fields[name] for name in SHAPE_FIELDS}


def vanilla_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """timm's non-fused attention path: the full N x N probability matrix is materialised."""
    attn = (q * q.shape[-1]**-0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def kept_patch_index(grid: Tuple[int, int], keep: float, batch: int, device: torch.device) -> Tensor:
    """A seeded random, sorted subset of ``max(1, int(cells * keep))`` grid cells, the same for every
    batch row, so each point of a run (and each run) prunes the same tokens."""
    cells = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    kept = torch.randperm(cells, generator=gen)[:max(1, int(cells * keep))].sort().values
    return kept.to(device).expand(batch, -1).contiguous()


def attention_method(method: str, point: AttentionPoint, patch_index: Optional[Tensor]) -> Attention:
    """``(q, k, v) -> out`` for one method at one point."""
    if method not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {method!r}')
    if method in DENSE_METHODS:
        return F.scaled_dot_product_attention if ATTENTION_MODES[method]['fused_attn'] else vanilla_attention
    backend = None if method == 'auto' else method
    return lambda q, k, v: sparse_attention(q, k, v, point.grid, point.num_global, point.window_size,
                                            point.neighbourhood, patch_index=patch_index, backend=backend)


def measure_attention(method: str, point: AttentionPoint) -> Dict[str, Any]:
    """Time one method at one point in this process: warm-up (incl. compile), then timed repeats.

    Returns ``method``, the point's shape (``grid``, ``keep``, ``backward``, ``heads``, ``head_dim``,
    ``num_global``), ``tokens``, ``median_s`` / ``times_s`` (wall),
    ``median_cpu_s`` (process CPU time, all threads), ``compile_s`` (first call over the median, compiled
    methods only), ``op_peak_bytes`` (peak over what was held before the timed calls), ``peak_bytes`` and
    ``process_peak_rss_bytes``.
    """
    device = torch.device(point.device)
    cuda = device.type == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    patch_index = kept_patch_index(point.grid, point.keep, point.batch, device) if point.keep < 1 else None
    num_patches = point.grid[0] * point.grid[1] if patch_index is None else patch_index.shape[1]
    shape = (point.batch, point.heads, point.num_global + num_patches, point.head_dim)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device=device, requires_grad=point.backward) for _ in range(3))
    grad_out = torch.randn(shape, generator=gen, device=device) if point.backward else None
    attention = attention_method(method, point, patch_index)

    def run() -> None:
        out = attention(q, k, v)
        if point.backward:
            torch.autograd.grad(out, (q, k, v), grad_out)

    with torch.set_grad_enabled(point.backward):
        sync()
        start = time.perf_counter()
        run()
        sync()
        first_call_s = time.perf_counter() - start
        for _ in range(point.warmup - 1):
            run()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else current_rss_bytes()
        times, cpu_times = [], []
        with RssSampler() as sampler:
            for _ in range(point.repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                run()
                sync()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak
    return dict(method=method, **_shape_key(dataclasses.asdict(point)), tokens=shape[2], median_s=median, times_s=times,
                median_cpu_s=statistics.median(cpu_times),
                compile_s=first_call_s - median if method in COMPILED else None,
                op_peak_bytes=peak - base, peak_bytes=peak, process_peak_rss_bytes=max_rss_bytes())


def measure_attention_in_subprocess(method: str, point: AttentionPoint, timeout_s: float,
                                    cold_compile: bool = True) -> Dict[str, Any]:
    """:func:`measure_attention` in a fresh interpreter; a crash, OOM kill or timeout becomes an ``error`` record.
    ``cold_compile`` gives the worker an empty inductor cache, so compile time is the first-ever one."""
    spec = dict(dataclasses.asdict(point), method=method)
    with tempfile.TemporaryDirectory(prefix='bench_inductor_') as cache:
        env = dict(TORCHINDUCTOR_CACHE_DIR=cache) if cold_compile else None
        run = run_worker('mmseg_sparsevit.benchmark.attention', spec, timeout_s, env)
    if run.returncode == 0 and run.record is not None:
        return run.record
    error = run.tail if run.returncode is None else f'exit {run.returncode}: {run.tail}'
    return dict(method=method, **_shape_key(dataclasses.asdict(point)), error=error)


def attention_table(results: Sequence[Dict[str, Any]]) -> str:
    """One row per point and method with the speed-up over ``dense`` (SDPA) at the same shape (grid, keep,
    heads, head dim, global tokens), in wall time and in process CPU time (all threads; steadier than wall
    time on a shared machine). Records with an ``arch`` (a preset's point) get a column naming it and its
    heads x head dim + global tokens."""
    def point(r: Dict[str, Any]) -> str:
        return json.dumps(_shape_key(r), sort_keys=True)

    dense = {point(r): r for r in results if r['method'] == 'dense' and 'error' not in r}
    by_arch = any('arch' in r for r in results)
    header = ['arch', 'heads x dim + global'] * by_arch + [
        'grid', 'keep', 'tokens (kept)', 'method', 'median time (s)', 'speed-up vs dense SDPA on the same tokens',
        'median CPU time (s)', 'CPU-time speed-up', 'compile (s)', 'op peak memory (GiB)', 'process peak RSS (GiB)']
    rows: List[List[Any]] = []
    gib = 2.0**30
    for r in results:
        lead = [r.get('arch', ''), f'{r["heads"]} x {r["head_dim"]} + {r["num_global"]}'] * by_arch
        grid, keep = 'x'.join(map(str, r['grid'])), f'{r["keep"]:g}'
        if 'error' in r:
            rows.append(lead + [grid, keep, '', r['method'], r['error']] + [''] * 6)
            continue
        ref = dense.get(point(r))
        speedup, cpu_speedup = ((f'{ref[key] / r[key]:.1f}x' if ref else 'n/a') for key in ('median_s', 'median_cpu_s'))
        compile_s = '' if r['compile_s'] is None else f'{r["compile_s"]:.1f}'
        rows.append(lead + [grid, keep, r['tokens'], r['method'], f'{r["median_s"]:.3f}', speedup,
                            f'{r["median_cpu_s"]:.3f}', cpu_speedup, compile_s,
                            f'{r["op_peak_bytes"] / gib:.2f}', f'{r["process_peak_rss_bytes"] / gib:.2f}'])
    lines = [markdown_table(header, rows)]
    if any(r.get('backward') for r in results):
        lines.append('\nTimes and memory are of forward + backward (gradients of q, k and v).')
    if any(r['keep'] < 1 and r['method'] in DENSE_METHODS for r in results):
        lines.append('\nRows with keep < 1: the sparse methods get the kept cells as `patch_index`; the dense '
                     'methods attend densely among the kept tokens only (no window).')
    return '\n'.join(lines)


if __name__ == '__main__':
    _spec = json.loads(sys.argv[1])
    print(json.dumps(measure_attention(_spec.pop('method'), AttentionPoint(**_spec))), flush=True)
