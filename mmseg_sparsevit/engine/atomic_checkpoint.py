"""Checkpoints that are complete or absent, never truncated under their final name.

mmengine's ``CheckpointHook`` writes ``iter_N.pth`` in place, so a kill or a full disk while saving leaves a
truncated file under a valid name, and it removes the oldest kept checkpoint *before* writing the next one.
:class:`AtomicCheckpointHook` (registered; the configs' ``default_hooks.checkpoint``) keeps all of mmengine's
options and changes only this:

* files go through :class:`AtomicLocalBackend` (registered file backend ``'atomic_local'``): written to a
  hidden temporary name in the same directory, flushed to disk (``fsync``), then renamed over the final name
  (``os.replace`` is atomic within one file system), and the directory entry is synced too;
* ``last_checkpoint`` is written the same way, after the checkpoint it names is complete;
* an outdated checkpoint (``max_keep_ckpts``) is removed only once its successor is on disk;
* temporaries of a run that was killed while saving are removed at the start of the next run.
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import re
import secrets
from pathlib import Path
from typing import Any, List, Optional, Union

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend, register_backend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

__all__ = ['AtomicCheckpointHook', 'AtomicLocalBackend', 'atomic_write', 'remove_stale_temporaries']

ATOMIC_BACKEND = 'atomic_local'
# .<final name>.<pid>.<8 hex>.tmp
_TEMPORARY = re.compile(r'^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$')


def _fsync_directory(directory: str) -> None:
    """Persist a rename: the directory entry lives in the directory's own data."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and all of Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def atomic_write(data: Union[bytes, str], path: Union[str, Path], encoding: str = 'utf-8') -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The temporary file is created with the usual permissions (umask applies) and removed again if
    writing fails (e.g. ``ENOSPC``); only a killed process leaves it behind (see
    :func:`remove_stale_temporaries`).
    """
    path = str(path)
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = osp.join(directory, f'.{osp.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    payload = data.encode(encoding) if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(directory: str) -> List[str]:
    """Remove :func:`atomic_write` temporaries in ``directory`` whose writer is no longer running.

    Returns the removed paths. Temporaries of live processes (e.g. a run on another host that
    happens to reuse the pid) are kept.
    """
    removed = []
    if not osp.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        match = _TEMPORARY.match(name)
        if match and not _pid_alive(int(match['pid'])):
            path = osp.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    return removed


@register_backend(ATOMIC_BACKEND)
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes (``put`` / ``put_text``) are atomic."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        atomic_write(obj, filepath)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        atomic_write(obj, filepath, encoding=encoding)


def _is_local(path: Optional[Union[str, Path]]) -> bool:
    return path is None or '://' not in str(path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose checkpoints are never left truncated (see the module docstring).

    Takes every ``CheckpointHook`` argument. Local ``out_dir`` (the work dir by default) and no
    ``backend_args`` / ``file_client_args`` given: files go through :class:`AtomicLocalBackend`. Remote
    storage keeps the backend it asks for (object stores upload whole objects anyway).
    """

    def __init__(self, *args: Any, out_dir: Optional[Union[str, Path]] = None,
                 file_client_args: Optional[dict] = None, backend_args: Optional[dict] = None,
                 **kwargs: Any) -> None:
        if backend_args is None and file_client_args is None and _is_local(out_dir):
            backend_args = dict(backend=ATOMIC_BACKEND)
        super().__init__(*args, out_dir=out_dir, file_client_args=file_client_args,
                         backend_args=backend_args, **kwargs)

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if is_main_process() and _is_local(self.out_dir):
            for path in remove_stale_temporaries(str(self.out_dir)):
                runner.logger.warning(f'removed {path}: a checkpoint whose saving was interrupted')

    def _save_checkpoint_with_step(self, runner, step: int, meta: dict) -> None:
        # mmengine's order is: remove the oldest kept checkpoint, save the new one, write last_checkpoint.
        # Here the new checkpoint and last_checkpoint come first, so an interrupted save loses nothing.
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, ckpt_filename, self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args)
        if not is_main_process():
            return
        atomic_write(str(self.last_ckpt), osp.join(runner.work_dir, 'last_checkpoint'))
        if outdated is not None:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(outdated))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # deepspeed saves a checkpoint as a folder
                self.file_backend.rmtree(path)
