"""Train and test one SegPath experiment on all eight antigens, then print the summary table.

The experiment is named by one antigen's config (or a path with ``{antigen}``); each antigen
gets its own work dir ``<work-dir-root>/<config name>``. Arguments after ``--`` go to both the
train and the test step. Run as ``python -m mmseg_sparsevit.cli.run_segpath`` (installed package) or
``python tools/run_segpath.py`` (repository).

Examples::

    python -m mmseg_sparsevit.cli.run_segpath \\
        configs/segpath/panCK/mask2former_uni2-h-sparse-w8-adapter_1xb4-20k_segpath-panCK-448x448.py \\
        -- --amp --cfg-options model.backbone.vit_cfg.pretrained=checkpoints/uni2-h.safetensors
    python -m mmseg_sparsevit.cli.run_segpath CONFIG --test-only           # test existing work dirs
    python -m mmseg_sparsevit.cli.run_segpath CONFIG --antigens panCK aSMA --gpus 4 --dry-run
"""
import argparse
import sys
from typing import List, Optional

from mmengine.logging import print_log

from mmseg_sparsevit.cli.segpath_runs import run_family, summarize_family
from mmseg_sparsevit.datasets.segpath import SEGPATH_ANTIGENS


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('family', help="one antigen's config, or a path with {antigen} placeholders")
    parser.add_argument('--antigens', nargs='+', default=list(SEGPATH_ANTIGENS),
                        choices=list(SEGPATH_ANTIGENS), help='antigens to run (default: all eight)')
    parser.add_argument('--work-dir-root', default='work_dirs/segpath')
    parser.add_argument('--test-only', action='store_true', help='skip training, test the work dirs')
    parser.add_argument('--checkpoint', choices=['best', 'last'], default='best',
                        help='checkpoint to test: best validation IoU or the last one')
    parser.add_argument('--gpus', type=int, default=1, help='GPUs per run (torch.distributed.run)')
    parser.add_argument('--keep-going', action='store_true', help='continue after a failed antigen')
    parser.add_argument('--dry-run', action='store_true', help='print the commands only')
    args = parser.parse_args(argv)
    args.extra = extra
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    failed = run_family(args.family, args.work_dir_root, args.antigens, train=not args.test_only,
                        checkpoint=args.checkpoint, gpus=args.gpus, extra_args=args.extra,
                        dry_run=args.dry_run, keep_going=args.keep_going)
    if args.dry_run:
        return 0
    if failed:
        print_log(f'failed antigens: {failed}', logger='current')
    print(summarize_family(args.family, args.work_dir_root, args.antigens))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
