"""Train and test one SegPath experiment on all eight antigens, then print the summary table.

Repository shim of ``python -m mmseg_sparsevit.cli.run_segpath``; see that module for the options and examples.
"""
import sys

from mmseg_sparsevit.cli.run_segpath import main

if __name__ == '__main__':
    sys.exit(main())
