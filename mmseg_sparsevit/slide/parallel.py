"""Several processes on one batch of slides (``torchrun``): who does which slide or tile, and the gathering.

Two ways to share work, both giving the files a single process writes:

- ``'slides'``: whole slides round-robin over the ranks (no communication while a slide runs);
- ``'tiles'``: every rank takes every slide, with its to-do tiles dealt round-robin; the results of each
  round go to rank 0, which keeps the slide's state and writes its outputs.

The process group is the one ``tools/train.py --launcher pytorch`` starts
(:func:`mmseg_sparsevit.engine.distributed.setup_distributed`): NCCL on GPUs, gloo on CPU.
"""
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as torch_dist

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
        """End the process group (after the last collective)."""
        if self.world_size > 1 and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


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
