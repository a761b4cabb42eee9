"""mmengine checkpoints load under torch >= 2.6 with weights_only=True, and nothing else does."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

import mmseg_sparsevit  # noqa: F401  (registers the safe globals and the local loader)
from mmseg_sparsevit.checkpoint import CheckpointFileError, load_checkpoint_file


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(torch.stack(inputs) if isinstance(inputs, list) else inputs)
        if mode == 'loss':
            return dict(loss=((out.squeeze(-1) - torch.stack(labels).float()) ** 2).mean())
        return out


class ToyDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, idx):
        return dict(inputs=torch.full((2,), float(idx)), labels=torch.tensor(idx % 2))


def _train_toy_runner(work_dir, max_iters=3, resume=False):
    return Runner(
        model=ToyModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyDataset(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, num_workers=0),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=10),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1000),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=max_iters, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume, experiment_name=f'toy_{max_iters}_{resume}', randomness=dict(seed=0),
    )


def test_runner_checkpoint_loads_and_resumes(tmp_path):
    runner = _train_toy_runner(tmp_path, max_iters=3)
    runner.train()
    ckpt_path = tmp_path / 'iter_3.pth'
    assert ckpt_path.is_file()

    ckpt = load_checkpoint_file(str(ckpt_path))
    assert ckpt['meta']['iter'] == 3
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
    torch.testing.assert_close(ckpt['state_dict']['linear.weight'], runner.model.linear.weight.detach())

    # The same checkpoint through mmengine's own loading and resuming paths.
    model = ToyModel()
    load_checkpoint(model, str(ckpt_path), map_location='cpu')
    torch.testing.assert_close(model.linear.weight, runner.model.linear.weight)
    resumed = _train_toy_runner(tmp_path, max_iters=5, resume=True)
    resumed.train()
    assert resumed.iter == 5
    assert (tmp_path / 'iter_5.pth').is_file()


def test_runner_checkpoint_loads_in_a_fresh_interpreter(tmp_path, run_fresh_python):
    # A fresh process has created no HistoryBuffer yet, so its class-level statistics table is
    # still empty when the checkpoint is unpickled (the resume path of tools/train.py).
    runner = _train_toy_runner(tmp_path, max_iters=2)
    runner.train()
    code = ('import mmseg_sparsevit\n'
            'from mmengine.runner.checkpoint import CheckpointLoader\n'
            f'ckpt = CheckpointLoader.load_checkpoint({str(tmp_path / "iter_2.pth")!r}, map_location="cpu")\n'
            "print('LOADED', ckpt['meta']['iter'], ckpt['message_hub']['log_scalars']['train/loss'].mean())\n")
    stdout = run_fresh_python(code)
    assert stdout.splitlines()[-1].split()[:2] == ['LOADED', '2']


def test_message_hub_and_numpy_meta_roundtrip(tmp_path):
    hub = MessageHub.get_instance('roundtrip_hub')
    hub.update_scalar('train/loss', 0.25)
    hub.update_info('np_scalar', np.float64(1.5))
    path = tmp_path / 'ck.pth'
    torch.save({'meta': {'seed': np.int64(7), 'arr': np.arange(4)}, 'message_hub': hub.state_dict()}, path)
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert loaded['meta']['seed'] == 7
    np.testing.assert_array_equal(loaded['meta']['arr'], np.arange(4))
    assert loaded['message_hub']['log_scalars']['train/loss'].current() == 0.25
    assert loaded['message_hub']['runtime_info']['np_scalar'] == 1.5


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


class _GetattrExploit:
    """getattr is allow-listed for HistoryBuffer statistics only; any other attribute is refused."""

    def __reduce__(self):
        return (getattr, (HistoryBuffer, '__init__'))


@pytest.mark.parametrize('payload_factory, expected', [
    (lambda marker: _Exploit(marker), 'system'),
    (lambda marker: _GetattrExploit(), "getattr(<class 'mmengine.logging.history_buffer.HistoryBuffer'>, '__init__')"),
])
def test_untrusted_pickle_is_refused_naming_the_file(tmp_path, payload_factory, expected):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'payload': payload_factory(marker)}, path)
    with pytest.raises(pickle.UnpicklingError) as info:
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert not marker.exists()


DAMAGE = {'empty': lambda data: b'', 'truncated': lambda data: data[:len(data) // 2],
          'garbage': lambda data: b'not a checkpoint\n' * 20, 'truncated_legacy': lambda data: data[:-16]}


@pytest.mark.parametrize('kind, reason', [
    ('empty', 'empty file (0 bytes)'),
    ('truncated', 'truncated: a zip archive of'),
    ('garbage', 'not a torch checkpoint'),
    ('truncated_legacy', 'it may be damaged: RuntimeError'),
])
def test_damaged_checkpoint_names_the_file_and_the_damage(tmp_path, kind, reason):
    path = tmp_path / f'{kind}.pth'
    legacy = kind == 'truncated_legacy'  # torch's pre-zip format: only loading finds the damage
    torch.save({'state_dict': {'w': torch.zeros(64)}}, path, _use_new_zipfile_serialization=not legacy)
    path.write_bytes(DAMAGE[kind](path.read_bytes()))
    with pytest.raises(CheckpointFileError) as info:
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')  # the loader runners use
    assert str(path) in str(info.value) and reason in str(info.value)


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = tmp_path / 'nope.pth'
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint_file(str(missing))
