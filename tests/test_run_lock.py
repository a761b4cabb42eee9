"""One run per work dir / feature file: a live holder refuses a second run, a killed holder's lock is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mmseg_sparsevit.engine import WORK_DIR_LOCK_NAME, RunLock, RunLockedError, locked_work_dir

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / 'configs/demo/mask2former_tiny-dense-adapter_1xb4-300_segpath-demo-112x112.py')

_HOLDER = '''
import sys, time
from mmseg_sparsevit.engine import RunLock
RunLock(sys.argv[1]).acquire()
print('HELD', flush=True)
time.sleep(120)
'''


@pytest.fixture
def holder():
    """Start a separate process that takes the lock at a path and sleeps; yields a start(path) function."""
    procs = []

    def start(path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(path), '--extra-arg'], cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == 'HELD'
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_live_holder_refuses_a_second_run_naming_it(tmp_path, holder):
    path = tmp_path / 'work' / WORK_DIR_LOCK_NAME
    proc = holder(path)
    with pytest.raises(RunLockedError) as info:
        RunLock(str(path), target=f'work dir {tmp_path / "work"}').acquire()
    message = str(info.value)
    assert f'work dir {tmp_path / "work"} is in use by another run' in message
    assert f'pid {proc.pid} on {socket.gethostname()}, started ' in message
    assert '--extra-arg' in message  # the holder's command line


def test_lock_of_a_killed_run_is_taken_over(tmp_path, holder):
    path = tmp_path / WORK_DIR_LOCK_NAME
    proc = holder(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(path.read_text())['pid'] == proc.pid  # the dead run's lock file is still there

    lock = RunLock(str(path)).acquire()
    assert json.loads(path.read_text())['pid'] == os.getpid()
    assert lock.taken_over['pid'] == proc.pid
    lock.release()
    assert not path.exists()


def test_lock_is_exclusive_within_one_process_and_free_after_release(tmp_path):
    path = str(tmp_path / 'x.lock')
    with RunLock(path):
        with pytest.raises(RunLockedError, match=f'pid {os.getpid()}'):
            RunLock(path).acquire()
    with RunLock(path):  # released by the context manager
        pass


def test_locked_work_dir_holds_the_work_dir_lock(tmp_path):
    with locked_work_dir(str(tmp_path)):
        assert (tmp_path / WORK_DIR_LOCK_NAME).is_file()
        with pytest.raises(RunLockedError, match=f'work dir {tmp_path}'):
            with locked_work_dir(str(tmp_path)):
                pass
    assert not (tmp_path / WORK_DIR_LOCK_NAME).exists()


def test_second_feature_extraction_into_one_file_refuses(tmp_path):
    from mmseg_sparsevit.classification import ExtractionConfig, extract_features

    out = tmp_path / 'features.npz'
    with RunLock(f'{out}.lock'):  # an extraction into `out` is running
        with pytest.raises(RunLockedError, match=f'feature file {out} is in use by another run'):
            extract_features(ExtractionConfig(size=32), [], [], str(out), overwrite=True)
    assert os.listdir(tmp_path) == []


_FORKING_HOLDER = '''
import os, sys, time
from mmseg_sparsevit.engine import RunLock
RunLock(sys.argv[1]).acquire()
if os.fork() == 0:  # a data-loader worker
    time.sleep(120)
    os._exit(0)
print('HELD', flush=True)
time.sleep(120)
'''


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_run(tmp_path):
    path = tmp_path / 'x.lock'
    proc = subprocess.Popen([sys.executable, '-c', _FORKING_HOLDER, str(path)], cwd=ROOT, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'HELD'
        proc.kill()  # the run dies, its worker lives on
        proc.wait()
        RunLock(str(path)).acquire().release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned worker


def test_train_tool_refuses_a_live_work_dir_before_writing_anything(tmp_path):
    work_dir = tmp_path / 'work'
    with RunLock(str(work_dir / WORK_DIR_LOCK_NAME)):  # a training run holds it
        run = subprocess.run([sys.executable, str(ROOT / 'tools' / 'train.py'), DEMO, '--work-dir', str(work_dir)],
                             cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 1
    assert f'RunLockedError: work dir {work_dir} is in use by another run (pid {os.getpid()}' in run.stdout
    assert os.listdir(work_dir) == []  # no log folder, no config dump: the refused run wrote nothing
