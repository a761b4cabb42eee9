"""Backends of ``sparse_attention``: one module each, all with the same validated-argument contract."""
