"""Train a segmentor from an mmseg config (mmseg's tools/train.py for this plugin).

Run as ``python -m mmseg_sparsevit.cli.train`` (installed package) or ``python tools/train.py`` (repository).

Examples::

    python -m mmseg_sparsevit.cli.train configs/demo/mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py
    python -m mmseg_sparsevit.cli.train CONFIG --work-dir work_dirs/run --amp --resume   # latest in work dir
    python -m mmseg_sparsevit.cli.train CONFIG --resume work_dirs/run/iter_2000.pth
    torchrun --nproc_per_node 4 -m mmseg_sparsevit.cli.train CONFIG --launcher pytorch
"""
import argparse
import sys
from typing import List, Optional

from mmseg_sparsevit.cli.runner import add_runner_arguments, build_runner, configure_training, parse_runner_config
from mmseg_sparsevit.engine import finish_distributed, locked_work_dir, setup_distributed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='train config file')
    parser.add_argument(
        '--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
        help='resume training: alone, from the latest checkpoint in the work dir; '
        'with a path, from that checkpoint')
    add_runner_arguments(parser, 'model.backbone.vit_cfg.window_size=16')
    args, cfg = parse_runner_config(parser, argv)
    setup_distributed(cfg)  # before the runner: gloo on CPU, and the lock below is agreed by every rank
    with locked_work_dir(cfg.work_dir):  # a second run on this work dir refuses
        configure_training(cfg, resume=args.resume, amp=args.amp)
        build_runner(cfg).train()
    finish_distributed()
    return 0


if __name__ == '__main__':
    sys.exit(main())
