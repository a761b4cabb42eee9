"""Which backend runs a call: requested by name, or measured once per input key and kept in the ops
context; refusals and compile failures of an automatic flex go to gather, any other error propagates.

Measured choices are made deterministic through the context: its timer reads a fake clock that a backend
advances when it runs, so one backend is "slow" by construction and no wall time is asserted.
"""
import contextlib
import functools
import logging

import pytest
import torch

from mmseg_sparsevit.ops import (backend_candidates, set_attention_backend, sparse_attention,
                                 sparse_attention_reference)
from mmseg_sparsevit.ops.backends import flex
from mmseg_sparsevit.ops.context import BACKEND_ENV, time_calls
from mmseg_sparsevit.ops.dispatch import choice_key
from sparse_attention_cases import LargestTensor, inputs, needs_flex

OPS_LOGGER = 'mmseg_sparsevit.ops'


class FakeClock:
    """A clock that only moves when a backend wrapped by ``slowed`` runs."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def slowed(context, name, clock, seconds):
    """Replace backend ``name`` in the context's table by one that takes ``seconds`` on ``clock`` and
    counts its runs in the returned list."""
    entry, runs = context.backends[name], []

    def run(*args, automatic):
        clock.now += seconds
        runs.append(automatic)
        return entry.run(*args, automatic=automatic)

    context.backends[name] = entry._replace(run=run)
    return runs


@pytest.fixture
def fake_clock(cheap_flex):
    clock = FakeClock()
    cheap_flex.timer = functools.partial(time_calls, clock=clock)
    return clock


def _check(out, q, k, v, grid, patch_index=None, window=2):
    ref = sparse_attention_reference(q, k, v, grid, 1, window, patch_index=patch_index)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- candidates and requests ----------
def test_automatic_choice_logs_why_flex_said_no(caplog):
    q, k, v, _ = inputs(0, 1, 1, (4, 4), requires_grad=True)
    with caplog.at_level(logging.INFO, logger=OPS_LOGGER):
        assert backend_candidates(q, k, v) == ('gather', )
        sparse_attention(q, k, v, (4, 4), 1, 2)
        sparse_attention(q, k, v, (4, 4), 1, 2)
    messages = [r.getMessage() for r in caplog.records]
    expected_reason = 'torch has no flex_attention' if flex.flex_attention is None else 'no grad on CPU'
    assert len(messages) == 1 and expected_reason in messages[0] and 'gather backend' in messages[0]


@needs_flex
def test_automatic_choice_keeps_small_cpu_inputs_on_gather():
    q, k, v, _ = inputs(0, 1, 1, (4, 4))
    with torch.no_grad():
        assert backend_candidates(q, k, v) == ('gather', )
        big = torch.empty(1, 1, flex.context.flex_min_tokens_cpu, 8)
        assert backend_candidates(big, big, big) == ('gather', 'flex')


@needs_flex
def test_automatic_choice_sizes_pruned_calls_by_their_grid():
    """A pruned call runs on the grid's slots: flex may take it where it may take the unpruned call."""
    few = torch.empty(1, 1, 1 + 100, 8)
    with torch.no_grad():
        assert backend_candidates(few, few, few) == ('gather', )
        assert backend_candidates(few, few, few, grid_hw=(64, 64), num_global=1) == ('gather', 'flex')
        assert backend_candidates(few, few, few, grid_hw=(10, 10), num_global=1) == ('gather', )


def test_forcing_a_backend(monkeypatch):
    q, k, v, _ = inputs(0, 1, 1, (4, 4))
    monkeypatch.setenv(BACKEND_ENV, 'gather')
    assert backend_candidates(q, k, v) == ('gather', )
    monkeypatch.setenv(BACKEND_ENV, 'bogus')
    with pytest.raises(ValueError, match=BACKEND_ENV):
        backend_candidates(q, k, v)
    set_attention_backend('gather')  # the function beats the environment variable
    assert backend_candidates(q, k, v) == ('gather', )
    with pytest.raises(ValueError, match='backend'):
        set_attention_backend('dense')


@needs_flex
def test_requested_flex_that_cannot_run_raises():
    q, k, v, _ = inputs(0, 1, 1, (4, 4), requires_grad=True)
    with pytest.raises(RuntimeError, match='no grad on CPU'):
        sparse_attention(q, k, v, (4, 4), 1, backend='flex')


@needs_flex
def test_a_requested_backend_is_not_measured(fake_clock, cheap_flex):
    runs = slowed(cheap_flex, 'flex', fake_clock, 1.0)
    set_attention_backend('gather')
    q, k, v, _ = inputs(0, 1, 1, (4, 4))
    with torch.no_grad():
        _check(sparse_attention(q, k, v, (4, 4), 1, 2), q, k, v, (4, 4))
    assert runs == [] and cheap_flex.choices == {}


# ---------------------------------------------------------------- measured choice -------------------
def test_timer_does_not_count_the_warm_up():
    """The first call may compile: only the repeats after it are timed, and the fastest one counts."""
    clock, costs = FakeClock(), iter([100.0, 3.0, 2.0])

    def call():
        clock.now += next(costs)
        return 'result'

    assert time_calls(call, torch.device('cpu'), clock=clock) == (2.0, 'result')


@needs_flex
@pytest.mark.parametrize('slow', ['gather', 'flex'])
def test_measured_choice_takes_the_faster_backend(fake_clock, cheap_flex, caplog, slow):
    fast = {'gather': 'flex', 'flex': 'gather'}[slow]
    runs = {slow: slowed(cheap_flex, slow, fake_clock, 1.0), fast: slowed(cheap_flex, fast, fake_clock, 0.5)}
    q, k, v, _ = inputs(0, 1, 1, (6, 6))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger=OPS_LOGGER):
        _check(sparse_attention(q, k, v, (6, 6), 1, 2), q, k, v, (6, 6))
        key = choice_key(q, k, v, (6, 6), 1, 2, 'block', pruned=False)
        assert cheap_flex.choices == {key: fast}
        assert [len(runs['gather']), len(runs['flex'])] == [3, 3]  # one warm-up + 2 timed calls each
        _check(sparse_attention(q, k, v, (6, 6), 1, 2), q, k, v, (6, 6))
    assert len(runs[fast]) == 4 and len(runs[slow]) == 3  # the kept choice: one call, not measured again
    assert all(runs['flex'])  # always as an automatic call: never allowed to run eagerly
    measured = [r.getMessage() for r in caplog.records if 'measured' in r.getMessage()]
    assert measured == [f'sparse_attention: measured cpu float32 grid 6x6 G=1 2x8 window 2 block: '
                        f'{fast} 500.0 ms, {slow} 1000.0 ms; using {fast}']


@needs_flex
def test_measured_choice_is_kept_per_input_key(fake_clock, cheap_flex):
    """Pruned and unpruned calls, and another grid, are measured apart; a grad call on CPU (flex has no
    CPU backward) is not measured at all."""
    slowed(cheap_flex, 'gather', fake_clock, 1.0)
    with torch.no_grad():
        for keep, grid in [(1.0, (6, 6)), (0.5, (6, 6)), (1.0, (5, 7)), (1.0, (6, 6))]:
            q, k, v, patch_index = inputs(0, 1, 1, grid, keep)
            _check(sparse_attention(q, k, v, grid, 1, 2, patch_index=patch_index), q, k, v, grid, patch_index)
    assert sorted((key[2], key[-2]) for key in cheap_flex.choices) == [((5, 7), False), ((6, 6), False),
                                                                        ((6, 6), True)]
    assert set(cheap_flex.choices.values()) == {'flex'}
    q, k, v, _ = inputs(0, 1, 1, (6, 6), requires_grad=True)
    _check(sparse_attention(q, k, v, (6, 6), 1, 2), q, k, v, (6, 6))
    assert len(cheap_flex.choices) == 3


# ---------------------------------------------------------------- refusals and failures -------------
@needs_flex
def test_automatic_choice_past_the_compile_cap_uses_gather(fake_clock, cheap_flex, caplog, monkeypatch):
    """Cap 1: the first grid is compiled and measured (flex faster); a second grid would be a second graph,
    so it is refused and that call uses gather, logged once; the first grid still runs compiled."""
    monkeypatch.setenv('SPARSEVIT_FLEX_COMPILE_CAP', '1')
    slowed(cheap_flex, 'gather', fake_clock, 1.0)
    runs = []
    with caplog.at_level(logging.INFO, logger=OPS_LOGGER):
        for grid in [(4, 4), (6, 6), (6, 6), (4, 4)]:
            q, k, v, _ = inputs(1, 1, 1, grid)
            with torch.no_grad():
                _check(sparse_attention(q, k, v, grid, 1, 2), q, k, v, grid)
            runs.append(dict(cheap_flex.flex_runs))
    assert runs == [{'compiled': 3}, {'compiled': 3, 'refused': 1}, {'compiled': 3, 'refused': 2},
                    {'compiled': 4, 'refused': 2}]  # never uncompiled
    cap_logs = [r.getMessage() for r in caplog.records if 'compile cap' in r.getMessage()]
    assert len(cap_logs) == 1 and 'gather backend' in cap_logs[0]
    assert 'cap of 1 ' in cap_logs[0] and 'SPARSEVIT_FLEX_COMPILE_CAP' in cap_logs[0]


@needs_flex
@pytest.mark.parametrize('skip', ['disabled', 'dispatch mode'])
def test_flex_never_runs_eagerly_where_compile_is_skipped(cheap_flex, caplog, skip):
    """torch.compile runs the function eagerly when dynamo is disabled or a TorchDispatchMode is active."""
    grid = (24, 24)
    q, k, v, _ = inputs(2, 1, 1, grid, heads=1, dim=4)
    disabled = torch._dynamo.config.patch(disable=skip == 'disabled')
    with torch.no_grad(), caplog.at_level(logging.INFO), disabled:
        with LargestTensor() if skip == 'dispatch mode' else contextlib.nullcontext() as probe:
            out = sparse_attention(q, k, v, grid, 1, 2)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, grid, 1, 2), atol=1e-5, rtol=1e-5)
    assert cheap_flex.flex_runs == {'refused': 1}
    if probe is not None:
        # no score matrix (eager flex: 576 x 577 scores); the block-mask builder's chunks reach 0.42 N^2
        assert probe.largest < q.shape[2]**2 / 2
    assert ('TORCH_COMPILE_DISABLE' if skip == 'disabled' else 'TorchDispatchMode') in caplog.text
    assert cheap_flex.choices == {}  # a refusal holds for that call only


def _no_cxx_compiler(graph, example_inputs):
    """A torch.compile backend failing as inductor does on a machine without a C++ compiler."""
    from torch._inductor.exc import InvalidCxxCompiler
    raise InvalidCxxCompiler()


@needs_flex
def test_automatic_flex_compile_failure_falls_back_to_gather(cheap_flex, caplog):
    """The compile error (dynamo wraps it in BackendCompilerFailed) drops flex for the process, logged."""
    from torch._dynamo.exc import BackendCompilerFailed
    cheap_flex.flex_compile_backend = _no_cxx_compiler
    q, k, v, _ = inputs(0, 1, 1, (4, 4))
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=OPS_LOGGER):
        out = sparse_attention(q, k, v, (4, 4), 1, 2)
        assert 'C++ compiler' in caplog.text and 'not choosing it again' in caplog.text
        assert backend_candidates(q, k, v) == ('gather', )
        with pytest.raises(BackendCompilerFailed, match=r'C\+\+ compiler'):  # asked for by name: no fallback
            sparse_attention(q, k, v, (4, 4), 1, 2, backend='flex')
    _check(out, q, k, v, (4, 4))


@needs_flex
@pytest.mark.parametrize('bug', ['ValueError', 'wrong grid'])
def test_other_errors_of_an_automatic_flex_propagate(cheap_flex, bug):
    """A bug in our own flex code (here a ValueError, or the real flex code handed a grid one row too
    long, so it gathers tokens past the end) is raised, not turned into "use gather from now on"."""
    entry = cheap_flex.backends['flex']

    def buggy(q, k, v, grid_hw, *args, automatic):
        if bug == 'ValueError':
            raise ValueError('bug in the block mask')
        return entry.run(q, k, v, (grid_hw[0] + 1, grid_hw[1]), *args, automatic=automatic)

    cheap_flex.backends['flex'] = entry._replace(run=buggy)
    q, k, v, _ = inputs(0, 1, 1, (4, 4))
    with torch.no_grad(), pytest.raises(ValueError if bug == 'ValueError' else IndexError):
        sparse_attention(q, k, v, (4, 4), 1, 2)
    assert cheap_flex.failures == {} and cheap_flex.choices == {}
    assert backend_candidates(q, k, v) == ('gather', 'flex')
