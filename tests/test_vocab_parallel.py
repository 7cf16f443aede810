"""Vocab-parallel head with gloo at world sizes 2 and 4 on CPU, every backend, against one process with the
whole head on full logits. Each case runs in freshly spawned processes; results come back through files."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_hybrid
from tests.reference import assert_close_scaled

N, D, V = 41, 12, 37
SPLITS = {2: [20, 17], 4: [10, 9, 12, 6]}  # uneven slices


def inputs(ignore_index=-100):
    """Fixed inputs, the ignored tokens marked with `ignore_index`. Targets 20 and 23 are the second slice's local
    columns 0 and 3 (at world size 2): an ignore_index of 0 or 3 (a pad id) must not drop them there."""
    generator = torch.Generator().manual_seed(1234)
    hidden = torch.randn(N, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) / 2
    bias = torch.randn(V, generator=generator) / 4
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[targets == ignore_index] = (ignore_index + 1) % V
    targets[31], targets[32] = 20, 23
    targets[::5] = ignore_index
    targets[:18] = ignore_index  # a whole block of prompt, which the Triton forward skips
    upstream = torch.randn(2, N, generator=generator)
    return hidden, weight, bias, targets, upstream


def losses(hidden, weight, bias, targets, upstream, backend, vocab_parallel=None, ignore_index=-100):
    """Every path that reaches the head: log-probs + entropy, cross-entropy with smoothing and z-loss, GRPO."""
    options = dict(backend=backend, vocab_parallel=vocab_parallel, ignore_index=ignore_index)
    logp, entropy = fused_hybrid.linear_logprobs(
        hidden, weight, targets, bias, return_entropy=True, softcap=4.0, **options
    )
    ce = fused_hybrid.linear_cross_entropy(hidden, weight, targets, bias, label_smoothing=0.1, z_loss=1e-2, **options)
    grpo = fused_hybrid.grpo_loss(
        hidden.reshape(1, N, D),
        weight,
        targets.reshape(1, N),
        bias,
        advantages=torch.tensor([0.7]),
        old_logp=torch.full((1, N), -3.0),
        **options,
    ).loss
    return (logp * upstream[0]).sum() + (entropy * upstream[1]).sum() + ce + grpo


def worker(rank, world, init_file, out_dir, backend, reduce_hidden_grad, deterministic, ignore_index):
    torch.use_deterministic_algorithms(deterministic)  # before the process group: set after, gloo aborts at exit
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    hidden, weight, bias, targets, upstream = inputs(ignore_index)
    start = sum(SPLITS[world][:rank])
    rows = slice(start, start + SPLITS[world][rank])
    hidden = hidden.requires_grad_()
    weight_slice = weight[rows].clone().requires_grad_()
    bias_slice = bias[rows].clone().requires_grad_()
    parallel = fused_hybrid.VocabParallel(vocab_size=V, reduce_hidden_grad=reduce_hidden_grad)
    total = losses(hidden, weight_slice, bias_slice, targets, upstream, backend, parallel, ignore_index)
    total.backward()
    result = {
        "loss": total.detach(),
        "d_hidden": hidden.grad,
        "d_weight": weight_slice.grad,
        "d_bias": bias_slice.grad,
        "rows": (rows.start, rows.stop),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        fused_hybrid.linear_logprobs(
            hidden,
            weight_slice,
            targets,
            backend=backend,
            ignore_index=ignore_index,
            vocab_parallel=fused_hybrid.VocabParallel(vocab_size=V + 1),
        )
        raised = ""
    except ValueError as error:
        raised = str(error)
    torch.save(raised, os.path.join(out_dir, f"error{rank}.pt"))
    dist.destroy_process_group()


# (backend, world, reduce_hidden_grad, deterministic, ignore_index)
CASES = [
    (backend, *case, -100)
    for backend in ("torch", "triton")
    for case in ((2, True, False), (4, True, True), (2, False, False))
]
# an ignore_index that is a token id (0, or a pad id) and a local column of the second slice: every backend
CASES += [(backend, 2, True, False, ignore) for backend in ("torch", "chunked", "triton") for ignore in (0, 3)]


@pytest.mark.parametrize("backend, world, reduce_hidden_grad, deterministic, ignore_index", CASES)
def test_vocab_parallel_matches_one_process(tmp_path, backend, world, reduce_hidden_grad, deterministic, ignore_index):
    mp.spawn(
        worker,
        args=(world, str(tmp_path / "init"), str(tmp_path), backend, reduce_hidden_grad, deterministic, ignore_index),
        nprocs=world,
    )
    hidden, weight, bias, targets, upstream = inputs(ignore_index)
    hidden.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    # one process with the whole head, on full logits
    expected = losses(hidden, weight, bias, targets, upstream, "reference", ignore_index=ignore_index)
    expected.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    partial_hidden = torch.zeros_like(hidden)
    for result in results:
        start, stop = result["rows"]
        assert_close_scaled(result["loss"], expected, 1e-5, "loss")
        assert_close_scaled(result["d_weight"], weight.grad[start:stop], 1e-4, "d_weight", atol=1e-6)
        assert_close_scaled(result["d_bias"], bias.grad[start:stop], 1e-4, "d_bias", atol=1e-6)
        if reduce_hidden_grad:
            assert_close_scaled(result["d_hidden"], hidden.grad, 1e-4, "d_hidden", atol=1e-6)
        partial_hidden += result["d_hidden"]
    if not reduce_hidden_grad:  # each rank keeps its partial sum: together they are the gradient
        assert_close_scaled(partial_hidden, hidden.grad, 1e-4, "sum of partial d_hidden", atol=1e-6)
    for rank in range(world):
        assert "37 in all, but vocab_size is 38" in torch.load(tmp_path / f"error{rank}.pt")
