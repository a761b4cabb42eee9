"""Run-safety pieces around mmengine's runner: one run per work dir, atomic checkpoints, CPU multi-process.

Importing this package registers :class:`AtomicCheckpointHook` (mmengine ``HOOKS``), the ``'atomic_local'``
file backend and :class:`CPUDistributedDataParallel` (mmengine ``MODEL_WRAPPERS``). It needs mmengine only.
"""
from .atomic_checkpoint import AtomicCheckpointHook, AtomicLocalBackend, atomic_write, remove_stale_temporaries
from .distributed import (CPUDistributedDataParallel, finish_distributed, launcher_env, release_process_group,
                          setup_distributed)
from .run_lock import WORK_DIR_LOCK_NAME, RunLock, RunLockedError, locked_work_dir

__all__ = [
    'AtomicCheckpointHook', 'AtomicLocalBackend', 'CPUDistributedDataParallel', 'RunLock', 'RunLockedError',
    'WORK_DIR_LOCK_NAME', 'atomic_write', 'launcher_env', 'locked_work_dir', 'remove_stale_temporaries',
    'setup_distributed', 'finish_distributed', 'release_process_group'
]
