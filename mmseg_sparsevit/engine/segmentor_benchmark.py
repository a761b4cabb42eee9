"""Train-step and inference time and peak memory of a full segmentor built from a config, with the memory
broken down by part (ViT blocks, adapter, pixel decoder, transformer decoder, loss); one fresh process per point.

A point is (setting, input side, phase). A *setting* is an attention mode (``models.modes``) and optional memory
levers (:data:`LEVERS`), written ``MODE[:LEVER,LEVER...]``, e.g. ``sparse:adapter-cp,bf16``. The phase is
``train`` (``model.train_step``: data preprocessor, forward, loss, backward, optimizer step, as the runner does)
or ``infer`` (``model.test_step`` without gradients).

Two memory figures per point:

* the headline peak: on CUDA ``max_memory_allocated`` over the timed steps; on CPU the process' resident set size
  sampled during the steps (``benchmark.process.RssSampler``), reported absolute (``peak_gb``) and above the
  RSS just before the first step (``step_gb``: activations, gradients, optimizer state and allocator slack);
* the breakdown, from one extra step under :class:`LiveTensorBytes`: every storage an ATen op allocates during
  the step is counted until it is freed, and owned by the part whose module (or the head's ``loss_by_feat``)
  was running when it was allocated. Counts are exact tensor bytes, the same on every run and device; they
  leave out what RSS also holds (allocator caches, weights, optimizer state made before the step, thread
  stacks). Parts are reported at the step's peak of live tensor bytes and, for training, at the end of the
  forward pass (what the backward pass needs). Allocations outside every part count as ``other`` (data
  preprocessor, glue between modules) in the forward pass; everything allocated later counts as ``backward``
  (gradients, and activations recomputed by checkpointing) or ``optimizer``. In an inference step every
  allocation is a forward one.

It lives beside the runner pieces, not in the torch-level ``benchmark`` package, because it builds mmseg models;
it reuses that package's fresh-process runner and RSS sampler. Run as
``python -m mmseg_sparsevit.engine.segmentor_benchmark SPEC_JSON`` it measures one point and prints the record.
"""
import copy
import fnmatch
import json
import os
import statistics
import sys
import time
import weakref
from functools import partial
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mmseg_sparsevit.models.modes import PRECISIONS, check_mode, mode_kwargs
from mmseg_sparsevit.utils.markdown import markdown_table

from mmseg_sparsevit.benchmark.process import RssSampler, current_rss_bytes, max_rss_bytes, run_worker

GB = 1024 ** 3
PHASES = ('train', 'infer')
# Part -> module-name patterns (fnmatch, first part wins; a hooked module's children are not hooked again).
PART_MODULES: Dict[str, Tuple[str, ...]] = {
    'vit': ('backbone.vit.patch_embed', 'backbone.vit.blocks.*'),
    'spm': ('backbone.spm',),
    'injectors': ('backbone.interactions.*.injector',),
    'extractors': ('backbone.interactions.*.extractors.*',),
    'adapter_out': ('backbone.up', 'backbone.out_norms.*', 'backbone.level_projs.*', 'backbone.vit_projs.*'),
    'pixel_decoder': ('decode_head.pixel_decoder',),
    'loss': ('decode_head.loss_*',),
    'transformer_decoder': ('decode_head.*',),
}
PARTS = tuple(PART_MODULES)
OWNERS = PARTS + ('other', 'backward', 'optimizer')  # every allocation has exactly one owner
# Memory levers: short name -> config options (``--cfg-options`` keys) or an autocast precision for training.
LEVERS: Dict[str, Dict[str, Any]] = {
    'vit-cp': {'model.backbone.vit_cfg.with_cp': True},  # recompute each ViT block in the backward pass
    'adapter-cp': {'model.backbone.with_cp': True},  # recompute each interaction (injector, blocks, extractors)
    # recompute each of the pixel decoder's deformable encoder layers (models/pixel_decoder.py)
    'decoder-cp': {'model.decode_head.pixel_decoder.type': 'CheckpointedPixelDecoder'},
    'freeze-vit': {'model.backbone.freeze_vit': True},  # no ViT gradients / optimizer state (changes training)
    # 256-wide adapter outputs (Mask2Former's width) instead of embed_dim: changes the model (SparseViTAdapter docs)
    'narrow': {'model.backbone.out_channels': 256, 'model.decode_head.in_channels': [256] * 4},
    'bf16': {},  # bf16 autocast (AmpOptimWrapper dtype bfloat16 on CUDA)
    'fp16': {},  # fp16 autocast with dynamic loss scaling (AmpOptimWrapper on CUDA)
}
AMP_LEVERS = ('bf16', 'fp16')


@dataclass(frozen=True)
class Setting:
    """An attention mode with memory levers, parsed from ``MODE[:LEVER,...]``."""

    mode: str
    levers: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> 'Setting':
        mode, _, levers = text.partition(':')
        check_mode(mode)
        names = tuple(name for name in levers.split(',') if name)
        unknown = [name for name in names if name not in LEVERS]
        if unknown:
            raise ValueError(f'setting {text!r}: unknown lever(s) {unknown}; known: {list(LEVERS)}')
        if sum(name in AMP_LEVERS for name in names) > 1:
            raise ValueError(f'setting {text!r}: choose one of {AMP_LEVERS}')
        return cls(mode, names)

    @property
    def name(self) -> str:
        return self.mode + (':' + ','.join(self.levers) if self.levers else '')

    @property
    def amp(self) -> Optional[str]:
        return next((name for name in self.levers if name in AMP_LEVERS), None)

    def cfg_options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {}
        for name in self.levers:
            options.update(LEVERS[name])
        return options


@dataclass(frozen=True)
class SegmentorPoint:
    """One measurement: config (+ options), setting, square input side, phase, device and repeats."""

    config: str
    setting: str
    size: int
    phase: str = 'train'
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    device: str = 'cpu'
    batch_size: int = 1
    warmup: int = 1
    repeats: int = 2
    threads: Optional[int] = None
    breakdown: bool = True

    def __post_init__(self) -> None:
        Setting.parse(self.setting)
        if self.phase not in PHASES:
            raise ValueError(f'phase must be one of {PHASES}, got {self.phase!r}')
        for name, least in (('size', 1), ('batch_size', 1), ('warmup', 0), ('repeats', 1)):
            if getattr(self, name) < least:
                raise ValueError(f'{name} must be >= {least}, got {getattr(self, name)}')


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages allocated by ATen ops while active, until each is freed.

    Every new storage is owned by ``owner()`` at its allocation (views and in-place results reuse a counted
    storage); the count per owner and in total is kept live, and copied at each new peak of the total.
    Storages that existed before the mode started are not counted.
    """

    def __init__(self, owner: Callable[[], str]) -> None:
        super().__init__()
        self.owner = owner
        self.live: Dict[str, int] = dict.fromkeys(OWNERS, 0)
        self.total = self.peak = 0
        self.at_peak: Dict[str, int] = dict(self.live)
        self._seen: 'weakref.WeakSet' = weakref.WeakSet()

    def _freed(self, owner: str, nbytes: int) -> None:
        self.live[owner] -= nbytes
        self.total -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == 'meta':
                continue
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            self._seen.add(storage)
            owner, nbytes = self.owner(), storage.nbytes()
            self.live[owner] += nbytes
            self.total += nbytes
            weakref.finalize(storage, self._freed, owner, nbytes)
            if self.total > self.peak:
                self.peak, self.at_peak = self.total, dict(self.live)
        return out


class PartTracker:
    """Which part of the segmentor runs now: forward pre/post hooks on each part's modules (nested calls of
    one part count once) and the phase of the train step (forward, backward, optimizer)."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: List[str] = []
        self.phase = 'forward'
        self.handles = []
        hooked: List[str] = []
        for name, module in model.named_modules():
            if not name or any(name.startswith(h + '.') for h in hooked):
                continue
            part = next((p for p, patterns in PART_MODULES.items()
                         if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)), None)
            if part is None:
                continue
            hooked.append(name)
            self.handles.append(module.register_forward_pre_hook(partial(self._enter, part)))
            self.handles.append(module.register_forward_hook(self._exit))
        self.hooked = hooked
        head = getattr(model, 'decode_head', None)
        self._head = head if head is not None and hasattr(head, 'loss_by_feat') else None
        if self._head is not None:
            original = self._head.loss_by_feat

            def loss_by_feat(*args, **kwargs):
                self.stack.append('loss')
                try:
                    return original(*args, **kwargs)
                finally:
                    self.stack.pop()
            self._head.loss_by_feat = loss_by_feat

    def _enter(self, part: str, *_: Any) -> None:
        self.stack.append(part)

    def _exit(self, *_: Any) -> None:  # a forward hook returning something would replace the output
        self.stack.pop()

    def owner(self) -> str:
        # After the forward pass the part is not asked: checkpointing's recomputation stops early (no forward
        # hook closes its part), so gradients and recomputed activations alike count as 'backward'.
        if self.phase != 'forward':
            return self.phase
        return self.stack[-1] if self.stack else 'other'

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        if self._head is not None:
            del self._head.loss_by_feat


def build_config(point: SegmentorPoint):
    """The point's config: file, ``cfg_options``, the setting's levers and attention mode (applied to the
    backbone's ``vit_cfg`` through ``models.modes.mode_kwargs``)."""
    from mmengine.config import Config
    cfg = Config.fromfile(point.config)
    setting = Setting.parse(point.setting)
    cfg.merge_from_dict({**point.cfg_options, **setting.cfg_options()})
    backbone = cfg.model.get('backbone', {})
    if 'vit_cfg' not in backbone:
        raise KeyError(f'{point.config}: model.backbone has no vit_cfg (a SparseViT / SparseViTAdapter backbone), '
                       f'so attention mode {setting.mode!r} cannot be set')
    backbone['vit_cfg'] = mode_kwargs(dict(backbone['vit_cfg']), setting.mode)
    return cfg


def synthetic_batch(size: int, batch_size: int, num_classes: int) -> Dict[str, List[Any]]:
    """``batch_size`` seeded uint8 images and blob-shaped masks of ``num_classes`` classes, as a dataloader gives."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8))
        coarse = torch.randint(0, num_classes, (1, 1, max(1, size // 16), max(1, size // 16)), generator=gen)
        mask = nn.functional.interpolate(coarse.float(), size=(size, size), mode='nearest')[0].long()
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=mask)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _build(point: SegmentorPoint, setting: Setting, device: torch.device):
    """Model (SyncBN reverted outside a process group, as mmengine's runner does) and optimizer wrapper.

    AMP levers use the config's ``AmpOptimWrapper`` path (``cli.runner.configure_training``) on CUDA; mmengine's
    AmpOptimWrapper needs CUDA, so on CPU the train step runs under ``torch.autocast`` instead (no loss scaler).
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.utils import import_modules_from_strings
    from mmseg.registry import MODELS

    import mmseg_sparsevit  # noqa: F401  (registration)
    from mmseg_sparsevit.cli.runner import configure_training

    cfg = build_config(point)
    if cfg.get('custom_imports'):
        import_modules_from_strings(**cfg.custom_imports)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    if setting.amp and device.type == 'cuda':
        configure_training(cfg, amp=setting.amp)
    torch.manual_seed(0)
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).to(device)
    if hasattr(model, 'init_weights'):
        model.init_weights()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper) if point.phase == 'train' else None
    return cfg, model, optim_wrapper


def run_point(point: SegmentorPoint) -> Dict[str, Any]:
    """Warm-up and timed steps of one point in this process, then (``breakdown``) one tracked step."""
    if point.threads:
        torch.set_num_threads(point.threads)
    device = torch.device(point.device)
    cuda = device.type == 'cuda'
    setting = Setting.parse(point.setting)
    cfg, model, optim_wrapper = _build(point, setting, device)
    num_classes = cfg.model.decode_head.get('num_classes', 2)
    data = synthetic_batch(point.size, point.batch_size, num_classes)
    # Autocast here wherever the optimizer wrapper does not apply it: inference, and training on CPU.
    autocast = setting.amp and (point.phase == 'infer' or not cuda)

    def step() -> None:
        with ExitStack() as stack:
            if autocast:
                stack.enter_context(torch.autocast(device.type, dtype=PRECISIONS[f'amp-{setting.amp}'].autocast))
            if point.phase == 'train':
                model.train()
                model.train_step(copy.copy(data), optim_wrapper)
            else:
                model.eval()
                with torch.no_grad():
                    model.test_step(copy.copy(data))
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else current_rss_bytes()
    times = []
    with RssSampler() as sampler:
        for i in range(point.warmup + point.repeats):
            start = time.perf_counter()
            step()
            if i >= point.warmup:
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else max(sampler.peak, max_rss_bytes())
    record = dict(status='ok', pid=os.getpid(), time_s=statistics.median(times), times_s=times, peak_gb=peak / GB,
                  step_gb=(peak - before) / GB,
                  weights_gb=sum(p.numel() * p.element_size() for p in model.parameters()) / GB,
                  trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  amp=setting.amp, amp_path=('AmpOptimWrapper' if cuda else 'torch.autocast') if setting.amp else None)
    if point.breakdown:
        record.update(tracked_step(model, optim_wrapper, step))
    return record


def tracked_step(model: nn.Module, optim_wrapper: Any, step: Callable[[], None]) -> Dict[str, Any]:
    """One more step under :class:`LiveTensorBytes`: peak live tensor bytes and their owners at the peak and, for a
    train step, at the end of the forward pass."""
    parts = PartTracker(model)
    boundary: Dict[str, int] = {}
    patched = []
    if optim_wrapper is not None:
        def phase_at(name: str, phase: str, snapshot: bool = False) -> None:
            original = getattr(optim_wrapper, name)

            def wrapped(*args, **kwargs):
                if snapshot:
                    boundary.update(counter.live, total=counter.total)
                parts.phase = phase
                return original(*args, **kwargs)
            setattr(optim_wrapper, name, wrapped)
            patched.append(name)
        phase_at('backward', 'backward', snapshot=True)
        phase_at('step', 'optimizer')
    counter = LiveTensorBytes(parts.owner)
    try:
        with counter:
            step()
    finally:
        parts.remove()
        for name in patched:
            delattr(optim_wrapper, name)
    out = dict(tensor_peak_gb=counter.peak / GB, parts_at_peak_gb={k: v / GB for k, v in counter.at_peak.items()},
               hooked_modules=len(parts.hooked))
    if boundary:
        total = boundary.pop('total')
        out.update(tensor_forward_end_gb=total / GB, parts_at_forward_end_gb={k: v / GB for k, v in boundary.items()})
    return out


def measure_segmentor_point(point: SegmentorPoint, timeout_s: float = 1800.0) -> Dict[str, Any]:
    """:func:`run_point` in a fresh interpreter (``benchmark.process.run_worker``); a crash, out-of-memory kill or
    timeout becomes a record with ``status`` ``error`` / ``timeout`` naming the worker's last line."""
    run = run_worker('mmseg_sparsevit.engine.segmentor_benchmark', asdict(point), timeout_s)
    base = dict(setting=point.setting, size=point.size, phase=point.phase)
    if run.returncode is None:
        return dict(base, status='timeout', error=run.tail)
    if run.returncode != 0 or run.record is None:
        return dict(base, status='error', error=f'exit {run.returncode}: {run.tail}')
    return dict(base, **run.record)


def _gb(record: Mapping[str, Any], key: str) -> str:
    return f'{record[key]:.2f}' if key in record else ''


def segmentor_markdown(records: Sequence[Mapping[str, Any]], header: Mapping[str, Any]) -> str:
    """Side-by-side table (time and memory per setting, side and phase), the breakdown by part at the peak of
    live tensor bytes, and the run's settings as JSON; every figure comes from ``records``."""
    device = header.get('device', 'cpu')
    peak_name = 'max allocated (GB)' if str(device).startswith('cuda') else 'peak RSS (GB)'
    rows = []
    for r in records:
        if r.get('status') != 'ok':
            rows.append([r['phase'], r['size'], r['setting'], r.get('status'), r.get('error', '')] + [''] * 3)
            continue
        rows.append([r['phase'], r['size'], r['setting'], f"{r['time_s']:.2f}", _gb(r, 'peak_gb'),
                     _gb(r, 'step_gb'), _gb(r, 'tensor_peak_gb'), _gb(r, 'tensor_forward_end_gb')])
    lines = [f"Device {device}, batch {header.get('batch_size', 1)}, threads {header.get('threads')}.", '',
             markdown_table(['phase', 'px', 'setting', 'time / step (s)', peak_name, 'above start of steps (GB)',
                             'live tensors at peak (GB)', 'live tensors at forward end (GB)'], rows)]
    ok = [r for r in records if r.get('status') == 'ok' and 'parts_at_peak_gb' in r]
    for key, title in (('parts_at_peak_gb', 'at the peak of live tensor bytes'),
                       ('parts_at_forward_end_gb', 'at the end of the forward pass (train)')):
        with_key = [r for r in ok if key in r]
        if with_key:
            lines += ['', f'Live tensor bytes by the part that allocated them, {title} (GB):', '',
                      markdown_table(['phase', 'px', 'setting', *OWNERS],
                                     [[r['phase'], r['size'], r['setting'],
                                       *(f'{r[key].get(o, 0.0):.3f}' for o in OWNERS)] for r in with_key])]
    lines += ['', '```', json.dumps(dict(header), indent=1, default=str), '```']
    return '\n'.join(lines) + '\n'


def plot_segmentor(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Per phase: headline peak memory and time per step against the input side, one line per setting."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    phases = [p for p in PHASES if any(r['phase'] == p for r in records)] or ['train']
    fig, axes = plt.subplots(len(phases), 3, figsize=(15, 4 * len(phases)), squeeze=False)
    for row, phase in zip(axes, phases):
        panels = (('peak_gb', 'peak memory (GB)'), ('tensor_peak_gb', 'live tensors at peak (GB)'),
                  ('time_s', 'time per step (s)'))
        for ax, (key, title) in zip(row, panels):
            for setting in dict.fromkeys(r['setting'] for r in records):
                pts = sorted((r['size'], r[key]) for r in records if r['setting'] == setting and r['phase'] == phase
                             and r.get('status') == 'ok' and key in r)
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker='o', label=setting)
            ax.set(xlabel='input side (px)', title=f'{phase}: {title}')
            ax.grid(True, alpha=0.3)
        row[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_segmentor_reports(out_dir: str, records: List[Dict[str, Any]], header: Dict[str, Any]) -> Dict[str, Path]:
    """``segmentor.json`` (header + records), ``segmentor.md`` and ``segmentor.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / 'segmentor.json', md=out / 'segmentor.md', png=out / 'segmentor.png')
    paths['json'].write_text(json.dumps(dict(header, records=records), indent=1, default=str))
    paths['md'].write_text(segmentor_markdown(records, header))
    plot_segmentor(records, paths['png'])
    return paths


if __name__ == '__main__':
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel('WARNING')  # no per-parameter init log in the worker's output
    print(json.dumps(run_point(SegmentorPoint(**json.loads(sys.argv[1])))), flush=True)
