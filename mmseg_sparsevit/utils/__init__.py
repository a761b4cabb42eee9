"""Small helpers with no torch, mmengine or OpenMMLab dependency: markdown tables (shared by reports and summaries)
and the synthetic H&E tile renderer (``he_tiles``, numpy + OpenCV; imported on its own)."""
from .markdown import markdown_table

__all__ = ['markdown_table']
