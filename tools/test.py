"""Test a checkpoint and write the SegPath result file (mmseg's tools/test.py for this plugin).

Repository shim of ``python -m mmseg_sparsevit.cli.test``; see that module for the options and examples.
"""
import sys

from mmseg_sparsevit.cli.test import main

if __name__ == '__main__':
    sys.exit(main())
