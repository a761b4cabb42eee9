"""Test a checkpoint and write the SegPath result file (mmseg's tools/test.py for this plugin).

Metrics go to the log and, for SegPath configs, to ``<work_dir>/segpath_metrics.json``
(collect them with tools/summarize_segpath.py). Run as ``python -m mmseg_sparsevit.cli.test`` (installed
package) or ``python tools/test.py`` (repository).

Examples::

    python -m mmseg_sparsevit.cli.test CONFIG work_dirs/run/iter_300.pth
    python -m mmseg_sparsevit.cli.test CONFIG CKPT --show-dir work_dirs/run/vis     # PNG overlays of predictions
    python -m mmseg_sparsevit.cli.test CONFIG CKPT --out work_dirs/run/pred         # class-index PNGs
"""
import argparse
import sys
from typing import List, Optional

from mmseg_sparsevit.cli.runner import (add_runner_arguments, build_runner, configure_testing, parse_runner_config,
                                        write_segpath_results)
from mmseg_sparsevit.engine import finish_distributed, setup_distributed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--show-dir', help='save prediction overlays (PNG) under this folder')
    parser.add_argument('--out', help='save predicted class maps (PNG) to this folder')
    parser.add_argument('--tag', help="run tag in the result file (default: the config's segpath_tag "
                        'or its file name)')
    add_runner_arguments(parser, 'test_dataloader.dataset.split=val')
    args, cfg = parse_runner_config(parser, argv)
    configure_testing(cfg, args.checkpoint, show_dir=args.show_dir, out=args.out, amp=args.amp)
    setup_distributed(cfg)  # gloo on CPU
    runner = build_runner(cfg)
    metrics = runner.test()
    is_main = runner.rank == 0
    del runner  # its DDP wrapper holds the process group, which finish_distributed must end before Python exits
    if is_main:
        write_segpath_results(cfg, args.config, args.checkpoint, metrics, tag=args.tag)
    finish_distributed()
    return 0


if __name__ == '__main__':
    sys.exit(main())
