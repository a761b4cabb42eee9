"""tools/train.py -> --resume -> tools/test.py on generated demo data (CPU, 2 + 1 iterations),
plus the config plumbing of mmseg_sparsevit.cli (runner, segpath_runs) without training.

The cycle runs the tools as separate processes, the way users run them, so that the
checkpoint written by one process is loaded by a fresh one (torch >= 2.6 ``weights_only``).
"""
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from mmseg_sparsevit.cli.runner import configure_testing, configure_training, load_config
from mmseg_sparsevit.cli.segpath_runs import (entry_point_command, family_configs, family_runs, find_checkpoint,
                                              run_family, summarize_family)
from mmseg_sparsevit.datasets import get_antigen
from mmseg_sparsevit.datasets.synthetic import make_demo_data
from mmseg_sparsevit.evaluation import load_results, save_results

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / 'configs/demo/mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py')
PANCK_448 = 'configs/segpath/panCK/mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-panCK-448x448.py'


def run_tool(tool: str, *args: str) -> str:
    """Run ``tools/<tool>`` in a fresh interpreter; return its combined output, fail loudly."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='2')
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / tool), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, f'{tool} {args} failed:\n{proc.stdout[-4000:]}'
    return proc.stdout


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('segpath_demo')
    make_demo_data(str(root), antigens=['panCK'], tiles_per_antigen=12, tile_size=128)
    return root


def demo_options(data_root, max_iters: int):
    return ['--cfg-options', f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={max_iters}',
            'default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=3',
            'default_hooks.logger.interval=1', 'train_dataloader.batch_size=1',
            *(f'{split}_dataloader.dataset.data_root={data_root}' for split in ('train', 'val', 'test'))]


def test_train_resume_test_cycle(demo_root, tmp_path):
    work_dir = tmp_path / 'train'
    run_tool('train.py', DEMO, '--work-dir', str(work_dir), *demo_options(demo_root, 2))
    assert {'iter_1.pth', 'iter_2.pth', 'last_checkpoint'} <= set(os.listdir(work_dir))
    assert list(work_dir.glob('best_IoU_iter_2.pth'))

    log = run_tool('train.py', DEMO, '--work-dir', str(work_dir), '--resume', *demo_options(demo_root, 3))
    assert re.search(r'resumed epoch: 0, iter: 2', log)
    iters = [int(i) for i in re.findall(r'Iter\(train\) \[\s*(\d+)/3\]', log)]
    assert iters == [3]  # continued, did not restart
    ckpt = torch.load(work_dir / 'iter_3.pth', map_location='cpu', weights_only=False)
    assert ckpt['meta']['iter'] == 3

    test_dir = tmp_path / 'test'
    run_tool('test.py', DEMO, str(work_dir / 'iter_3.pth'), '--work-dir', str(test_dir),
             '--show-dir', str(test_dir / 'vis'), *demo_options(demo_root, 3))
    result = load_results(test_dir / 'segpath_metrics.json')
    assert (result.antigen, result.cell_type) == ('panCK', 'Epithelium')
    assert result.checkpoint.endswith('iter_3.pth')
    for name in ('MPA', 'IoU', 'Dice'):
        assert 0.0 <= result.metrics[name] <= 100.0
    overlays = list((test_dir / 'vis').rglob('*.png'))
    assert len(overlays) == 2  # one per test tile of the demo split


def test_load_config_work_dir_precedence(tmp_path):
    assert load_config(DEMO).work_dir == './work_dirs/' + Path(DEMO).stem
    assert load_config(DEMO, work_dir=str(tmp_path)).work_dir == str(tmp_path)
    cfg = load_config(DEMO, cfg_options={'model.backbone.vit_cfg.window_size': 2})
    assert cfg.model.backbone.vit_cfg.window_size == 2
    with pytest.raises(FileNotFoundError, match='nope.py'):
        load_config('nope.py')


@pytest.mark.parametrize('resume,expected', [(None, (False, None)), ('auto', (True, None))])
def test_configure_training_resume_modes(resume, expected):
    cfg = configure_training(Config.fromfile(DEMO), resume=resume)
    assert (cfg.resume, cfg.load_from) == expected


def test_configure_training_resume_from_path_and_amp(tmp_path):
    ckpt = tmp_path / 'iter_8.pth'
    ckpt.write_bytes(b'')
    cfg = configure_training(Config.fromfile(DEMO), resume=str(ckpt), amp=True)
    assert (cfg.resume, cfg.load_from) == (True, str(ckpt))
    assert (cfg.optim_wrapper.type, cfg.optim_wrapper.loss_scale) == ('AmpOptimWrapper', 'dynamic')
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        configure_training(Config.fromfile(DEMO), resume=str(tmp_path / 'missing.pth'))


def test_configure_testing_show_dir_and_out(tmp_path):
    ckpt = tmp_path / 'model.pth'
    ckpt.write_bytes(b'')
    cfg = configure_testing(Config.fromfile(DEMO), str(ckpt), show_dir='vis', out='pred', amp=True)
    assert cfg.load_from == str(ckpt)
    assert cfg.default_hooks.visualization.draw is True and cfg.visualizer.save_dir == 'vis'
    assert cfg.test_evaluator.output_dir == 'pred' and cfg.test_cfg.fp16 is True
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        configure_testing(Config.fromfile(DEMO), str(tmp_path / 'missing.pth'))


def test_family_configs_from_one_antigen_or_a_pattern():
    from_one = family_configs(str(ROOT / PANCK_448))
    assert len(from_one) == 8 and from_one['ERG'].endswith('/ERG/mask2former_uni2-h-sparse-w8-adapter_'
                                                           '1xb4-20k_segpath-ERG-448x448.py')
    pattern = str(ROOT / PANCK_448).replace('panCK', '{antigen}')
    assert family_configs(pattern, ['aSMA']) == {'aSMA': from_one['aSMA']}
    with pytest.raises(ValueError, match='antigen'):
        family_configs(DEMO)
    with pytest.raises(KeyError, match='CD99'):
        family_configs(pattern, ['CD99'])
    with pytest.raises(FileNotFoundError, match='config not found: .*no-such-panCK-448.py'):
        family_configs(str(ROOT / 'configs' / 'no-such-panCK-448.py'))


def test_family_configs_replaces_only_the_antigen_fields(tmp_path):
    # 'panCK' also appears in a parent folder name: only the folder and the file-name field change.
    for antigen in ('panCK', 'ERG'):
        leaf = tmp_path / 'panCK_runs' / antigen / f'm_segpath-{antigen}-448x448.py'
        leaf.parent.mkdir(parents=True)
        leaf.write_text('')
    configs = family_configs(str(tmp_path / 'panCK_runs' / 'panCK' / 'm_segpath-panCK-448x448.py'),
                             ['panCK', 'ERG'])
    assert configs['ERG'] == str(tmp_path / 'panCK_runs' / 'ERG' / 'm_segpath-ERG-448x448.py')


def test_run_segpath_dry_run_trains_and_tests_each_antigen(tmp_path, mmengine_log):
    assert run_family(str(ROOT / PANCK_448), str(tmp_path), ['panCK', 'MNDA'], dry_run=True,
                      extra_args=['--amp']) == []
    commands = [m for m in mmengine_log if ' -m mmseg_sparsevit.cli.' in m]
    assert [re.search(r'-m mmseg_sparsevit\.cli\.(\w+) ', c)[1] for c in commands] == ['train', 'test'] * 2
    assert all(c.endswith('--amp') for c in commands)
    assert f'{tmp_path}/mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-MNDA-448x448' in commands[2]


def test_entry_point_commands_run_package_modules():
    # Modules of the package, not scripts of the repository's tools/ folder (which pip install does not ship).
    assert entry_point_command('train', ['cfg.py']) == [sys.executable, '-m', 'mmseg_sparsevit.cli.train', 'cfg.py']
    assert entry_point_command('test', ['cfg.py', 'x.pth'], gpus=4) == [
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=4', '-m', 'mmseg_sparsevit.cli.test',
        'cfg.py', 'x.pth', '--launcher', 'pytorch']
    with pytest.raises(ValueError, match='summarize'):
        entry_point_command('summarize', [])


def test_multi_gpu_command_launches_the_module_in_each_process(tmp_path):
    # torch.distributed.run must accept '-m module', and the module must be found as installed (make env
    # installs the package editable): cwd outside the repository, no PYTHONPATH. Each of the two workers
    # prints the entry point's help.
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(entry_point_command('train', ['--help'], gpus=2), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('usage: ') == 2 and '--resume' in proc.stdout


@pytest.mark.parametrize('module,positional', [('train', 'config'), ('test', 'checkpoint'),
                                               ('run_segpath', 'family')])
def test_entry_points_run_as_main_modules(module, positional, monkeypatch, capsys):
    # What 'python -m mmseg_sparsevit.cli.<module> --help' runs, in this process.
    monkeypatch.setattr(sys, 'argv', [module, '--help'])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f'mmseg_sparsevit.cli.{module}', run_name='__main__')
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: ') and positional in out


def test_find_checkpoint_prefers_best_then_last(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_checkpoint(str(tmp_path))
    last = tmp_path / 'iter_20.pth'
    last.write_bytes(b'')
    (tmp_path / 'last_checkpoint').write_text(str(last))
    assert find_checkpoint(str(tmp_path)) == str(last)
    best = tmp_path / 'best_IoU_iter_10.pth'
    best.write_bytes(b'')
    assert find_checkpoint(str(tmp_path)) == str(best)
    assert find_checkpoint(str(tmp_path), 'last') == str(last)


def test_summarize_family_tabulates_the_antigens_that_ran(tmp_path):
    """Result files in the family's work dirs (two antigens ran) -> table with their mean."""
    runs = family_runs(str(ROOT / PANCK_448), str(tmp_path), ['panCK', 'ERG'])
    for run, iou in zip(runs, (60.0, 40.0)):
        save_results(Path(run.work_dir) / 'segpath_metrics.json', config=run.config, checkpoint='x.pth',
                     antigen=run.antigen, cell_type=get_antigen(run.antigen).cell_type,
                     metrics=dict(MPA=70.0, IoU=iou, Dice=80.0), tag='uni2-h-sparse-w8-448')
    table = summarize_family(str(ROOT / PANCK_448), str(tmp_path))
    mean_row = [line for line in table.splitlines() if '| mean ' in line]
    assert len(mean_row) == 1 and re.search(r'70\.00\s*\|\s*50\.00\s*\|\s*80\.00', mean_row[0])
    stem = tmp_path / 'mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-448x448_summary'
    assert stem.with_suffix('.md').read_text().strip() == table.strip()
    assert 'panCK' in stem.with_suffix('.csv').read_text()
