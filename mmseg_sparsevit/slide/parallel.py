"""Several processes on one batch of slides (``torchrun``): who does which slide or tile, and the gathering.

Two ways to share work, both giving the files a single process writes:

- ``'slides'``: whole slides round-robin over the ranks (no communication while a slide runs);
- ``'tiles'``: every rank takes every slide, with its to-do tiles dealt round-robin; each round every rank
  runs one batch and the results go to rank 0 in tile order (:func:`gathered_batches`), so rank 0 keeps the
  slide's state, adds tiles in the order one process would and writes the outputs.

The process group is the one ``tools/train.py --launcher pytorch`` starts
(:func:`mmseg_sparsevit.engine.distributed.setup_distributed`): NCCL on GPUs, gloo on CPU.
"""
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
from mmengine.logging import print_log

SPLITS = ('auto', 'slides', 'tiles')
# 'auto' deals whole slides when each rank gets at least this many, else splits the tiles of each slide.
_SLIDES_PER_RANK = 4


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``world_size`` processes of a run (a single process by default)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> List[Any]:
        """``obj`` of every rank, in rank order (picklable objects)."""
        if self.world_size == 1:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """``obj`` of every rank on rank 0, in rank order (None on the other ranks)."""
        if self.world_size == 1:
            return [obj]
        gathered: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def close(self) -> None:
        """End the process group (after the last collective), joining gloo's worker threads."""
        if self.world_size > 1:
            from mmseg_sparsevit.engine.distributed import release_process_group
            release_process_group()


SINGLE = Ranks()


def init_ranks(device: str = 'cpu') -> Ranks:
    """The ranks of a ``torchrun`` launch (its ``WORLD_SIZE`` > 1), starting the process group; else one process.

    The group is NCCL for a CUDA ``device`` and gloo otherwise."""
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return SINGLE
    if not torch_dist.is_initialized():
        from mmengine.config import Config

        from mmseg_sparsevit.engine.distributed import setup_distributed
        backend = 'nccl' if torch.device(device).type == 'cuda' else 'gloo'
        setup_distributed(Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend=backend)))))
    return Ranks(torch_dist.get_rank(), torch_dist.get_world_size())


def rank_device(device: str) -> str:
    """``cuda`` becomes this process's GPU (``LOCAL_RANK``) under torchrun; other devices are kept."""
    if device == 'cuda' and 'LOCAL_RANK' in os.environ:
        return f'cuda:{int(os.environ["LOCAL_RANK"])}'
    return device


def resolve_split(split: str, num_slides: int, ranks: Ranks) -> str:
    """``'slides'`` or ``'tiles'`` for ``split`` (``'auto'``: whole slides when every rank gets several)."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if split != 'auto':
        return split
    return 'slides' if num_slides >= _SLIDES_PER_RANK * ranks.world_size else 'tiles'


def deal(items: Sequence[Any], ranks: Ranks) -> List[Any]:
    """This rank's share of ``items``, round-robin (rank r takes items r, r + world_size, ...)."""
    return list(items[ranks.rank::ranks.world_size])


def gathered_batches(compute: Callable[[torch.Tensor], np.ndarray], loader: Iterable, num_todo: int, batch_size: int,
                     ranks: Ranks = SINGLE) -> Iterator[Optional[Tuple[np.ndarray, np.ndarray]]]:
    """Run ``compute`` on this rank's ``(indices, tiles)`` batches of ``loader`` (its share of ``num_todo`` tiles,
    dealt by :func:`deal`), one batch per round; yield each round's ``(indices, outputs)`` of all ranks, in tile
    order, on rank 0 (None on the others).

    A round covers the next ``world_size * batch_size`` tiles of the to-do list, so rank 0 sees the tiles in
    the order a single process does. An error on any rank ends every rank's loop with it (a RuntimeError
    naming it) instead of leaving the others waiting in the next collective."""
    batches = iter(loader)
    num_rounds = -(-(-(-num_todo // ranks.world_size)) // batch_size)
    for _ in range(num_rounds):
        indices, outputs, error = np.zeros(0, np.int64), None, None
        try:
            batch = next(batches, None)
            if batch is not None:
                indices, outputs = batch[0].numpy(), compute(batch[1])
        except Exception as err:  # noqa: BLE001 - reaches every rank below
            error = f'{type(err).__name__}: {err}'
            print_log(traceback.format_exc(), logger='current', level=40)
        errors = [e for e in ranks.all_gather(error) if e is not None]
        if errors:
            raise RuntimeError(f'tile batch failed: {errors[0]}')
        shares = ranks.gather((indices, outputs))
        if shares is None:
            yield None
            continue
        shares = [(i, o) for i, o in shares if len(i)]
        round_indices = np.concatenate([i for i, _ in shares])
        order = np.argsort(round_indices, kind='stable')
        yield round_indices[order], np.concatenate([o for _, o in shares])[order]
