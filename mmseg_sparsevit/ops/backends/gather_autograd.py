"""Tile attention with a recomputing backward: the gather backend's kernel, O(N * d) memory in training.

A ``TileProblem`` is a set of tiles (of one sample, or the same tiles for every sample); each tile's
query slots attend to its gathered key slots under a boolean mask.  The forward runs chunk of tiles by
chunk of tiles without an autograd graph and keeps only the output and every query's log-sum-exp.  The
backward gathers each chunk's queries, keys and values again, recomputes its probabilities from the
log-sum-exp, forms dS = P * (dP - rowsum(dO * O)) and scatters dK / dV back with ``index_add_``: the
backward of FlashAttention-2 (Dao, 2023, arXiv:2307.08691, algorithm 2) with one tile chunk as the block.
The G global rows (``global_rows.py``, O(G * N)) are computed in the same function and their backward adds
into the same gradient buffers, so no second set of N x d gradients is summed in.  So what is saved for
backward is q, k, v, the output, the log-sum-exp and the tile tables, never the gathered neighbourhoods
(about 9x the tokens for a 'block' window), and the temporaries of a chunk bound the rest.  Scores,
statistics and gradient sums are float32 for every input dtype, with autocast off inside (under autocast
the inputs arrive in its dtype and the output keeps q's).
"""
from contextlib import nullcontext
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .global_rows import global_probs, global_rows

# Attention scores per chunk (samples x heads x tiles x queries x keys): 4 MiB per float32 temporary of
# that size, a few of which (scores, dP, gathered keys / values and their gradients) live at once.
CHUNK_SCORES = 2**20
# ... and at most this fraction of q's elements, so that on small grids the temporaries stay small next to
# the output and the gradients (which every attention needs) instead of adding a fixed 20 MiB.
CHUNK_OF_Q = 0.25
# Without gradients fused SDPA keeps no score-sized temporaries, only the chunk's gathered keys and values:
# chunks 8x larger, so fewer (and on a busy CPU, much cheaper) calls.
NO_GRAD_CHUNK_FACTOR = 8


class TileProblem(NamedTuple):
    """A tiles (Q query and K key slots each) of one sample (``sample``) or of every sample (None)."""
    sample: Optional[int]
    query_token: Tensor  # (A, Q) token of each query slot (any valid token where the slot is empty)
    query_dest: Tensor  # (A, Q) output row of each query slot: its token, or N (a spare row) where empty
    key_token: Tensor  # (A, K) token of each key slot, global keys included
    hidden: Optional[Tensor]  # (A, 1 or Q, K) query may not see key (None: sees all); no row hides all


def _chunks(problem: TileProblem, q: Tensor, factor: int = 1) -> Iterator[TileProblem]:
    """``problem`` cut along its tiles so that (samples x heads) x tiles x Q x K is at most ``factor`` x
    min(CHUNK_SCORES, CHUNK_OF_Q x q's elements)."""
    num_tiles, num_q = problem.query_token.shape
    rows = (q.shape[0] if problem.sample is None else 1) * q.shape[1]
    budget = factor * min(CHUNK_SCORES, int(CHUNK_OF_Q * q.numel()))
    step = max(1, budget // (rows * num_q * problem.key_token.shape[1]))
    for start in range(0, num_tiles, step):
        yield TileProblem(problem.sample, *(None if t is None else t[start:start + step] for t in problem[1:]))


def _of_sample(x: Tensor, sample: Optional[int]) -> Tensor:
    """(B, h, ...) -> the rows of ``sample`` ((1, h, ...) view), or all of them."""
    return x if sample is None else x[sample:sample + 1]


def _take(x: Tensor, tokens: Tensor) -> Tensor:
    """x (B', h, N, d) at ``tokens`` (A, L) -> (B', h, A, L, d) in float32 (a chunk-sized copy)."""
    taken = x.index_select(2, tokens.reshape(-1)).view(*x.shape[:2], *tokens.shape, x.shape[-1])
    return taken.to(torch.promote_types(x.dtype, torch.float32))


def _scores(q_t: Tensor, k_t: Tensor, hidden: Optional[Tensor]) -> Tensor:
    """Scores (B', h, A, Q, K) of scaled queries ``q_t``; hidden keys get -inf."""
    scores = q_t @ k_t.transpose(-2, -1)
    return scores if hidden is None else scores.masked_fill_(hidden, float('-inf'))


def _forward(q: Tensor, k: Tensor, v: Tensor, problems: list[TileProblem], scale: float, out: Tensor,
             lse: Tensor) -> None:
    """Fill the patch rows of ``out`` (B, h, N + 1, dv) and ``lse`` (B, h, N + 1), chunk by chunk."""
    for problem in problems:
        qs, ks, vs, outs, lses = (_of_sample(t, problem.sample) for t in (q, k, v, out, lse))
        for chunk in _chunks(problem, q):
            scores = _scores(_take(qs, chunk.query_token).mul_(scale), _take(ks, chunk.key_token), chunk.hidden)
            row_max = scores.amax(dim=-1, keepdim=True)
            weights = scores.sub_(row_max).exp_()  # unnormalised probabilities, in place of the scores
            row_sum = weights.sum(dim=-1, keepdim=True)
            chunk_out = (weights @ _take(vs, chunk.key_token)).div_(row_sum)
            dest = chunk.query_dest.reshape(-1)
            outs.index_copy_(2, dest, chunk_out.flatten(2, 3).to(out.dtype))
            lses.index_copy_(2, dest, row_sum.log_().add_(row_max).flatten(2))


def _attend_without_grad(q: Tensor, k: Tensor, v: Tensor, problems: list[TileProblem], scale: float,
                         out: Tensor) -> None:
    """Fill the patch rows of ``out`` (B, h, N + 1, dv) when no gradient is wanted: fused
    ``F.scaled_dot_product_attention`` per chunk (tiles as its head axis), no statistics kept."""
    for problem in problems:
        qs, ks, vs, outs = (_of_sample(t, problem.sample) for t in (q, k, v, out))
        for chunk in _chunks(problem, q, NO_GRAD_CHUNK_FACTOR):
            q_t, k_t, v_t = (_take(x, tokens).flatten(0, 1) for x, tokens in (
                (qs, chunk.query_token), (ks, chunk.key_token), (vs, chunk.key_token)))
            mask = None if chunk.hidden is None else ~chunk.hidden
            chunk_out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, scale=scale)
            outs.index_copy_(2, chunk.query_dest.reshape(-1),
                             chunk_out.view(*outs.shape[:2], -1, outs.shape[-1]).to(out.dtype))


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
              problems: list[TileProblem], scale: float, grads: tuple[Tensor, Tensor, Tensor]) -> None:
    """Add the patch rows' gradients of q, k, v into ``grads`` (float32, q's shape), chunk by chunk.

    Empty query slots read the spare row of ``lse``, +inf, so their probabilities (and gradients) are 0."""
    for problem in problems:
        qs, ks, vs, outs, lses, dos = (_of_sample(t, problem.sample) for t in (q, k, v, out, lse, grad_out))
        dq, dk, dv = (_of_sample(g, problem.sample) for g in grads)
        for chunk in _chunks(problem, q):
            q_t = _take(qs, chunk.query_token).mul_(scale)
            k_t, v_t = _take(ks, chunk.key_token), _take(vs, chunk.key_token)
            chunk_lse = lses.index_select(2, chunk.query_dest.reshape(-1)).view(*lses.shape[:2],
                                                                                 *chunk.query_dest.shape, 1)
            probs = _scores(q_t, k_t, chunk.hidden).sub_(chunk_lse).exp_()
            do_t = _take(dos, chunk.query_token)
            row_dot = (do_t * _take(outs, chunk.query_token)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
            grad_scores = (do_t @ v_t.transpose(-2, -1)).sub_(row_dot).mul_(probs)  # dS
            dq.index_add_(2, chunk.query_token.reshape(-1), (grad_scores @ k_t).mul_(scale).flatten(2, 3))
            keys = chunk.key_token.reshape(-1)
            dk.index_add_(2, keys, (grad_scores.transpose(-2, -1) @ q_t).flatten(2, 3))  # q_t is scaled
            dv.index_add_(2, keys, (probs.transpose(-2, -1) @ do_t).flatten(2, 3))


def _global_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, num_global: int,
                     scale: float, grads: tuple[Tensor, Tensor, Tensor]) -> None:
    """Add the global rows' gradients into ``grads`` (contiguous, float32), recomputing their probabilities;
    dK and dV are accumulated in place (``baddbmm_``), so their O(G * N) temporaries are all it allocates."""
    compute = grads[0].dtype
    probs = global_probs(q, k, num_global, scale).to(compute)  # (B, h, G, N)
    q_g, do_g = q[:, :, :num_global].to(compute), grad_out[:, :, :num_global].to(compute)
    row_dot = (do_g * out[:, :, :num_global].to(compute)).sum(dim=-1, keepdim=True)
    grad_scores = (do_g @ v.to(compute).transpose(-2, -1)).sub_(row_dot).mul_(probs).mul_(scale)  # dS * scale
    dq, dk, dv = grads
    dq[:, :, :num_global] += grad_scores @ k.to(compute)
    dk.flatten(0, 1).baddbmm_(grad_scores.transpose(-2, -1).flatten(0, 1), q_g.flatten(0, 1))
    dv.flatten(0, 1).baddbmm_(probs.transpose(-2, -1).flatten(0, 1), do_g.flatten(0, 1))


def _token_major_output(q: Tensor, v: Tensor) -> Tensor:
    """An empty (B, h, N + 1, dv) output stored token-major, (B, N + 1, h, dv) in memory, as fused SDPA stores
    its output: the caller's ``out.transpose(1, 2).reshape(B, N, h * dv)`` is then a view of the tensor saved
    for backward, not a second N x C copy kept for the projection's backward."""
    batch, heads, num_tokens, _ = q.shape
    return q.new_empty(batch, num_tokens + 1, heads, v.shape[-1]).transpose(1, 2)


class TileAttention(torch.autograd.Function):
    """Output (B, h, N, dv) of every token: the first ``num_global`` rows attend to all tokens
    (``global_rows``), the patch rows are the tile problems' attention."""

    @staticmethod
    @torch.autocast('cpu', enabled=False)
    @torch.autocast('cuda', enabled=False)
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, problems: list[TileProblem], scale: float,
                num_global: int) -> Tensor:
        batch, heads, num_tokens, _ = q.shape
        # one spare row (index N) takes the writes of empty query slots; its log-sum-exp is +inf
        out = _token_major_output(q, v)
        lse = q.new_empty(batch, heads, num_tokens + 1, dtype=torch.promote_types(q.dtype, torch.float32))
        out[:, :, :num_global] = global_rows(q, k, v, num_global, scale)
        _forward(q, k, v, problems, scale, out, lse)
        lse[:, :, num_tokens] = float('inf')
        out = out[:, :, :num_tokens]
        ctx.samples = [problem.sample for problem in problems]
        ctx.masked = [problem.hidden is not None for problem in problems]
        ctx.scale, ctx.num_global = scale, num_global
        ctx.save_for_backward(q, k, v, out, lse, *(t for problem in problems for t in problem[1:] if t is not None))
        return out

    @staticmethod
    @torch.autocast('cpu', enabled=False)
    @torch.autocast('cuda', enabled=False)
    def backward(ctx, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        q, k, v, out, lse, *saved = ctx.saved_tensors
        tables, problems = iter(saved), []
        for sample, masked in zip(ctx.samples, ctx.masked):
            problems.append(TileProblem(sample, next(tables), next(tables), next(tables),
                                        next(tables) if masked else None))
        compute = torch.promote_types(q.dtype, torch.float32)
        grads = tuple(torch.zeros(x.shape, dtype=compute, device=x.device) for x in (q, k, v))
        if ctx.num_global:
            _global_backward(q, k, v, out, grad_out, ctx.num_global, ctx.scale, grads)
        _backward(q, k, v, out, lse, grad_out, problems, ctx.scale, grads)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, None


def tile_attention(q: Tensor, k: Tensor, v: Tensor, problems: list[TileProblem], scale: float,
                   num_global: int) -> Tensor:
    """``TileAttention``: (B, h, N, dv), differentiable in q, k and v, saving O(N * d) for backward.
    Without gradients the patch rows run through fused SDPA instead (same chunks, faster on CPU)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return TileAttention.apply(q, k, v, problems, scale, num_global)
    num_tokens = q.shape[2]
    with torch.autocast(q.device.type, enabled=False) if q.device.type in ('cpu', 'cuda') else nullcontext():
        out = _token_major_output(q, v)
        out[:, :, :num_global] = global_rows(q, k, v, num_global, scale)
        _attend_without_grad(q, k, v, problems, scale, out)
    return out[:, :, :num_tokens]
