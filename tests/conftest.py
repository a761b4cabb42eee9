"""Shared test helpers."""
import subprocess
import sys
from typing import Callable

import pytest


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
