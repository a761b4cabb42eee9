"""Fresh-process measurement plumbing shared by the backbone and the op benchmarks.

Each benchmark point runs as ``python -m <worker module> SPEC_JSON`` in a fresh interpreter, so that its peak
memory (process RSS on CPU) is that point's alone; the worker prints its record as the last JSON line of stdout.
"""
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding mmseg_sparsevit/


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def max_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Lifetime peak resident set size of this process, or with ``RUSAGE_CHILDREN`` of its largest finished
    child (``ru_maxrss`` is in KiB on Linux, in bytes on macOS)."""
    return resource.getrusage(who).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)


class RssSampler:
    """Polls the resident set size in a thread while a measured call runs (torch ops release the GIL), for a
    peak of one stretch of the process' life rather than its lifetime peak."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak, self._stop = interval_s, current_rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> 'RssSampler':
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


@dataclass
class WorkerRun:
    """What a worker process left: its last JSON record (None if none), exit code (None: timed out) and the last
    line of its stderr (or stdout), for error messages."""

    record: Optional[Dict[str, Any]]
    returncode: Optional[int]
    tail: str


def run_worker(module: str, spec: Mapping[str, Any], timeout_s: Optional[float],
               env: Optional[Mapping[str, str]] = None) -> WorkerRun:
    """Run ``python -m module SPEC_JSON`` in a fresh interpreter with ``env`` added to the environment (no time
    limit when ``timeout_s`` is None)."""
    path = os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get('PYTHONPATH'))))
    full_env = dict(os.environ, PYTHONPATH=path, **(env or {}))
    try:
        proc = subprocess.run([sys.executable, '-m', module, json.dumps(dict(spec))], capture_output=True, text=True,
                              timeout=timeout_s, env=full_env)
    except subprocess.TimeoutExpired:
        return WorkerRun(None, None, f'timed out after {timeout_s:.0f} s')
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
    tail = ((proc.stderr or proc.stdout).strip().splitlines() or [f'exit code {proc.returncode}'])[-1]
    return WorkerRun(json.loads(lines[-1]) if lines else None, proc.returncode, tail)
