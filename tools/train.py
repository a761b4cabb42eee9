"""Train a segmentor from an mmseg config (mmseg's tools/train.py for this plugin).

Repository shim of ``python -m mmseg_sparsevit.cli.train``; see that module for the options and examples.
"""
import sys

from mmseg_sparsevit.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
