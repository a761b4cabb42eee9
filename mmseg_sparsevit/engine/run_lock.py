"""One run at a time per output: an exclusive lock file that a crashed run cannot leave stuck.

Two ``tools/train.py`` runs in one work dir (or two feature extractions into one file) would interleave their
checkpoints and logs without any error. :class:`RunLock` holds ``fcntl.flock`` on a lock file for the
lifetime of a run. The kernel drops the lock when its holder's process dies, however it dies (kill -9,
OOM), so a lock file left behind by a crashed run is simply taken over by the next one. The holder writes
its pid, host, start time and command line into the file, and a refused run names them.

``flock`` works on local file systems and on NFS (Linux maps it to NFS byte-range locks); where a file system
refuses locking altogether, the run goes on with a warning rather than failing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import os.path as osp
import socket
import sys
import time
from typing import Any, Dict, Iterator, Optional, Set

from mmengine.dist import broadcast_object_list, get_dist_info
from mmengine.logging import print_log

__all__ = ['RunLock', 'RunLockedError', 'WORK_DIR_LOCK_NAME', 'locked_work_dir']

WORK_DIR_LOCK_NAME = '.train.lock'
# errnos of file systems that do not support flock at all (as opposed to "held by someone else")
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


# Descriptors of the locks this process holds. A forked child (a data-loader worker) closes its copies, so a
# lock ends with the process that took it rather than with its last surviving child.
_HELD_FDS: Set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLockedError(RuntimeError):
    """Another live process holds the lock of this work dir / output."""


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return 'a process that has not written its details yet'
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


class RunLock:
    """Exclusive, non-blocking lock on the file ``path`` for a run writing ``target`` (named in errors).

    Use as a context manager, or :meth:`acquire` / :meth:`release`. The lock file is removed on release;
    acquiring re-checks that the locked file is still the one at ``path``, so a run that opened the file
    just before its previous holder removed it cannot hold a lock nobody else sees.
    """

    def __init__(self, path: str, target: Optional[str] = None) -> None:
        self.path = path
        self.target = target or osp.dirname(osp.abspath(path))
        self._fd: Optional[int] = None
        self.taken_over: Dict[str, Any] = {}  # details of a dead run whose lock file this one took over

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> 'RunLock':
        """Take the lock or raise :class:`RunLockedError` naming the target and the live holder."""
        if self.held:
            raise RuntimeError(f'{self.path} is already held by this RunLock')
        os.makedirs(osp.dirname(osp.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_holder(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise RunLockedError(
                        f'{self.target} is in use by another run ({_describe(holder)}). Wait for it to finish, '
                        f'or write elsewhere. (If that process is gone, the lock {self.path} is free again.)'
                    ) from None
                if err.errno in _UNSUPPORTED:
                    print_log(f'{self.path}: the file system does not support locking ({err.strerror}); '
                              f'running without protection against a second run on {self.target}',
                              logger='current', level=logging.WARNING)
                    return self
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: retry
        self.taken_over = _read_holder(fd)
        if self.taken_over:
            print_log(f'{self.path}: taking over the lock of a run that is gone ({_describe(self.taken_over)})',
                      logger='current', level=logging.WARNING)
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), command=' '.join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        _HELD_FDS.discard(self._fd)
        os.close(self._fd)  # closing the last descriptor drops the flock
        self._fd = None

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> Dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 65536, 0).decode() or '{}')
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@contextlib.contextmanager
def locked_work_dir(work_dir: str, lock_name: str = WORK_DIR_LOCK_NAME, what: str = 'work dir') -> Iterator[None]:
    """Hold ``<work_dir>/<lock_name>`` (``.train.lock``) for the duration of a run (training; the slide tools
    pass their own ``lock_name`` and ``what`` their folder is, for the messages).

    In a distributed run only global rank 0 takes the lock (the ranks of one run share the work dir, and
    ranks on other nodes may see it over a network file system); it tells every rank whether it got the
    lock, so a refused run stops on all ranks instead of leaving them waiting in the first collective.
    Call it after the process group is initialised.
    """
    rank, world_size = get_dist_info()
    lock = RunLock(osp.join(work_dir, lock_name), target=f'{what} {work_dir}')
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
            error = err
    if world_size > 1:
        message = [None if error is None else f'{type(error).__name__}: {error}']
        broadcast_object_list(message, src=0)
        if rank != 0 and message[0] is not None:
            raise RunLockedError(f'rank 0 could not lock {work_dir}: {message[0]}')
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()
