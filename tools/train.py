"""Train a segmentor from an mmseg config (mmseg's tools/train.py for this plugin).

Examples::

    python tools/train.py configs/demo/mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py
    python tools/train.py CONFIG --work-dir work_dirs/run --amp --resume            # latest in work dir
    python tools/train.py CONFIG --resume work_dirs/run/iter_2000.pth
    torchrun --nproc_per_node 4 tools/train.py CONFIG --launcher pytorch
"""
import argparse
import os
import sys
from typing import List, Optional

from mmengine.config import DictAction

from mmseg_sparsevit.apis import build_runner, configure_training, load_config


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='train config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument(
        '--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
        help='resume training: alone, from the latest checkpoint in the work dir; '
        'with a path, from that checkpoint')
    parser.add_argument('--amp', action='store_true', help='mixed precision (fp16, dynamic loss scale)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config keys, e.g. model.backbone.vit_cfg.window_size=16')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    configure_training(cfg, resume=args.resume, amp=args.amp)
    build_runner(cfg).train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
