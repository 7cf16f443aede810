"""Vocab-parallel LM head over a `torch.distributed` process group.

Each rank holds a contiguous slice `weight[V_r, D]` of the head (uneven slices allowed, in rank order) and the same
hidden states and targets. The forward computes each rank's vocabulary partials (VocabPartials) and combines them
across ranks (one all-reduce of the maxima, one of the rescaled sums), so every rank gets the full log-probs,
entropies and log-sum-exps. The backward gives each rank the gradient of its own weight (and bias) slice, and the
hidden gradient summed over ranks (or, with `reduce_hidden_grad=False`, this rank's partial sum, for a caller
that reduces it later, e.g. with a reduce-scatter under sequence parallelism).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from .backends import logits_free_backend
from .core import (
    HeadStats,
    SoftmaxNorm,
    VocabPartials,
    common_max,
    finalize_partials,
    rescale_to_max,
    softmax_norm,
)
from .custom_op import statistics_backward
from .head import HeadSpec

# The ignore index of the local targets: negative, so that no column of any slice equals it. The caller's own
# ignore_index may be a token id (the pad id, 0) that is a local column of some slice.
LOCAL_IGNORE_INDEX = -1


def shard_targets(targets: torch.Tensor, offset: int, local_vocab: int, valid: torch.Tensor) -> torch.Tensor:
    """Targets in this slice's coordinates: LOCAL_IGNORE_INDEX where not `valid`; a target on another slice
    becomes `local_vocab`, which no column matches and which is not ignored (its token's sums still count here)."""
    local = targets - offset
    in_slice = (local >= 0) & (local < local_vocab)
    return torch.where(valid, torch.where(in_slice, local, local_vocab), LOCAL_IGNORE_INDEX)


def all_reduce_partials(partials: VocabPartials, group) -> VocabPartials:
    """The partials of the whole vocabulary from each rank's slice (the algebra of merge_partials)."""
    token_max = partials.max.clone()
    dist.all_reduce(token_max, op=dist.ReduceOp.MAX, group=group)
    token_max = common_max(token_max)
    sum_exp, sum_exp_shifted = rescale_to_max(partials, token_max)
    sums = torch.stack([sum_exp, sum_exp_shifted, partials.sum_z, partials.target_logit])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return VocabPartials(token_max, *sums)


class _VocabParallelStatistics(torch.autograd.Function):
    """Each rank's partials, combined across ranks; the backward is the custom op's (`statistics_backward`), on
    this rank's slice, with the hidden gradient summed over ranks."""

    @staticmethod
    def forward(ctx, hidden, weight, local_targets, valid, bias, head: HeadSpec):
        partials = logits_free_backend(head.backend).partials(hidden, weight, local_targets, bias, head)
        full = all_reduce_partials(partials, head.vocab_parallel.group)
        stats = finalize_partials(full)
        # the full vocabulary's max and log s: the backward's log p = (z - m) - log s on this rank's columns
        norm = softmax_norm(full)
        ctx.save_for_backward(hidden, weight, local_targets, valid, bias, norm.max, norm.log_sum_exp, stats.entropy)
        ctx.head = head
        ctx.set_materialize_grads(False)
        return tuple(torch.where(valid, s, 0.0) for s in stats)

    @staticmethod
    def backward(ctx, g_logp, g_entropy, g_lse, g_sum_z):
        hidden, weight, local_targets, valid, bias, row_max, log_sum_exp, entropy = ctx.saved_tensors
        parallel = ctx.head.vocab_parallel
        needs_hidden, needs_weight, _, _, needs_bias = ctx.needs_input_grad[:5]
        d_hidden, d_weight, d_bias = statistics_backward(
            hidden,
            weight,
            local_targets,
            bias,
            SoftmaxNorm(row_max, log_sum_exp),
            entropy,
            valid,
            (g_logp, g_entropy, g_lse, g_sum_z),
            ctx.head,
            (needs_hidden, needs_weight, needs_bias),
        )
        if d_hidden is not None and parallel.reduce_hidden_grad:
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=parallel.group)
        return d_hidden, d_weight, None, None, d_bias, None


def vocab_parallel_head_stats(hidden, weight, targets, bias, head: HeadSpec) -> HeadStats:
    """The full vocabulary's statistics from this rank's slice `weight` of the head `head.vocab_parallel`."""
    offset = head.vocab_parallel.layout(weight.shape[0], weight.device)[0]
    valid = targets != head.ignore_index
    local_targets = shard_targets(targets, offset, weight.shape[0], valid)
    local_head = dataclasses.replace(head, ignore_index=LOCAL_IGNORE_INDEX)
    return HeadStats(*_VocabParallelStatistics.apply(hidden, weight, local_targets, valid, bias, local_head))
