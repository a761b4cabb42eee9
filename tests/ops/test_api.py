"""The public surface of ``mmseg_sparsevit.ops``: the kernel module, the default scale, the context's
reset, and the rule that the ops import torch only."""
import ast
import math
from pathlib import Path

import torch

from mmseg_sparsevit import ops
from mmseg_sparsevit.ops import (SparseAttention, reset, set_attention_backend, set_flex_compile_cap,
                                 sparse_attention, sparse_attention_reference)
from mmseg_sparsevit.ops.context import BLOCK_MASK_CACHE_SIZE, FLEX_EAGER_MAX_SCORES, FLEX_MIN_TOKENS_CPU
from sparse_attention_cases import inputs


def test_module_calls_the_function():
    q, k, v, patch_index = inputs(2, 2, 1, (5, 6), 0.5)
    layer = SparseAttention(window_size=2, neighbourhood='sliding', backend='gather')
    out = layer(q, k, v, (5, 6), 1, patch_index=patch_index)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, (5, 6), 1, 2, 'sliding', patch_index),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(q, k, v, (5, 6), 1, patch_index=patch_index, scale=0.2),
                               sparse_attention_reference(q, k, v, (5, 6), 1, 2, 'sliding', patch_index, scale=0.2),
                               atol=1e-5, rtol=1e-5)
    assert 'sliding' in repr(layer) and list(layer.parameters()) == []


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _ = inputs(4, 1, 1, (3, 3), dim=16)
    explicit = sparse_attention(q, k, v, (3, 3), 1, backend='gather', scale=1 / math.sqrt(16))
    torch.testing.assert_close(sparse_attention(q, k, v, (3, 3), 1, backend='gather'), explicit)
    doubled = sparse_attention(q, k, v, (3, 3), 1, backend='gather', scale=0.5)
    assert not torch.allclose(doubled, explicit)


def test_reset_restores_every_default(ops_context):
    set_attention_backend('gather')
    set_flex_compile_cap(2)
    ops_context.flex_min_tokens_cpu, ops_context.flex_eager_max_scores = 1, 1
    ops_context.flex_compile_backend, ops_context.timer = 'eager', None
    ops_context.backends.pop('flex')
    ops_context.choices['key'], ops_context.failures['flex'] = 'gather', 'failed'
    ops_context.flex_refused.add('signature')
    ops_context.block_masks.put('key', 'mask')
    ops_context.flex_runs['compiled'] += 1
    ops_context.logged.add('message')
    reset()
    assert (ops_context.forced_backend, ops_context.flex_compile_cap) == (None, None)
    assert (ops_context.flex_min_tokens_cpu, ops_context.flex_eager_max_scores) == (FLEX_MIN_TOKENS_CPU,
                                                                                    FLEX_EAGER_MAX_SCORES)
    assert ops_context.flex_compile_backend == 'inductor' and ops_context.timer is not None
    assert tuple(ops_context.backends) == ops.BACKENDS == ('gather', 'flex')
    assert not (ops_context.choices or ops_context.failures or ops_context.flex_refused or ops_context.flex_runs
                or ops_context.logged or len(ops_context.block_masks))
    assert ops_context.block_masks.maxsize == BLOCK_MASK_CACHE_SIZE


def test_ops_sources_import_torch_only():
    """The op must stay usable without mmseg/mmcv/mmengine: check every import statement under ops/."""
    ops_dir = Path(ops.__file__).parent
    for path in ops_dir.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ''] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                assert name.split('.')[0] not in ('mmseg', 'mmcv', 'mmdet', 'mmengine'), (path, name)


def test_ops_run_without_openmmlab(run_without_openmmlab):
    """In a fresh interpreter where mmseg, mmcv and mmdet cannot be imported, the op imports and runs."""
    out = run_without_openmmlab(
        'import warnings; warnings.simplefilter("ignore")\n'
        'import torch\n'
        'from mmseg_sparsevit.ops import sparse_attention\n'
        'q = torch.randn(1, 2, 17, 8)\n'
        'print(tuple(sparse_attention(q, q, q, (4, 4), 1, 2).shape))\n')
    assert out.strip() == '(1, 2, 17, 8)'
