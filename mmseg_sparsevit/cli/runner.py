"""Config and runner set-up behind ``python -m mmseg_sparsevit.cli.train`` and ``cli.test``.

The entry points stay argument parsers; what they do to a config lives here so that both share it
and tests can call it. Importing this module imports ``mmseg_sparsevit``, which registers the
plugin and makes mmengine checkpoints loadable under torch >= 2.6 before any runner exists.
"""
import argparse
import os
import os.path as osp
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.runner import Runner

import mmseg_sparsevit  # noqa: F401  (registration, safe checkpoint loading)
from mmseg_sparsevit.checkpoint import find_resumable_checkpoint
from mmseg_sparsevit.datasets import get_antigen
from mmseg_sparsevit.evaluation import RESULTS_FILENAME, save_results

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
# --amp choice -> AmpOptimWrapper dtype and loss scale: fp16 needs dynamic loss scaling against underflowing
# gradients; bf16 has fp32's exponent range, so its scale stays 1 (a float loss_scale is a static scale).
AMP_DTYPES = {'fp16': ('float16', 'dynamic'), 'bf16': ('bfloat16', 1.0)}


def add_runner_arguments(parser: argparse.ArgumentParser, cfg_example: str) -> None:
    """The options the train and test entry points share: --work-dir, --amp, --cfg-options,
    --launcher and --local-rank (which ``torch.distributed.launch`` passes)."""
    parser.add_argument('--work-dir', help='logs, checkpoints and result files go here')
    parser.add_argument('--amp', nargs='?', const='fp16', choices=AMP_DTYPES,
                        help='mixed precision: --amp alone is fp16 (dynamic loss scaling), --amp bf16 trains under '
                             'bf16 autocast (no loss scaling; a test run uses fp16 either way)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help=f'override config keys, e.g. {cfg_example}')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_config(parser: argparse.ArgumentParser,
                        argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, Config]:
    """Parse ``argv`` (with the options of :func:`add_runner_arguments` and a ``config`` argument) and load
    that config with ``--cfg-options``, ``--work-dir`` and ``--launcher`` applied (:func:`load_config`).

    Exports ``LOCAL_RANK`` for launchers that only pass ``--local-rank``.
    """
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args, load_config(args.config, args.cfg_options, args.work_dir, args.launcher)


def load_config(config: str,
                cfg_options: Optional[Mapping[str, Any]] = None,
                work_dir: Optional[str] = None,
                launcher: str = 'none') -> Config:
    """Read ``config``, apply ``--cfg-options`` and settle the work dir.

    Work dir precedence: ``work_dir`` argument, then the config's ``work_dir``, then
    ``./work_dirs/<config name>`` (mmseg's rule).
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    cfg = Config.fromfile(config)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def configure_training(cfg: Config, resume: Optional[str] = None, amp: Union[bool, str, None] = None) -> Config:
    """``resume``: None (fresh run), ``'auto'`` (latest intact checkpoint of the work dir, see
    :func:`~mmseg_sparsevit.checkpoint.find_resumable_checkpoint`) or a path. ``amp``: None / False (the config's
    optimizer wrapper), True or ``'fp16'`` (fp16 autocast, dynamic loss scaling) or ``'bf16'`` (bf16 autocast,
    loss scale 1), through mmengine's ``AmpOptimWrapper``."""
    if amp:
        precision = 'fp16' if amp is True else amp
        if precision not in AMP_DTYPES:
            raise ValueError(f'amp must be one of {list(AMP_DTYPES)} (or True for fp16), got {amp!r}')
        optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if optim_wrapper == 'AmpOptimWrapper':
            print_log(f"AMP is already enabled in the config (dtype {cfg.optim_wrapper.get('dtype')}); "
                      f'--amp {precision} leaves it as it is', logger='current')
        elif optim_wrapper != 'OptimWrapper':
            raise ValueError(f'--amp only replaces OptimWrapper, but the config uses {optim_wrapper}')
        else:
            dtype, loss_scale = AMP_DTYPES[precision]
            cfg.optim_wrapper.update(type='AmpOptimWrapper', dtype=dtype, loss_scale=loss_scale)
    if resume == 'auto':  # the latest intact checkpoint; a damaged latest one is skipped, named in a warning
        work_dir = cfg.get('work_dir')
        cfg.resume, cfg.load_from = True, find_resumable_checkpoint(work_dir) if work_dir else None
    elif resume is not None:
        if not osp.isfile(resume):
            raise FileNotFoundError(f'--resume checkpoint not found: {resume}')
        cfg.resume, cfg.load_from = True, resume
    return cfg


def configure_testing(cfg: Config,
                      checkpoint: str,
                      show_dir: Optional[str] = None,
                      out: Optional[str] = None,
                      amp: bool = False) -> Config:
    """Load ``checkpoint``; optionally draw predictions (``show_dir``) or save them (``out``).

    ``show_dir`` switches on mmseg's ``SegVisualizationHook`` for every test image and points
    the visualizer there: overlays (ground truth | prediction) land in
    ``<show_dir>/vis_data/vis_image/`` as PNG.
    """
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    cfg.load_from = checkpoint
    if show_dir is not None:
        hooks = cfg.get('default_hooks', {})
        if 'visualization' not in hooks:
            raise KeyError('--show-dir needs default_hooks.visualization '
                           "(dict(type='SegVisualizationHook')) in the config")
        hooks['visualization'].update(draw=True, interval=1)
        cfg.visualizer['save_dir'] = show_dir
    if out is not None:
        cfg.test_evaluator['output_dir'] = out
    if amp:
        cfg.test_cfg['fp16'] = True
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The runner a config asks for (``runner_type``), mmengine's ``Runner`` by default."""
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def segpath_tag(cfg: Config, config: str) -> str:
    """Run tag of the result file: the config's ``segpath_tag`` or the config's file name."""
    return cfg.get('segpath_tag') or osp.splitext(osp.basename(config))[0]


def write_segpath_results(cfg: Config, config: str, checkpoint: str, metrics: Dict[str, Any],
                          tag: Optional[str] = None) -> Optional[Path]:
    """Write ``<work_dir>/segpath_metrics.json`` for a SegPath test run; skip other datasets."""
    antigen = cfg.test_dataloader.get('dataset', {}).get('antigen')
    if antigen is None:
        print_log(f'test dataset of {config} has no antigen (not SegPath): '
                  f'{RESULTS_FILENAME} not written', logger='current')
        return None
    spec = get_antigen(antigen)
    path = save_results(
        osp.join(cfg.work_dir, RESULTS_FILENAME), config=config, checkpoint=checkpoint,
        antigen=spec.antigen, cell_type=spec.cell_type, metrics=metrics,
        tag=tag or segpath_tag(cfg, config))
    print_log(f'SegPath metrics written to {path}', logger='current')
    return path
