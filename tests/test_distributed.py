"""Multi-process runs on CPU (gloo): the launchers start, a refused work-dir lock stops every rank, the process
group goes before interpreter shutdown, and the demo config trains, resumes and tests in 2 processes through the
tools, matching 1 process."""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mmseg_sparsevit.engine import RunLock, launcher_env
from mmseg_sparsevit.engine.run_lock import WORK_DIR_LOCK_NAME

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / 'configs/demo/mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py')


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

setup_distributed(Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo')))))
try:
    with locked_work_dir(sys.argv[1]):
        print(f'rank {dist.get_rank()} LOCKED', flush=True)
except RunLockedError as err:
    print(f'rank {dist.get_rank()} REFUSED: {err}', flush=True)
'''


def test_a_refused_work_dir_lock_stops_every_rank(tmp_path):
    """Only rank 0 tries the lock (the tool-level test below shows both ranks of one run sharing it); when it is
    refused, rank 1 must stop too instead of waiting for rank 0 in the next collective."""
    script = tmp_path / 'lock.py'
    script.write_text(_LOCK_SCRIPT)
    work_dir = tmp_path / 'work'
    with RunLock(str(work_dir / WORK_DIR_LOCK_NAME)):  # another run holds the work dir
        run = torchrun(str(script), str(work_dir))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'LOCKED' not in run.stdout
    assert f'rank 0 REFUSED: work dir {work_dir} is in use by another run (pid {os.getpid()}' in run.stdout
    assert f'rank 1 REFUSED: rank 0 could not lock {work_dir}: RunLockedError' in run.stdout


# gloo's worker threads of this process, by the names torch gives them (Linux)
_GLOO_THREADS = '''
import os

def gloo_threads():
    names = []
    for task in os.listdir('/proc/self/task'):
        try:
            with open(f'/proc/self/task/{task}/comm') as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if 'gloo' in name)
'''

_FINISH_SCRIPT = _GLOO_THREADS + '''
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmseg_sparsevit.engine import CPUDistributedDataParallel, finish_distributed, setup_distributed

setup_distributed(Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo')))))
rank = dist.get_rank()


class Run:  # holds the DDP model in a reference cycle, as mmengine's runner and its loops do
    pass


run = Run()
run.model, run.me = CPUDistributedDataParallel(torch.nn.Linear(2, 2)), run
box = [{'IoU': 0.5} if rank == 0 else None]
dist.broadcast_object_list(box, src=0)  # a finished collective on buffers made in Python
print(f'rank {rank} running: {gloo_threads()}', flush=True)
del run
finish_distributed()
print(f'rank {rank} finished: {gloo_threads()}', flush=True)
'''


def test_finish_distributed_joins_gloo_threads_before_shutdown(tmp_path):
    """A gloo worker thread that drops a finished collective's Python-made buffers needs the GIL; left running
    into interpreter shutdown it aborts the process ('terminate called without an active exception'). So
    finish_distributed must destroy the group, and with it those threads, while the interpreter runs, even when
    a DDP wrapper held in a reference cycle (a finished runner) still refers to the group."""
    script = tmp_path / 'finish.py'
    script.write_text(_FINISH_SCRIPT)
    run = torchrun(str(script))
    assert run.returncode == 0, run.stdout[-3000:]
    for rank in (0, 1):
        running = re.search(rf'rank {rank} running: (.*)', run.stdout)[1]
        assert 'pt_gloo_runloop' in running  # the threads exist, so their absence below means something
        assert f'rank {rank} finished: []' in run.stdout


_ERROR_SCRIPT = _GLOO_THREADS + '''
import atexit

atexit.register(lambda: print(f'rank {os.environ["RANK"]} at exit: {gloo_threads()}', flush=True))  # runs last

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmseg_sparsevit.engine import CPUDistributedDataParallel, setup_distributed

setup_distributed(Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='gloo')))))


def run():
    model = CPUDistributedDataParallel(torch.nn.Linear(2, 2))  # held by this frame, so by the traceback
    box = [{'IoU': 0.5} if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    raise RuntimeError('the run failed')


run()
'''


def test_a_failed_run_also_joins_gloo_threads_before_shutdown(tmp_path):
    """On an error path the printed traceback keeps the frames holding the DDP model alive into shutdown; the
    exit handler of setup_distributed must still end the group first."""
    script = tmp_path / 'error.py'
    script.write_text(_ERROR_SCRIPT)
    run = torchrun(str(script))
    assert run.returncode != 0 and 'RuntimeError: the run failed' in run.stdout
    assert 'terminate called' not in run.stdout
    assert sorted(re.findall(r'rank (\d) at exit: \[\]', run.stdout)) == ['0', '1'], run.stdout[-3000:]


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


# runs tools/<argv[1]> as a script, then reports the gloo threads still alive when the tool returns
_TOOL_SCRIPT = _GLOO_THREADS + '''
import runpy
import sys

tool = sys.argv.pop(1)
sys.argv[0] = tool
code = 0
try:
    runpy.run_path(tool, run_name='__main__')
except SystemExit as end:
    code = end.code
print(f'rank {os.environ["RANK"]} gloo threads after the tool: {gloo_threads()}', flush=True)
sys.exit(code)
'''


def run_tool(tool: str, *args: str, processes: int = 1) -> str:
    """``tools/<tool> ARGS`` in one process, or in ``processes`` CPU processes via torchrun; returns the output.

    With torchrun, each rank must have joined gloo's threads by the time the tool returns (see
    test_finish_distributed_joins_gloo_threads_before_shutdown): the tool must drop its runner first."""
    if processes == 1:
        # One thread, as in each torchrun process: another thread count sums floats in another order, and a
        # pixel of a barely trained model whose two class scores nearly tie can then change class.
        run = subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *args], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=600)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            wrapper = Path(scratch) / 'run_tool.py'
            wrapper.write_text(_TOOL_SCRIPT)
            run = torchrun(str(wrapper), str(ROOT / 'tools' / tool), *args, '--launcher', 'pytorch', timeout=600)
    assert run.returncode == 0, f'{tool} {args} ({processes} processes) failed:\n{run.stdout[-5000:]}'
    if processes > 1:
        assert sorted(re.findall(r'rank (\d+) gloo threads after the tool: \[\]', run.stdout)) == ['0', '1'], \
            run.stdout[-3000:]
    return run.stdout


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    from mmseg_sparsevit.datasets.synthetic import make_demo_data

    root = tmp_path_factory.mktemp('segpath_demo')
    make_demo_data(str(root), antigens=['panCK'], tiles_per_antigen=18, tile_size=128)  # 3 val / 3 test tiles
    return root


def tiny_run_options(data_root, max_iters: int):
    """Batch 1, validation and a checkpoint only at the last iteration, the demo data, SyncBN in the adapter."""
    return ['--cfg-options', f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}',
            f'default_hooks.checkpoint.interval={max_iters}', 'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=1', 'model.backbone.norm_cfg.type=SyncBN',
            *(f'{split}_dataloader.dataset.data_root={data_root}' for split in ('train', 'val', 'test'))]


def test_two_cpu_processes_train_resume_and_test_like_one(demo_root, tmp_path):
    work_dir = tmp_path / 'train'
    log = run_tool('train.py', DEMO, '--work-dir', str(work_dir), *tiny_run_options(demo_root, 2), processes=2)
    assert 'Distributed training: True' in log
    assert re.search(r'SyncBN layers reverted to BN', log)  # SyncBN raises on CPU tensors
    assert len(re.findall(r'Saving checkpoint at 2 iterations', log)) == 1
    assert sorted(p.name for p in work_dir.glob('*.pth')) == ['best_IoU_iter_2.pth', 'iter_2.pth']
    assert not [p for p in work_dir.iterdir() if p.name.endswith('.tmp') or p.name == WORK_DIR_LOCK_NAME]

    log = run_tool('train.py', DEMO, '--work-dir', str(work_dir), '--resume', *tiny_run_options(demo_root, 3),
                   processes=2)
    assert 'resumed epoch: 0, iter: 2' in log
    assert [int(i) for i in re.findall(r'Iter\(train\) \[\s*(\d+)/3\]', log)] == [3]  # continued
    ckpt = torch.load(work_dir / 'iter_3.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['iter'] == 3

    # 3 test tiles on 2 processes: the sampler pads rank 1 with a repeated tile, which the collection must drop
    metrics = {}
    for processes in (1, 2):
        test_dir = tmp_path / f'test_{processes}'
        run_tool('test.py', DEMO, str(work_dir / 'iter_3.pth'), '--work-dir', str(test_dir),
                 *tiny_run_options(demo_root, 3), processes=processes)
        metrics[processes] = json.loads((test_dir / 'segpath_metrics.json').read_text())['metrics']
    assert metrics[1].keys() == metrics[2].keys() and {'IoU', 'Dice', 'MPA'} <= metrics[1].keys()
    for name, value in metrics[1].items():
        assert metrics[2][name] == pytest.approx(value, abs=1e-6), name
