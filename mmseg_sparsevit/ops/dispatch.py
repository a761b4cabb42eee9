"""Which backend runs a ``sparse_attention`` call: requested by name, or measured, as cudnn.benchmark does.

A backend is requested by the ``backend`` argument, ``set_attention_backend`` or the environment variable
``SPARSEVIT_ATTN_BACKEND``, in that order; a requested backend that cannot run raises.  Otherwise the
candidates are the backends of the table whose ``why_not`` has no objection; with more than one, the first
call for an input key times each (one untimed warm-up, so a compile is not counted, then the fastest of a
few calls), keeps the winner in the ops context and logs the timings.  Automatic calls never run flex
eagerly: a call a backend refuses goes to the next candidate, and a backend whose ``failures()`` are
raised (e.g. inductor finds no C++ compiler) is dropped for the rest of the process.  Any other error
propagates.
"""
import functools
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from .backends import BackendRefusedError
from .context import BACKEND_ENV, context, log_once, logger


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The backend asked for by name: the argument, ``set_attention_backend``, then the environment."""
    context.check_backend('backend', backend)
    requested = backend or context.forced_backend
    if requested is None:
        requested = os.environ.get(BACKEND_ENV) or None
        context.check_backend(f'environment variable {BACKEND_ENV}', requested)
    return requested


def _objections(q: Tensor, k: Tensor, v: Tensor, num_slots: Optional[int]) -> dict[str, Optional[str]]:
    """Every backend of the table -> why the automatic choice must not use it here (None: it may)."""
    return {name: context.failures.get(name) or entry.why_not(q, k, v, automatic=True, num_slots=num_slots)
            for name, entry in context.backends.items()}


def backend_candidates(q: Tensor, k: Tensor, v: Tensor, backend: Optional[str] = None,
                       grid_hw: Optional[tuple[int, int]] = None, num_global: int = 0) -> tuple[str, ...]:
    """The backends that may run this call: the requested one (raising if it cannot run), else every
    backend the automatic choice may measure, in table order.

    With ``grid_hw`` the size of the call is the whole grid (+ ``num_global``), not the tokens present:
    flex runs over every slot of the grid, pruned or not (q's tokens are counted without a grid)."""
    requested = requested_backend(backend)
    if requested is not None:
        _check_requested(requested, q, k, v)
        return requested,
    num_slots = None if grid_hw is None else grid_hw[0] * grid_hw[1] + num_global
    return tuple(name for name, reason in _objections(q, k, v, num_slots).items() if reason is None)


def _check_requested(name: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    reason = context.backends[name].why_not(q, k, v, automatic=False)
    if reason is not None:
        raise RuntimeError(f'sparse_attention backend "{name}" was requested but cannot run: {reason}')


def choice_key(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int, window_size: int,
               neighbourhood: str, pruned: bool) -> tuple:
    """What a measured choice holds for: device type, dtype, grid, G, heads, head_dim, window, pattern,
    pruned or not, grad or not.  Not the batch size: every backend's cost grows linearly in it."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (q.device.type, q.dtype, tuple(grid_hw), num_global, q.shape[1], q.shape[3], window_size,
            neighbourhood, pruned, grad)


def _describe(key: tuple) -> str:
    device, dtype, (height, width), num_global, heads, head_dim, window, pattern, pruned, grad = key
    return (f'{device} {str(dtype).replace("torch.", "")} grid {height}x{width} G={num_global} {heads}x{head_dim} '
            f'window {window} {pattern}{" pruned" if pruned else ""}{" grad" if grad else ""}')


def _run_in_order(names: list[str], args: tuple) -> Tensor:
    """Run the first of ``names`` that takes the call; a refusal passes it on, a failure too (and drops
    that backend for good)."""
    for i, name in enumerate(names):
        entry, rest = context.backends[name], names[i + 1:]
        try:
            return entry.run(*args, automatic=True)
        except BackendRefusedError as err:
            if not rest:
                raise
            log_once(logging.INFO, 'sparse_attention: using the %s backend for this call (%s: %s)', rest[0], name,
                     err.reason)
        except entry.failures() as err:  # evaluated only when something was raised
            if not rest:
                raise
            _drop(name, err)
    raise AssertionError('unreachable: the last backend either returns or raises')


def _drop(name: str, err: BaseException) -> None:
    context.failures[name] = f'failed earlier with {type(err).__name__}: {err}'
    logger.warning('sparse_attention: %s backend %s; not choosing it again', name, context.failures[name])


def _measure(key: tuple, names: list[str], args: tuple) -> Tensor:
    """Time every candidate on this call, keep the fastest in ``context.choices`` and return its result.

    Candidates are timed last-in-table first, so the fallback (gather) comes last: when refusals or
    failures leave it alone it runs once, untimed.  After a refusal nothing is kept (it holds for one call:
    e.g. the compile cap for this batch size, or an active TorchDispatchMode)."""
    timings: dict[str, float] = {}
    refusals: dict[str, str] = {}
    best: Optional[tuple[str, Tensor]] = None
    remaining = names[::-1]
    while remaining:
        name = remaining.pop(0)
        entry = context.backends[name]
        if best is None and not remaining:  # nothing to compare with; its errors propagate
            best = (name, _run_in_order([name], args))
            break
        try:
            seconds, result = context.timer(functools.partial(entry.run, *args, automatic=True), args[0].device)
        except BackendRefusedError as err:
            refusals[name] = err.reason
            continue
        except entry.failures() as err:
            _drop(name, err)
            continue
        timings[name] = seconds
        if best is None or seconds < timings[best[0]]:
            best = (name, result)
    if refusals:
        log_once(logging.INFO, 'sparse_attention: using the %s backend for this call (%s)', best[0],
                 '; '.join(f'{name}: {reason}' for name, reason in refusals.items()))
    elif len(timings) > 1:
        context.choices[key] = best[0]
        logger.info('sparse_attention: measured %s: %s; using %s', _describe(key),
                    ', '.join(f'{n} {s * 1e3:.1f} ms' for n, s in sorted(timings.items(), key=lambda x: x[1])),
                    best[0])
    return best[1]


def dispatch(q: Tensor, k: Tensor, v: Tensor, grid_hw: tuple[int, int], num_global: int, window_size: int,
             neighbourhood: str, patch_index: Optional[Tensor], scale: float,
             backend: Optional[str]) -> Tensor:
    """Run sparse attention on validated arguments with the requested or the measured backend."""
    args = (q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index, scale)
    requested = requested_backend(backend)
    if requested is not None:
        _check_requested(requested, q, k, v)
        log_once(logging.INFO, 'sparse_attention: using the %s backend (requested)', requested)
        return context.backends[requested].run(*args, automatic=False)
    objections = _objections(q, k, v, grid_hw[0] * grid_hw[1] + num_global)
    names = [name for name, reason in objections.items() if reason is None]
    if len(names) == 1:
        why = '; '.join(f'{name}: {reason}' for name, reason in objections.items() if reason is not None)
        log_once(logging.INFO, 'sparse_attention: using the %s backend (%s)', names[0], why)
        return _run_in_order(names, args)
    key = choice_key(q, k, v, grid_hw, num_global, window_size, neighbourhood, patch_index is not None)
    winner = context.choices.get(key)
    if winner in names:
        return _run_in_order([winner] + [name for name in names if name != winner], args)
    return _measure(key, names, args)
