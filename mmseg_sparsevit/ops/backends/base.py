"""What a backend of ``sparse_attention`` is: one entry of the backend table in ``backends/__init__.py``."""
from typing import Callable, NamedTuple, Optional

from torch import Tensor


class BackendRefusedError(RuntimeError):
    """The backend cannot run this one call (it may run others); an automatic choice takes another."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AttentionBackend(NamedTuple):
    """A backend: how to run it, when it must not, and which of its errors mean it is broken for good.

    ``run(q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale, automatic=...)``
    takes validated arguments and returns the output, (B, heads, G + M, dv); it raises
    ``BackendRefusedError`` for a call it cannot take.  ``why_not(q, k, v, automatic=..., num_slots=...)``
    says why the backend cannot (or, when ``automatic``, should not) take these inputs, None if it can;
    ``num_slots`` is the grid's cells + global tokens.  ``failures()`` returns the exception types of
    ``run`` meaning the backend cannot work in this process (e.g. no compiler; a function, so heavy
    imports wait until an error is raised); an automatic choice then stops using the backend, while any
    other error propagates.
    """
    run: Callable[..., Tensor]
    why_not: Callable[..., Optional[str]]
    failures: Callable[[], tuple[type[BaseException], ...]] = tuple
