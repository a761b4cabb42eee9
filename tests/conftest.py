"""Shared test helpers."""
import subprocess
import sys
from typing import Callable, Iterator, List

import pytest
from mmengine.logging import MMLogger

# Prepended to fresh-interpreter code: makes mmseg, mmcv and mmdet unimportable, as on a machine with only
# torch, timm and mmengine.
HIDE_OPENMMLAB = (
    'import sys\n'
    'class _HideOpenMMLab:\n'
    '    def find_spec(self, name, path=None, target=None):\n'
    "        if name.split('.')[0] in ('mmseg', 'mmcv', 'mmdet'):\n"
    "            raise ImportError(f'{name} hidden by the test')\n"
    'sys.meta_path.insert(0, _HideOpenMMLab())\n'
)


@pytest.fixture
def run_fresh_python() -> Callable[[str], str]:
    """Run ``code`` in a new interpreter (nothing imported by other tests leaks in); return its stdout.

    Fails the test with the end of stderr when the code exits non-zero.
    """
    def run(code: str) -> str:
        result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    return run


@pytest.fixture
def run_without_openmmlab(run_fresh_python) -> Callable[[str], str]:
    """``run_fresh_python`` with mmseg, mmcv and mmdet hidden (importing them raises ImportError)."""
    return lambda code: run_fresh_python(HIDE_OPENMMLAB + code)


@pytest.fixture
def mmengine_log() -> Iterator[List[str]]:
    """The messages logged through mmengine's current logger (``print_log(..., logger='current')``) meanwhile."""
    messages: List[str] = []

    def keep(record) -> bool:
        messages.append(record.getMessage())
        return True

    logger = MMLogger.get_current_instance()
    logger.addFilter(keep)
    try:
        yield messages
    finally:
        logger.removeFilter(keep)
