"""Inference API (what ``apis`` means in mmseg). The command-line glue is in :mod:`mmseg_sparsevit.cli`."""
