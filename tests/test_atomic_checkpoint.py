"""Checkpoints are complete or absent: a kill or a full disk while saving leaves no truncated file under a final
name, the previous checkpoint survives it, and resuming afterwards works (and cleans up)."""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.runner.checkpoint import save_checkpoint

from mmseg_sparsevit.checkpoint import CheckpointFileError, checkpoint_file_problem, find_resumable_checkpoint
from mmseg_sparsevit.engine import atomic_write, remove_stale_temporaries

ROOT = Path(__file__).resolve().parent.parent

# A toy mmengine run whose checkpoints are ~4 MB (a buffer). After iteration 1 is saved, the file-size limit
# drops to 1 MB, so saving iteration 2 hits it and SIGXFSZ kills the process mid-write.
_TOY_RUN = '''
import resource, signal, sys
import torch, torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
import mmseg_sparsevit.engine  # noqa: F401  (registers AtomicCheckpointHook)

hook_type, max_iters = sys.argv[2], int(sys.argv[3])
resume, kill_while_saving = 'resume' in sys.argv, 'kill' in sys.argv

class Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.register_buffer('ballast', torch.zeros(1 << 20))

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(torch.stack(inputs)).squeeze(-1)
        return dict(loss=((out - torch.stack(labels)) ** 2).mean()) if mode == 'loss' else out

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.full((2,), float(i)), labels=torch.tensor(float(i % 2)))

class LimitFileSize(Hook):
    priority = 'LOWEST'  # after the checkpoint hook has saved this iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if kill_while_saving and runner.iter == 0:  # iter_1.pth is saved
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: writes would fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

Runner(
    model=Toy(), work_dir=sys.argv[1], experiment_name=f'toy_{max_iters}_{resume}',
    train_dataloader=dict(dataset=Data(), sampler=dict(type='DefaultSampler', shuffle=False), batch_size=2,
                          num_workers=0),
    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
    train_cfg=dict(by_epoch=False, max_iters=max_iters),
    default_hooks=dict(checkpoint=dict(type=hook_type, interval=1, by_epoch=False, max_keep_ckpts=1)),
    custom_hooks=[LimitFileSize()], resume=resume,
).train()
print('FINISHED')
'''


def toy_run(work_dir: Path, hook_type: str, max_iters: int, *flags: str) -> subprocess.CompletedProcess:
    """``flags``: 'resume' (auto-resume from the work dir), 'kill' (SIGXFSZ while saving iteration 2)."""
    return subprocess.run(
        [sys.executable, '-c', _TOY_RUN, str(work_dir), hook_type, str(max_iters), *flags],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300)


def _temporaries(work_dir: Path):
    return sorted(p.name for p in work_dir.iterdir() if p.name.endswith('.tmp'))


def test_kill_while_saving_leaves_the_previous_checkpoint_and_resume_continues(tmp_path):
    killed = toy_run(tmp_path, 'AtomicCheckpointHook', 3, 'kill')
    assert killed.returncode == -signal.SIGXFSZ, killed.stdout[-2000:]
    names = set(os.listdir(tmp_path))
    assert 'iter_2.pth' not in names  # the interrupted save is not under its final name ...
    assert len(_temporaries(tmp_path)) == 1 and _temporaries(tmp_path)[0].startswith('.iter_2.pth.')
    assert 'iter_1.pth' in names  # ... and max_keep_ckpts=1 did not remove its predecessor first
    assert checkpoint_file_problem(str(tmp_path / 'iter_1.pth')) is None
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_1.pth')

    resumed = toy_run(tmp_path, 'AtomicCheckpointHook', 3, 'resume')
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert 'resumed epoch: 0, iter: 1' in resumed.stdout
    assert 'a checkpoint whose saving was interrupted' in resumed.stdout
    assert _temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.glob('iter_*.pth')) == ['iter_3.pth']  # max_keep_ckpts=1
    assert torch.load(tmp_path / 'iter_3.pth', weights_only=False)['meta']['iter'] == 3


def test_mmengine_checkpoint_hook_leaves_a_truncated_file_under_the_same_kill(tmp_path):
    """The control: what the same kill does to mmengine's plain CheckpointHook (why the hook above exists)."""
    killed = toy_run(tmp_path, 'CheckpointHook', 3, 'kill')
    assert killed.returncode == -signal.SIGXFSZ
    assert 'truncated' in checkpoint_file_problem(str(tmp_path / 'iter_2.pth'))
    assert not (tmp_path / 'iter_1.pth').exists()  # removed before its successor was written


def test_full_disk_while_saving_keeps_the_old_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / 'iter_2.pth'
    save_checkpoint({'meta': {'iter': 1}}, str(path), backend_args=dict(backend='atomic_local'))
    assert torch.load(path)['meta']['iter'] == 1 and (path.stat().st_mode & 0o777) == 0o666 & ~_umask()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint({'meta': {'iter': 2}}, str(path), backend_args=dict(backend='atomic_local'))
    assert torch.load(path)['meta']['iter'] == 1
    assert os.listdir(tmp_path) == ['iter_2.pth']
    with pytest.raises(OSError, match='No space left'):
        atomic_write('text', tmp_path / 'last_checkpoint')
    assert os.listdir(tmp_path) == ['iter_2.pth']

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / f'.iter_4.pth.{dead.pid}.0123abcd.tmp'
    live = tmp_path / f'.iter_4.pth.{os.getpid()}.0123abcd.tmp'
    unrelated = tmp_path / '.notes.tmp'
    for path in (stale, live, unrelated):
        path.write_bytes(b'x')
    assert remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert live.exists() and unrelated.exists()


def _write_checkpoint(path: Path, it: int) -> None:
    torch.save({'meta': {'iter': it}, 'state_dict': {'w': torch.zeros(256)}}, path)


def test_auto_resume_skips_a_damaged_latest_checkpoint_naming_it(tmp_path, mmengine_log):
    assert find_resumable_checkpoint(str(tmp_path)) is None  # nothing to resume: a fresh run
    for it in (2, 4, 6):
        _write_checkpoint(tmp_path / f'iter_{it}.pth', it)
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_6.pth'))
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_6.pth')

    data = (tmp_path / 'iter_6.pth').read_bytes()
    (tmp_path / 'iter_6.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'iter_4.pth').write_bytes(b'')
    assert find_resumable_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_2.pth')
    out = '\n'.join(mmengine_log)
    assert f'{tmp_path / "iter_6.pth"} (truncated' in out and f'{tmp_path / "iter_4.pth"} (empty file' in out

    (tmp_path / 'iter_2.pth').write_bytes(b'garbage')
    with pytest.raises(CheckpointFileError, match=f'no intact checkpoint in {tmp_path}: .*iter_2.pth'):
        find_resumable_checkpoint(str(tmp_path))


def test_train_resume_auto_continues_from_the_newest_intact_checkpoint(tmp_path):
    from mmengine.config import Config

    from mmseg_sparsevit.cli.runner import configure_training

    _write_checkpoint(tmp_path / 'iter_2.pth', 2)
    (tmp_path / 'iter_4.pth').write_bytes(b'PK\x03\x04 cut short')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    cfg = configure_training(Config(dict(work_dir=str(tmp_path))), resume='auto')
    assert (cfg.resume, cfg.load_from) == (True, str(tmp_path / 'iter_2.pth'))
