"""Backends of ``sparse_attention``: one module each, all with the same validated-argument contract.

``BACKEND_TABLE`` is the backend table: a new backend is one new module defining an ``AttentionBackend``
(``base.py``) and one line here.  The order is the fallback order of the automatic choice: when a
backend refuses a call or fails, the next one that can run takes it; gather, first, runs everywhere.
"""
from . import flex, gather
from .base import AttentionBackend, BackendRefusedError

BACKEND_TABLE: dict[str, AttentionBackend] = {
    'gather': gather.BACKEND,
    'flex': flex.BACKEND,
}

__all__ = ['AttentionBackend', 'BACKEND_TABLE', 'BackendRefusedError']
