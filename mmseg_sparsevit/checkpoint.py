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

A damaged file (empty, truncated by a kill or a full disk, or not a checkpoint at all) gives a
:class:`CheckpointFileError` naming the file and what is wrong with it, found by
:func:`checkpoint_file_problem` from the file's structure before anything is unpickled.
:func:`find_resumable_checkpoint` is ``--resume`` without a path: the checkpoint ``last_checkpoint`` names,
or the newest intact one when that is damaged.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import pickle
import re
import warnings
import zipfile
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ['CheckpointFileError', 'checkpoint_file_problem', 'find_resumable_checkpoint', 'load_checkpoint_file',
           'register_safe_globals', 'safe_globals_for_mmengine']


class CheckpointFileError(RuntimeError):
    """A checkpoint file that cannot be loaded: empty, truncated, damaged or not a checkpoint."""


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


def checkpoint_file_problem(filename: str) -> Optional[str]:
    """What makes ``filename`` unloadable as a ``torch.save`` file, judged from its structure; None if intact.

    Reads the zip directory and the pickle record (CRC-checked), never the tensors, so it takes
    milliseconds even for a checkpoint of many GB. A file in torch's legacy (pre-zip) format passes:
    only loading it can tell.
    """
    size = osp.getsize(filename)
    if size == 0:
        return 'empty file (0 bytes)'
    with open(filename, 'rb') as f:
        head = f.read(4)
    if not zipfile.is_zipfile(filename):
        if head.startswith(b'PK'):
            return f'truncated: a zip archive of {size} bytes whose end (the zip directory) is missing'
        if head[:1] == b'\x80':  # a pickle: torch's legacy format
            return None
        return f'not a torch checkpoint ({size} bytes, neither a zip archive nor a pickle; starts with {head!r})'
    try:
        with zipfile.ZipFile(filename) as archive:
            records = [i for i in archive.infolist() if i.filename.rsplit('/', 1)[-1] == 'data.pkl']
            if not records:
                return f'a zip archive of {size} bytes without the data.pkl record of torch.save'
            archive.read(records[0])
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f'damaged zip archive ({size} bytes): {err}'
    return None


def load_checkpoint_file(filename: str, map_location: Optional[Union[str, torch.device]] = 'cpu') -> Any:
    """``torch.load(filename, weights_only=True)`` with errors naming the file: missing, damaged
    (:class:`CheckpointFileError`), or asking for globals that are not allow-listed."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file not found: {filename}')
    problem = checkpoint_file_problem(filename)
    if problem is not None:
        raise CheckpointFileError(f'{filename}: cannot load this checkpoint: {problem}')
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
    except (EOFError, RuntimeError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointFileError(f'{filename} ({osp.getsize(filename)} bytes): cannot load this checkpoint, '
                                  f'it may be damaged: {type(err).__name__}: {err}') from err


_NUMBERED = re.compile(r'^(?:iter|epoch)_(\d+)\.pth$')


def find_resumable_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint an automatic ``--resume`` continues from.

    That is the one ``<work_dir>/last_checkpoint`` names (mmengine's choice) if it is intact; otherwise the
    newest intact ``iter_N.pth`` / ``epoch_N.pth`` of the work dir, with a warning naming every file skipped
    and why. Returns None when the work dir holds no checkpoint (a fresh run); raises
    :class:`CheckpointFileError` listing them when there are checkpoints but none is intact, rather than
    starting over on top of them.
    """
    candidates = []
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named:
            candidates.append(named)
    numbered = [(int(m[1]), name) for name in (os.listdir(work_dir) if osp.isdir(work_dir) else [])
                if (m := _NUMBERED.match(name))]
    candidates += [osp.join(work_dir, name) for _, name in sorted(numbered, reverse=True)]
    skipped, seen = [], set()
    for path in candidates:
        if osp.abspath(path) in seen:
            continue
        seen.add(osp.abspath(path))
        problem = 'missing' if not osp.isfile(path) else checkpoint_file_problem(path)
        if problem is None:
            if skipped:
                print_log(f'resuming from {path}, the newest intact checkpoint; skipped ' + '; '.join(skipped),
                          logger='current', level=logging.WARNING)
            return path
        skipped.append(f'{path} ({problem})')
    if skipped:
        raise CheckpointFileError(f'cannot resume: no intact checkpoint in {work_dir}: ' + '; '.join(skipped))
    return None


def _load_from_local(filename: str, map_location: Optional[Union[str, torch.device]]) -> Any:
    return load_checkpoint_file(filename, map_location)
