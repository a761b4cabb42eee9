"""Multi-process runs on machines without an accelerator (``--launcher pytorch`` on CPU, gloo backend).

mmengine's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally and its ``Runner`` wraps the model in
``DistributedDataParallel(device_ids=[LOCAL_RANK])``, so a multi-process run fails on a CPU-only machine even
with ``backend='gloo'``. :func:`setup_distributed` starts the process group itself before the runner is built
(the runner skips ``init_dist`` when a group exists): on an accelerator it calls mmengine's ``init_dist``
unchanged; on CPU it reads rank and world size from the launcher's environment and starts gloo (``nccl`` in a
config is replaced, with a warning, since it needs GPUs). On CPU it also selects
:class:`CPUDistributedDataParallel` as the model wrapper, which passes no device ids and reverts SyncBN to
BN: torch's SyncBatchNorm only synchronises CUDA tensors and raises on CPU ones, so on CPU each process
normalises with its own batch statistics, as a single-process run does.
"""
from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import subprocess
import sys
from typing import Any, Dict, Mapping, Tuple

import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.device import get_device
from mmengine.dist import init_dist
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS
from torch import nn

__all__ = ['CPUDistributedDataParallel', 'finish_distributed', 'launcher_env', 'release_process_group',
           'setup_distributed']

_ACCELERATORS = ('cuda', 'npu', 'mlu', 'musa')


def _count_sync_bn(module: nn.Module) -> int:
    return sum(isinstance(m, nn.SyncBatchNorm) or type(m).__name__ == 'SyncBatchNorm' for m in module.modules())


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for CPU processes: no device ids, SyncBN reverted to BN (with a warning)."""

    def __init__(self, module: nn.Module, device_ids: Any = None, output_device: Any = None, **kwargs: Any) -> None:
        num_sync_bn = _count_sync_bn(module)
        if num_sync_bn:
            print_log(f'{num_sync_bn} SyncBN layers reverted to BN: SyncBN needs CUDA tensors, so on CPU each '
                      'process normalises with its own batch statistics', logger='current', level=logging.WARNING)
            module = revert_sync_batchnorm(module)
        super().__init__(module=module, device_ids=None, output_device=None, **kwargs)


def launcher_env(launcher: str, environ: Mapping[str, str]) -> Dict[str, str]:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` for ``launcher``.

    ``pytorch`` (torchrun) sets them itself; for ``slurm`` and ``mpi`` they are derived from the scheduler's
    variables the way mmengine's ``init_dist`` derives them.
    """
    if launcher == 'pytorch':
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in environ]
        if missing:
            raise KeyError(f'--launcher pytorch expects the variables torchrun sets; missing {missing}. '
                           'Start the tool with torchrun (or python -m torch.distributed.run)')
        env = {k: environ[k] for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
        env['LOCAL_RANK'] = environ.get('LOCAL_RANK', '0')
        return env
    if launcher == 'slurm':
        addr = environ.get('MASTER_ADDR') or subprocess.getoutput(
            f"scontrol show hostname {environ['SLURM_NODELIST']} | head -n1")
        return dict(RANK=environ['SLURM_PROCID'], WORLD_SIZE=environ['SLURM_NTASKS'],
                    LOCAL_RANK=environ.get('SLURM_LOCALID', '0'), MASTER_ADDR=addr,
                    MASTER_PORT=environ.get('MASTER_PORT', '29500'))
    if launcher == 'mpi':
        if 'MASTER_ADDR' not in environ:
            raise KeyError('--launcher mpi needs MASTER_ADDR in the environment')
        return dict(RANK=environ['OMPI_COMM_WORLD_RANK'], WORLD_SIZE=environ['OMPI_COMM_WORLD_SIZE'],
                    LOCAL_RANK=environ['OMPI_COMM_WORLD_LOCAL_RANK'], MASTER_ADDR=environ['MASTER_ADDR'],
                    MASTER_PORT=environ.get('MASTER_PORT', '29500'))
    raise ValueError(f"launcher must be 'pytorch', 'slurm' or 'mpi', got {launcher!r}")


def _cpu_process_group_args(dist_cfg: Mapping[str, Any], rank: int) -> Tuple[str, Dict[str, Any]]:
    kwargs = dict(dist_cfg)
    backend = kwargs.pop('backend', 'gloo')
    if backend == 'nccl':
        if rank == 0:
            print_log("no GPU: using the 'gloo' backend instead of 'nccl' from env_cfg.dist_cfg", logger='current',
                      level=logging.WARNING)
        backend = 'gloo'
    if kwargs.get('timeout') is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    return backend, kwargs


def setup_distributed(cfg: Config) -> None:
    """Start the process group of ``cfg.launcher`` (none: nothing to do) before the runner is built.

    On CPU, also sets ``cfg.model_wrapper_cfg`` to :class:`CPUDistributedDataParallel` unless the config
    chooses a wrapper itself. Idempotent: an existing process group is kept.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none':
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    on_cpu = get_device() not in _ACCELERATORS
    if on_cpu and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(type='CPUDistributedDataParallel', broadcast_buffers=False,
                                     find_unused_parameters=cfg.get('find_unused_parameters', False))
    if torch_dist.is_initialized():
        return
    if not on_cpu:
        init_dist(launcher, **dist_cfg)
        return
    env = launcher_env(launcher, os.environ)
    os.environ.update(env)
    rank = int(env['RANK'])
    backend, kwargs = _cpu_process_group_args(dist_cfg, rank)
    torch_dist.init_process_group(backend=backend, rank=rank, world_size=int(env['WORLD_SIZE']), **kwargs)
    atexit.register(_release_at_exit)  # error paths; a run that succeeds calls finish_distributed


def release_process_group() -> None:
    """Destroy the process group while the interpreter still runs, after freeing what else holds it.

    gloo runs each collective on a worker thread, and that thread drops its reference to the finished work
    after the caller has moved on. When it holds the last reference to a tensor made in Python (the
    buffers of ``broadcast_object_list``, say), dropping it needs the GIL. During interpreter shutdown
    CPython ends any thread that asks for the GIL by unwinding it; the unwinding cannot pass gloo's work
    destructor, so the process ends in ``std::terminate`` ('terminate called without an active exception',
    SIGABRT) after the run succeeded. Destroying the group before shutdown stops this: once nothing else holds it
    (``gc.collect`` frees the reference cycles of a finished runner and so its DDP wrapper), dropping the
    group's last Python reference runs gloo's destructor with the GIL released, and it joins the worker
    threads. The caller must have dropped its own references to the runner or model."""
    if torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


def _release_at_exit() -> None:
    """:func:`release_process_group` after an error: an uncaught exception's traceback, already printed, is
    kept in ``sys.last_*`` and with it the frames that hold the runner, so it is dropped first."""
    for name in ('last_type', 'last_value', 'last_traceback', 'last_exc'):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
    release_process_group()


def finish_distributed() -> None:
    """End a run that succeeded on every rank: wait for all ranks, then destroy the process group.

    Call it after dropping the runner (its DDP wrapper holds the group): see :func:`release_process_group`
    for why the group must go before the interpreter shuts down. Not for error paths: a failed rank never
    reaches the barrier."""
    if torch_dist.is_initialized():
        torch_dist.barrier()
        release_process_group()
