"""Public windowed sparse attention: the function and the attention-kernel module.

Patch tokens on an H x W grid attend to a local 2-D neighbourhood plus all global tokens; global
tokens (CLS + registers) attend to everything.  This is the BigBird / Longformer recipe (local window +
global tokens) laid out in 2-D like NATTEN, with token pruning handled through ``patch_index``.  Argument
checks are in ``checks.py``, the backend choice in ``dispatch.py``, the state it keeps in ``context.py``.
"""
from typing import Optional

from torch import Tensor, nn

from .backends import BACKEND_TABLE
from .checks import check_args, check_int, check_neighbourhood
from .context import context
from .dispatch import dispatch
from .neighbourhood import Neighbourhood

Backend = str  # a name of the backend table
BACKENDS: tuple[Backend, ...] = tuple(BACKEND_TABLE)  # the built-in backends' names


def sparse_attention(
        q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
        window_size: int = 8, neighbourhood: Neighbourhood = 'block',
        patch_index: Optional[Tensor] = None, scale: Optional[float] = None,
        backend: Optional[Backend] = None) -> Tensor:
    """Windowed sparse attention of ``q`` over ``k``/``v``, each (B, heads, G + M, head_dim).

    The first ``num_global`` tokens are global; the other M are patches on the row-major ``grid_hw``
    grid, or at the positions ``patch_index`` (B, M) when tokens were pruned.  A patch attends to the
    present patches of its neighbourhood ('block': its window_size block and the 8 around it;
    'sliding': the window_size x window_size window centred on it, shifted inward at borders) and to
    all global tokens; a global token attends to all tokens.  The global tokens' probabilities over the
    patches, which token pruning ranks by, come from ``global_attention_probs``.
    ``backend``: a name of the backend table ('gather', 'flex'), or None for the automatic choice.
    """
    check_args(q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return dispatch(q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale, backend)


class SparseAttention(nn.Module):
    """Attention kernel module holding the pattern settings, for attention layers that plug in a kernel.

    Its arguments are checked when it is built, so a bad config fails when the model is built.
    """

    def __init__(self, window_size: int = 8, neighbourhood: Neighbourhood = 'block',
                 backend: Optional[Backend] = None) -> None:
        super().__init__()
        check_int('window_size', window_size, 1)
        check_neighbourhood(neighbourhood)
        context.check_backend('backend', backend)
        self.window_size = window_size
        self.neighbourhood = neighbourhood
        self.backend = backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int,
                patch_index: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
        """``sparse_attention`` with this module's window, pattern and backend."""
        return sparse_attention(q, k, v, grid_hw, num_global, self.window_size, self.neighbourhood,
                                patch_index=patch_index, scale=scale, backend=self.backend)

    def extra_repr(self) -> str:
        return (f'window_size={self.window_size}, neighbourhood={self.neighbourhood!r}, '
                f'backend={self.backend!r}')

