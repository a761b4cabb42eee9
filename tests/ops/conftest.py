"""Every op test starts and ends with a default ops context (``ops.reset()``) and no backend environment
variables, so settings, caches and measured choices never leak from one test to the next."""
import pytest

from mmseg_sparsevit.ops import reset
from mmseg_sparsevit.ops.context import BACKEND_ENV, FLEX_COMPILE_CAP_ENV, context


@pytest.fixture(autouse=True)
def ops_context(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(FLEX_COMPILE_CAP_ENV, raising=False)
    reset()
    yield context
    reset()


@pytest.fixture
def cheap_flex(ops_context):
    """Automatic flex for any CPU size, compiled by dynamo's cheap 'eager' backend: the compile cap is
    dynamo's recompile limit, which does not depend on the backend, so no inductor compile runs."""
    ops_context.flex_compile_backend = 'eager'
    ops_context.flex_min_tokens_cpu = 1
    return ops_context
