"""Run one SegPath experiment over the eight antigens: train, test, summarise.

An experiment ("family") is one config per antigen that differ only in the antigen, e.g.
``configs/segpath/{antigen}/mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-{antigen}-448x448.py``.
Each antigen runs ``python -m mmseg_sparsevit.cli.train`` and ``... cli.test`` in its own process (so a
crash or a CUDA out-of-memory in one antigen leaves the others alone) and the result files are collected
into the paper's MPA / IoU / Dice table. The entry points are modules of the package, so this works from
an installed package as well as from the repository.
"""
import glob
import os.path as osp
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

from mmengine.logging import print_log

from mmseg_sparsevit.datasets.segpath import SEGPATH_ANTIGENS
from mmseg_sparsevit.evaluation.summary import PAPER_METRICS, rows_to_markdown, summarize_segpath, write_csv

ENTRY_POINTS = {'train': 'mmseg_sparsevit.cli.train', 'test': 'mmseg_sparsevit.cli.test'}


class SegPathRun(NamedTuple):
    """One antigen of a family: its config and work dir."""

    antigen: str
    config: str
    work_dir: str


def family_configs(family: str, antigens: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """antigen -> config path for ``family``.

    ``family`` is a path with ``{antigen}`` placeholders, or the config of one antigen, in which
    case that antigen's name is replaced by the others'. Missing configs are an error.
    """
    antigens = list(antigens or SEGPATH_ANTIGENS)
    unknown = [a for a in antigens if a not in SEGPATH_ANTIGENS]
    if unknown:
        raise KeyError(f'unknown antigens {unknown}; SegPath has {list(SEGPATH_ANTIGENS)}')
    if '{antigen}' not in family:
        if not osp.isfile(family):
            raise FileNotFoundError(f'config not found: {family}')
        named = [a for a in SEGPATH_ANTIGENS if f'/{a}/' in family or f'-{a}-' in family]
        if len(named) != 1:
            raise ValueError(f'{family}: give a path with {{antigen}} placeholders or the config of '
                             f'one SegPath antigen (found antigens {named} in it)')
        # only the antigen's folder and its file-name field, not any other occurrence in the path
        family = family.replace(f'/{named[0]}/', '/{antigen}/').replace(f'-{named[0]}-', '-{antigen}-')
    configs = {a: family.format(antigen=a) for a in antigens}
    missing = [path for path in configs.values() if not osp.isfile(path)]
    if missing:
        raise FileNotFoundError(f'configs not found: {missing} (run tools/make_configs.py?)')
    return configs


def family_runs(family: str, work_dir_root: str,
                antigens: Optional[Sequence[str]] = None) -> List[SegPathRun]:
    """The runs of a family, each in ``<work_dir_root>/<config name>``."""
    return [SegPathRun(a, cfg, osp.join(work_dir_root, osp.splitext(osp.basename(cfg))[0]))
            for a, cfg in family_configs(family, antigens).items()]


def find_checkpoint(work_dir: str, which: str = 'best') -> str:
    """``best``: the ``best_*.pth`` the CheckpointHook kept (else the last); ``last``: the last."""
    if which not in ('best', 'last'):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if which == 'best':
        best = sorted(glob.glob(osp.join(work_dir, 'best_*.pth')), key=osp.getmtime)
        if best:
            return best[-1]
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        last = Path(pointer).read_text().strip()
        if osp.isfile(last):
            return last
    raise FileNotFoundError(f'no checkpoint in {work_dir} (no best_*.pth, no valid last_checkpoint)')


def entry_point_command(step: str, args: Sequence[str], gpus: int = 1) -> List[str]:
    """``python -m mmseg_sparsevit.cli.<step> ARGS`` (step: train or test), through
    ``torch.distributed.run -m`` for several GPUs."""
    if step not in ENTRY_POINTS:
        raise ValueError(f'step must be one of {list(ENTRY_POINTS)}, got {step!r}')
    module = ENTRY_POINTS[step]
    if gpus > 1:
        return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={gpus}', '-m', module,
                *args, '--launcher', 'pytorch']
    return [sys.executable, '-m', module, *args]


def _call(command: List[str], dry_run: bool) -> bool:
    print_log(' '.join(command), logger='current')
    return dry_run or subprocess.call(command) == 0


def _test_checkpoint(run: SegPathRun, checkpoint: str, dry_run: bool) -> Optional[str]:
    if dry_run:
        return osp.join(run.work_dir, f'<{checkpoint} checkpoint>')
    try:
        return find_checkpoint(run.work_dir, checkpoint)
    except FileNotFoundError as err:
        print_log(str(err), logger='current')
        return None


def run_family(family: str,
               work_dir_root: str,
               antigens: Optional[Sequence[str]] = None,
               train: bool = True,
               checkpoint: str = 'best',
               gpus: int = 1,
               extra_args: Sequence[str] = (),
               dry_run: bool = False,
               keep_going: bool = False) -> List[str]:
    """Train (unless ``train=False``) and test every antigen; return the antigens that failed.

    ``extra_args`` go to both steps (e.g. ``--amp``, ``--cfg-options ...``). With ``dry_run``
    the commands are only printed.
    """
    failed = []
    for run in family_runs(family, work_dir_root, antigens):
        common = ['--work-dir', run.work_dir, *extra_args]
        ok = not train or _call(entry_point_command('train', [run.config, *common], gpus), dry_run)
        if ok:
            ckpt = _test_checkpoint(run, checkpoint, dry_run)
            ok = ckpt is not None and _call(
                entry_point_command('test', [run.config, ckpt, *common], gpus), dry_run)
        if not ok:
            failed.append(run.antigen)
            print_log(f'{run.antigen}: failed ({run.config})', logger='current')
            if not keep_going:
                break
    return failed


def summarize_family(family: str, work_dir_root: str, antigens: Optional[Sequence[str]] = None,
                     metrics: Sequence[str] = PAPER_METRICS) -> str:
    """Markdown table of the family's result files; also written beside the work dirs."""
    runs = [r for r in family_runs(family, work_dir_root, antigens)
            if osp.isfile(osp.join(r.work_dir, 'segpath_metrics.json'))]
    if not runs:
        raise FileNotFoundError(f'no segpath_metrics.json in the work dirs under {work_dir_root}')
    rows = summarize_segpath([r.work_dir for r in runs], metrics)
    table = rows_to_markdown(rows, metrics)
    stem = osp.splitext(osp.basename(family_configs(family, antigens)[runs[0].antigen]))[0]
    stem = stem.replace(f'-{runs[0].antigen}-', '-')
    write_csv(rows, osp.join(work_dir_root, f'{stem}_summary.csv'), metrics)
    Path(work_dir_root, f'{stem}_summary.md').write_text(table + '\n')
    return table
