"""Argument checks of the public functions and of ``SparseAttention``: every error names the argument."""
import pytest
import torch

from mmseg_sparsevit.ops import SparseAttention, global_attention_probs, sparse_attention, sparse_attention_reference
from sparse_attention_cases import inputs


def _bad_calls():
    q, k, v, _ = inputs(0, 2, 1, (3, 4))
    good = dict(q=q, k=k, v=v, grid_hw=(3, 4), num_global=1)
    pruned = dict(good, q=q[:, :, :6], k=k[:, :, :6], v=v[:, :, :6])
    index = torch.tensor([[0, 2, 5, 7, 11], [1, 2, 3, 4, 5]])
    return [
        ('q', dict(good, q=q[0]), 'q must be'),
        ('k', dict(good, k=k[:, :1]), 'k shape'),
        ('v', dict(good, v=v[:, :, :3]), 'v shape'),
        ('dtype', dict(good, q=q.long()), 'q must be floating point'),
        ('mixed', dict(good, v=v.double()), 'dtypes differ'),
        ('grid', dict(good, grid_hw=(0, 12)), 'grid_hw'),
        ('grid3', dict(good, grid_hw=(3, 4, 1)), 'grid_hw'),
        ('count', dict(good, grid_hw=(4, 4)), 'grid_hw=(4, 4)'),
        ('window', dict(good, window_size=0), 'window_size'),
        ('global', dict(good, num_global=-1), 'num_global'),
        ('no patches', dict(good, num_global=13), 'num_global=13'),
        ('pattern', dict(good, neighbourhood='dilated'), 'neighbourhood'),
        ('scale', dict(good, scale=float('nan')), 'scale'),
        ('backend', dict(good, backend='dense'), 'backend'),
        ('index dtype', dict(pruned, patch_index=index.int()), 'patch_index must be a torch.long'),
        ('index shape', dict(pruned, patch_index=index[:1]), 'patch_index shape'),
        ('index range', dict(pruned, patch_index=index + 1), 'patch_index values'),
        ('index order', dict(pruned, patch_index=index.flip(1)), 'strictly increasing'),
        ('index repeat', dict(pruned, patch_index=torch.tensor([[0, 2, 2, 7, 11], [1, 2, 3, 4, 5]])),
         'strictly increasing'),
    ]


_PUBLIC_ONLY = ('backend', )  # the reference ignores backend
CHECKED_CALLS = [pytest.param(fn, *case[1:], id=f'{fn.__name__}-{case[0]}') for case in _bad_calls()
                 for fn in (sparse_attention, sparse_attention_reference)
                 if fn is sparse_attention or case[0] not in _PUBLIC_ONLY]


def _escaped(message):
    return message.replace('(', r'\(').replace(')', r'\)')


@pytest.mark.parametrize('fn,kwargs,message', CHECKED_CALLS)
def test_bad_arguments_name_the_argument(fn, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=_escaped(message)):
        fn(**kwargs)


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_global=-1), 'num_global'), (dict(num_global=13), 'num_global=13'), (dict(scale=float('inf')), 'scale'),
    (dict(k='k'), 'k must be a torch.Tensor'), (dict(k=torch.zeros(2, 2, 12, 8)), 'k shape'),
    (dict(q=torch.zeros(2, 2, 13, 8).double()), 'dtypes differ'),
])
def test_global_attention_probs_checks_arguments(kwargs, message):
    q, k, _, _ = inputs(0, 2, 1, (3, 4))
    with pytest.raises((ValueError, TypeError), match=message):
        global_attention_probs(**{'q': q, 'k': k, 'num_global': 1, **kwargs})


@pytest.mark.parametrize('kwargs,message', [
    (dict(window_size=0), 'window_size must be an int >= 1, got 0'),
    (dict(window_size=2.5), 'window_size must be an int >= 1, got 2.5'),
    (dict(window_size=True), 'window_size must be an int >= 1, got True'),
    (dict(neighbourhood='dilated'), "neighbourhood must be one of ('block', 'sliding'), got 'dilated'"),
    (dict(backend='dense'), "backend must be None or one of ('gather', 'flex'), got 'dense'"),
])
def test_sparse_attention_module_checks_its_arguments_when_built(kwargs, message):
    with pytest.raises(ValueError, match=_escaped(message)):
        SparseAttention(**kwargs)
