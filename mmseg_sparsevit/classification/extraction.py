"""Frozen SparseViT embeddings of a classification dataset at one input size and attention mode.

Modes are the attention modes of ``models.modes``: ``vanilla`` / ``dense`` (all-to-all attention, explicit or
SDPA), ``sparse`` (windowed sparse attention) and ``sparse+prune`` (sparse attention with attention-guided token
pruning after block ``prune_after``, keeping ``M - floor(prune_ratio * M)`` of the M patch tokens, see
``models.pruning.num_kept_tokens``). Precision is one of ``EXTRACTION_PRECISIONS`` (fp32 weights, autocast).
Each image yields the final-norm CLS token, the mean of the surviving patch tokens (registers excluded) and the
model's prescribed ``embedding`` (``SparseViT.pool``: the preset's ``global_pool`` recipe, e.g. CLS for UNI-2,
CLS ++ patch mean for Virchow2).
"""
import dataclasses
import hashlib
import json
import os.path as osp
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.logging import print_log
from mmengine.utils import ProgressBar
from torch.utils.data import DataLoader, Subset

from mmseg_sparsevit.engine.run_lock import RunLock
from mmseg_sparsevit.models.modes import (ATTENTION_MODES, AUTO_PRECISION, PRECISIONS, autocast, check_mode, is_pruned,
                                          is_sparse, mode_kwargs, resolve_precision)
from mmseg_sparsevit.models.sparse_vit import SparseViT

from .dataset import RESIZE_MODES, ClassificationImages, ResizeMode, Sample
from .feature_store import FeatureStore

MODES = tuple(ATTENTION_MODES)
# The model keeps fp32 weights; the forward autocasts (``auto``: bf16 on CUDA, fp16 where unsupported, fp32 on CPU).
EXTRACTION_PRECISIONS = (AUTO_PRECISION, 'fp32', 'amp-bf16', 'amp-fp16')
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that changes the embeddings (and so identifies a feature file for resumption).

    ``arch_overrides`` are SparseViT architecture arguments (``embed_dim``, ``depth``, ...) on top of the
    ``arch`` preset. ``weights=None`` means a random init seeded by ``seed`` (tests, smoke runs).
    """

    size: int
    mode: str = 'sparse+prune'
    prune_ratio: float = 0.6
    prune_after: int = 4
    window_size: int = 8
    resize: ResizeMode = 'stretch'
    arch: str = 'uni2-h'
    arch_overrides: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f'resize must be one of {RESIZE_MODES}, got {self.resize!r}')
        if self.size < 1:
            raise ValueError(f'size must be >= 1, got {self.size}')
        if self.weights is not None and not osp.isfile(self.weights):
            raise FileNotFoundError(f'weights file not found: {self.weights}')

    @property
    def tag(self) -> str:
        """Short run name, e.g. ``sparse+prune_896_p0.6_w8``."""
        tag = f'{self.mode}_{self.size}'
        if is_pruned(self.mode):
            tag += f'_p{self.prune_ratio:g}'
        return tag + (f'_w{self.window_size}' if is_sparse(self.mode) else '')

    def backbone_kwargs(self) -> Dict[str, Any]:
        """``SparseViT`` arguments for this mode (window/pruning settings only where they act)."""
        return mode_kwargs(dict(arch=self.arch, **self.arch_overrides, window_size=self.window_size,
                                prune_ratio=self.prune_ratio, prune_after=self.prune_after, pretrained=self.weights),
                           self.mode)


def build_backbone(cfg: ExtractionConfig) -> SparseViT:
    """Frozen backbone in eval mode; random init is seeded so a resumed run rebuilds the same model."""
    torch.manual_seed(cfg.seed)
    model = SparseViT(**cfg.backbone_kwargs(), frozen=True)
    model.init_weights()
    if cfg.size % model.patch_size:
        raise ValueError(f'size={cfg.size} is not a multiple of the patch size {model.patch_size} of '
                         f'arch {cfg.arch!r}; choose e.g. {cfg.size // model.patch_size * model.patch_size}')
    return model.eval()


def resolve_extraction_precision(precision: str, device: torch.device) -> str:
    """The ``PRECISIONS`` name extraction runs at: ``precision``, or what ``auto`` means on ``device``."""
    if precision not in EXTRACTION_PRECISIONS:
        raise ValueError(f'precision must be one of {EXTRACTION_PRECISIONS} (extraction keeps fp32 weights), '
                         f'got {precision!r}')
    return resolve_precision(precision, device)


@torch.inference_mode()
def embed_batch(model: SparseViT, images: torch.Tensor, precision: str = 'fp32') -> Dict[str, Optional[torch.Tensor]]:
    """``cls`` / ``patch_mean`` (B, C) and ``embedding`` (B, D: the model's ``pool`` recipe) float32,
    ``kept_index`` (B, K) or None, ``num_kept`` (B,)."""
    with autocast(precision, images.device.type):
        out = model.forward_tokens(images)
        cls, patch_mean = model.pool(out.tokens, 'token'), model.pool(out.tokens, 'avg')
        embedding = model.pool(out.tokens)
    grid_h, grid_w = out.grid_hw
    num_kept = grid_h * grid_w if out.kept_index is None else out.kept_index.shape[1]
    return dict(cls=cls.float(), patch_mean=patch_mean.float(), embedding=embedding.float(),
                kept_index=out.kept_index, num_kept=torch.full((images.shape[0],), num_kept, dtype=torch.long))


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of the ordered (id, label, split) list: resumption must see the same dataset in the same order."""
    payload = json.dumps([(s.image_id, s.label, s.split) for s in samples]).encode()
    return hashlib.sha1(payload).hexdigest()


def extraction_meta(cfg: ExtractionConfig, samples: Sequence[Sample], device: torch.device,
                    precision: str) -> Dict[str, Any]:
    """The identity of a feature file: config, weights file size, dataset fingerprint, numerics (``amp``: the
    autocast dtype of the resolved precision, as feature files have always recorded it)."""
    amp_dtype = PRECISIONS[precision].autocast
    return dict(
        format_version=FORMAT_VERSION, config=dataclasses.asdict(cfg),
        weights_bytes=osp.getsize(cfg.weights) if cfg.weights else None,
        num_samples=len(samples), samples_sha1=samples_fingerprint(samples),
        device_type=device.type, amp=str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32')


def _batch_arrays(emb: Dict[str, Optional[torch.Tensor]], batch: List[Sample]) -> Dict[str, np.ndarray]:
    return dict(
        cls=emb['cls'].cpu().numpy(), patch_mean=emb['patch_mean'].cpu().numpy(),
        embedding=emb['embedding'].cpu().numpy(),
        label=np.asarray([s.label for s in batch], dtype=np.int64),
        id=np.asarray([s.image_id for s in batch], dtype=str),
        split=np.asarray([s.split for s in batch], dtype=str),
        num_kept=emb['num_kept'].numpy())


def extract_features(cfg: ExtractionConfig, samples: Sequence[Sample], class_names: List[str], out: str,
                     batch_size: int = 8, num_workers: int = 4, device: str = 'cpu', precision: str = 'auto',
                     max_batches: Optional[int] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Embed ``samples`` into the feature file ``out`` (``.npz``), resuming an unfinished run.

    Stops early after ``max_batches`` batches of this call (the run stays resumable). Returns
    ``dict(path, finished, num_done, num_resumed, num_samples, seconds)``: ``num_resumed`` samples were
    already stored by an earlier call, ``seconds`` is the wall time of this call's batches (loading included).
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    dev = torch.device(device)
    precision = resolve_extraction_precision(precision, dev)
    with RunLock(f'{out}.lock', target=f'feature file {out}'):  # a second extraction into `out` refuses
        store = FeatureStore(out, extraction_meta(cfg, samples, dev, precision), len(samples), overwrite)
        result = dict(path=out, finished=True, num_done=len(samples), num_resumed=len(samples),
                      num_samples=len(samples), seconds=0.0)
        if store.is_finished():
            print_log(f'{out} is complete for these settings; nothing to do', logger='current')
            return result
        done = result['num_resumed'] = store.open()
        tic = time.perf_counter()
        if done < len(samples):
            done = _extract_remaining(cfg, samples, store, done, dev, precision, batch_size, num_workers,
                                      max_batches)
        result.update(seconds=time.perf_counter() - tic, num_done=done, finished=done == len(samples))
        if result['finished']:
            store.finalize(class_names)
        else:
            print_log(f'stopped after {done}/{len(samples)} samples; run again to resume', logger='current')
    return result


def _extract_remaining(cfg: ExtractionConfig, samples: Sequence[Sample], store: FeatureStore, done: int,
                       dev: torch.device, precision: str, batch_size: int, num_workers: int,
                       max_batches: Optional[int]) -> int:
    """Embed samples ``done ..`` batch by batch, one shard each; return how many are stored now."""
    model = build_backbone(cfg).to(dev)
    dataset = ClassificationImages(samples, cfg.size, cfg.resize)
    loader = DataLoader(Subset(dataset, range(done, len(samples))), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=dev.type == 'cuda')
    print_log(f'extracting {cfg.tag} ({len(samples) - done} images, {precision}) to {store.path}',
              logger='current')
    bar = ProgressBar(len(samples) - done)
    for num_batches, (images, index) in enumerate(loader, start=1):
        start = int(index[0])
        if start != done or int(index[-1]) != done + len(index) - 1:
            raise RuntimeError(f'data loader returned samples {index.tolist()} out of order (expected from {done})')
        emb = embed_batch(model, images.to(dev, non_blocking=True), precision)
        store.write_shard(start, _batch_arrays(emb, samples[start:start + len(index)]))
        done += len(index)
        bar.update(len(index))
        if max_batches is not None and num_batches >= max_batches:
            break
    return done
