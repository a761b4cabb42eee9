"""Load mmengine checkpoints under torch >= 2.6 without switching off ``weights_only``.

torch >= 2.6 unpickles with ``weights_only=True`` by default, and mmengine 0.10 calls
``torch.load`` without saying otherwise. A checkpoint written by mmengine's runner holds,
besides tensors, numpy arrays/scalars and ``HistoryBuffer`` objects (``message_hub``),
and a ``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``.

Rather than trusting every pickle (``weights_only=False``), :func:`register_safe_globals`
allow-lists exactly those types, and maps ``builtins.getattr`` to a restricted version that
only resolves ``HistoryBuffer`` statistics methods. Anything else in a checkpoint still fails,
and :func:`load_checkpoint_file` turns that failure into an error naming the file and the
globals it asks for, so an untrusted pickle is never executed silently.
"""
from __future__ import annotations

import os.path as osp
import pickle
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['register_safe_globals', 'load_checkpoint_file', 'safe_globals_for_mmengine']


# HistoryBuffer fills its class-level ``_statistics_methods`` with these only when the first
# instance is created, so a fresh process that loads a checkpoint has not seen them yet.
_BUILTIN_STATISTICS = ('min', 'max', 'current', 'mean')


def _restricted_getattr(obj: Any, name: str) -> Callable:
    """``getattr`` as seen by the unpickler: only HistoryBuffer statistics methods resolve."""
    if obj is HistoryBuffer and (name in _BUILTIN_STATISTICS or name in HistoryBuffer._statistics_methods):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while unpickling: only HistoryBuffer statistics '
        'methods are allow-listed by mmseg_sparsevit.checkpoint')


def _numpy_multiarray_modules() -> list:
    """numpy's multiarray module under every name a checkpoint may use (numpy 1.x and 2.x)."""
    modules = []
    for name in ('_core', 'core'):
        try:
            modules.append((name, getattr(np, name).multiarray))
        except AttributeError:  # numpy 1.x has no np._core; numpy 2 warns on np.core
            continue
    return modules


def safe_globals_for_mmengine() -> list[Union[Callable, tuple[Callable, str]]]:
    """The (callable, dotted name) pairs an mmengine runner checkpoint needs, and nothing more."""
    entries: list[Union[Callable, tuple[Callable, str]]] = [
        np.ndarray, np.dtype, HistoryBuffer, (_restricted_getattr, 'builtins.getattr')]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        for name, multiarray in _numpy_multiarray_modules():
            entries.append((multiarray._reconstruct, f'numpy.{name}.multiarray._reconstruct'))
            entries.append((multiarray.scalar, f'numpy.{name}.multiarray.scalar'))
    # numpy 2 may pickle a dtype through its class, e.g. numpy.dtypes.Float64DType
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith('DType')]
    return entries


_REGISTERED = False


def register_safe_globals() -> None:
    """Allow-list mmengine's checkpoint contents and route mmengine's local loader through here.

    Called by ``import mmseg_sparsevit``; idempotent.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    torch.serialization.add_safe_globals(safe_globals_for_mmengine())
    # '' is mmengine's scheme for local paths; replace its plain torch.load with ours.
    CheckpointLoader.register_scheme(prefixes='', loader=_load_from_local, force=True)
    _REGISTERED = True


def load_checkpoint_file(filename: str, map_location: Optional[Union[str, torch.device]] = 'cpu') -> Any:
    """``torch.load(filename, weights_only=True)`` with an error naming the file and the bad globals."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(filename)
        except Exception:  # noqa: BLE001 - old-format (non-zip) files cannot be listed
            unsafe = []
        listed = f' It asks for: {", ".join(unsafe)}.' if unsafe else ''
        raise pickle.UnpicklingError(
            f'{filename}: refused to unpickle objects that are not allow-listed.{listed} If you trust '
            'this file, allow-list those types yourself with torch.serialization.add_safe_globals '
            f'before loading it. Original error: {err}') from err


def _load_from_local(filename: str, map_location: Optional[Union[str, torch.device]]) -> Any:
    return load_checkpoint_file(filename, map_location)
