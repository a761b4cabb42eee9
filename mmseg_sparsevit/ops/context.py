"""The one owner of the op's process-wide state: settings, caches, measured backend choices, log-once set.

Everything ``sparse_attention`` remembers between calls lives on one ``OpsContext`` instance, ``context``:
the user's settings (forced backend, flex compile cap, ...), the backend table in force, the measured
winner per input key, backends that failed for good, the flex compile region, the inputs it refused and a
bounded cache of block masks.  ``reset()`` restores all of it to the defaults, as NATTEN's context does;
tests call it instead of patching module globals.
"""
import logging
import os
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, Optional

import torch

if TYPE_CHECKING:
    from .backends.base import AttentionBackend

logger = logging.getLogger('mmseg_sparsevit.ops')  # every backend choice and reason is logged here
BACKEND_ENV = 'SPARSEVIT_ATTN_BACKEND'
FLEX_COMPILE_CAP_ENV = 'SPARSEVIT_FLEX_COMPILE_CAP'
FLEX_DEFAULT_COMPILE_CAP = 8  # graphs, like dynamo's default recompile_limit
FLEX_MIN_TOKENS_CPU = 4096  # smaller CPU inputs: the 10-30 s compile outweighs any gain over gather
# Eager (uncompiled) flex materialises every score, about 12 bytes each on CPU: up to 2**22 scores
# (~50 MiB) a requested flex may run uncompiled when it cannot be compiled; bigger inputs raise.
FLEX_EAGER_MAX_SCORES = 2**22
# Block masks kept (least recently used dropped): one per (grid, G, window, pattern, device), 0.8 MB at
# 96 x 96 (its tables and mask_mod's), so 16 cover the shapes a model sees without growing over a long run.
BLOCK_MASK_CACHE_SIZE = 16
# Measured backend choice: per candidate 1 untimed warm-up call (it may compile), then the fastest of
# AUTOTUNE_REPEATS timed calls.  Once per input key, about 3x the candidates' run times (~3 s at 96 x 96
# on 2 CPU cores) plus flex's one-off compile.
AUTOTUNE_REPEATS = 2

Timer = Callable[[Callable[[], Any], torch.device], tuple[float, Any]]


class LruCache:
    """A dict bounded to ``maxsize`` entries that drops the least recently used one."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable) -> Any:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def keys(self) -> list:
        """Keys from least to most recently used."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


def time_calls(call: Callable[[], Any], device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    """Seconds of the fastest of ``AUTOTUNE_REPEATS`` calls after one untimed warm-up (so a compile is
    never counted as run time), and the last call's result.  Synchronises CUDA around each call."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    result = call()
    best = float('inf')
    for _ in range(AUTOTUNE_REPEATS):
        sync()
        start = clock()
        result = call()
        sync()
        best = min(best, clock() - start)
    return best, result


class OpsContext:
    """Settings and state of ``sparse_attention`` for this process (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Restore every setting to its default and forget all caches, measurements and failures."""
        # settings
        self.forced_backend: Optional[str] = None  # set_attention_backend; None: env variable, then measured
        self.flex_compile_cap: Optional[int] = None  # set_flex_compile_cap; None: env variable, then default
        self.flex_compile_backend: Any = 'inductor'  # torch.compile backend of flex ('eager' in cheap tests)
        self.flex_min_tokens_cpu = FLEX_MIN_TOKENS_CPU
        self.flex_eager_max_scores = FLEX_EAGER_MAX_SCORES
        self.timer: Timer = time_calls  # how a candidate backend is timed: (call, device) -> (s, result)
        self._backends: Optional[dict[str, 'AttentionBackend']] = None
        # state
        self.choices: dict[tuple, str] = {}  # measured winner per input key
        self.failures: dict[str, str] = {}  # backend -> why an automatic choice stopped using it
        self.flex_compiled: Optional[tuple[int, Any, Callable]] = None  # (cap, compile backend, function)
        self.flex_refused: set[tuple] = set()  # input signatures dynamo refused at the cap
        self.flex_runs: Counter = Counter()  # flex calls: 'compiled', 'uncompiled' (eager), 'refused'
        self.block_masks = LruCache(BLOCK_MASK_CACHE_SIZE)
        self.logged: set[tuple] = set()

    @property
    def backends(self) -> dict[str, 'AttentionBackend']:
        """The backend table in force: a copy of ``ops.backends.BACKEND_TABLE``; entries may be replaced
        or added (e.g. to try a new backend), and ``reset()`` restores it."""
        if self._backends is None:
            from .backends import BACKEND_TABLE  # here, not at the top: the backends import this module
            self._backends = dict(BACKEND_TABLE)
        return self._backends

    def compile_cap(self) -> int:
        """The flex compile cap in force: ``set_flex_compile_cap``, the environment variable, the default."""
        if self.flex_compile_cap is not None:
            return self.flex_compile_cap
        value = os.environ.get(FLEX_COMPILE_CAP_ENV) or str(FLEX_DEFAULT_COMPILE_CAP)
        if not value.isdigit():
            raise ValueError(f'environment variable {FLEX_COMPILE_CAP_ENV} must be an int >= 0, got {value!r}')
        return int(value)

    def check_backend(self, name: str, value: Optional[str]) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``value`` is None or a backend of the table."""
        if value is not None and value not in self.backends:
            raise ValueError(f'{name} must be None or one of {tuple(self.backends)}, got {value!r}')


context = OpsContext()


def set_attention_backend(backend: Optional[str]) -> None:
    """Force ``backend`` for calls that pass none (None restores the automatic choice).

    The ``SPARSEVIT_ATTN_BACKEND`` environment variable does the same without code changes; this
    function takes precedence over it.
    """
    context.check_backend('backend', backend)
    context.forced_backend = backend


def set_flex_compile_cap(cap: Optional[int]) -> None:
    """Allow compiled flex at most ``cap`` compiled graphs per process (None: the environment variable
    ``SPARSEVIT_FLEX_COMPILE_CAP``, else 8).  Past the cap dynamo would run flex eagerly, which is
    O(N^2) in memory, so new input shapes go to gather instead.  Changing the cap starts a fresh compile
    region: shapes compiled before are compiled again (from inductor's disk cache)."""
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
        raise ValueError(f'cap must be None or an int >= 0, got {cap!r}')
    context.flex_compile_cap = cap


def reset() -> None:
    """Restore the ops context to its defaults (settings, caches, measured choices, failures)."""
    context.reset()


def log_once(level: int, message: str, *args: Any) -> None:
    """Log ``message % args`` on the ops logger the first time it is seen since the last reset."""
    key = (message, args)
    if key not in context.logged:
        context.logged.add(key)
        logger.log(level, message, *args)

