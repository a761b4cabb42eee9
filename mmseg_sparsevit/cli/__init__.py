"""Command-line entry points and the config / runner glue they share.

Each entry point is a module with ``main(argv)``, so it runs from an installed package:

- ``python -m mmseg_sparsevit.cli.train``: train from an mmseg config (``tools/train.py`` calls it);
- ``python -m mmseg_sparsevit.cli.test``: test a checkpoint, write the SegPath result file (``tools/test.py``);
- ``python -m mmseg_sparsevit.cli.run_segpath``: train and test one config family over the eight antigens
  (``tools/run_segpath.py``).

:mod:`.runner` (config loading, runner set-up, result file) and :mod:`.segpath_runs` (SegPath families)
hold what the entry points do, for tests and scripts to call. Nothing is imported here, so running one
entry point imports only what it needs.
"""
