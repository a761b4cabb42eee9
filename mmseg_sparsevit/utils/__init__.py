"""Small helpers with no torch, mmengine or OpenMMLab dependency, shared by reports and summaries."""
from .markdown import markdown_table

__all__ = ['markdown_table']
