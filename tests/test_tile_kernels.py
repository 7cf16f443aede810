"""The tile kernels' backward (through the Triton interpreter): the grouped launch order covers every tile, and
gradient filtering skips tiles yet stays as close to an fp32 reference as naive bf16 PyTorch on trained-like
inputs, for weighted log-prob and entropy gradients; it is off where a uniform term reaches every column."""

from __future__ import annotations

import pytest
import torch
from fused_hybrid.kernels.logit_tile import INTERPRETER_CONFIG
from fused_hybrid.kernels.token_statistics_backward import GROUP_N, count_filtered_tiles

import fused_hybrid
from benchmarks.problems import make_problem
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64

FILTER = 2.0**-12


def test_grouped_launch_order_covers_every_tile():
    """More token blocks than one group and a last group of another size: every tile's gradient lands once."""
    n = INTERPRETER_CONFIG.block_n * (GROUP_N + 2) + 3
    hidden = torch.randn(n, 24, requires_grad=True)
    weight = (torch.randn(3 * INTERPRETER_CONFIG.block_v + 5, 24) / 5).requires_grad_()
    targets = torch.randint(0, weight.shape[0], (n,))
    upstream = torch.randn(n)
    logp = fused_hybrid.linear_logprobs(hidden, weight, targets, backend="triton")
    actual = grads((logp * upstream).sum(), [hidden, weight])
    leaves = [leaf64(hidden), leaf64(weight)]
    logp64, _ = logprobs_entropy64(*leaves, targets)
    for got, want, name in zip(actual, grads((logp64 * upstream.double()).sum(), leaves), ("d_hidden", "d_weight")):
        assert_close_scaled(got, want, 1e-5, name)


def _relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [float((g.double() - w).abs().max() / w.abs().max()) for g, w in zip(got, want)]


def test_gradient_filter_skips_tiles_and_stays_within_naive_bf16_error():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    # D 256: in a few dimensions the target's direction leaks into every logit and the tail is not a trained one's
    problem = make_problem(
        "cross_entropy",
        64,
        256,
        1024,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seq_len=64,
        seed=seed,
        distribution="trained",
    )
    hidden, weight = problem.hidden.detach().reshape(-1, 256), problem.weight.detach()
    targets = problem.targets.reshape(-1)
    g_logp, g_entropy = torch.randn(len(targets)), torch.randn(len(targets)) * 0.1

    leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    logp64, entropy64 = logprobs_entropy64(*leaves, targets)
    expected = grads((logp64 * g_logp.double() + entropy64 * g_entropy.double()).sum(), leaves)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with count_filtered_tiles() as tiles:
        logp, entropy = fused_hybrid.linear_logprobs(
            h, w, targets, return_entropy=True, backend="triton", gradient_filter=FILTER
        )
        filtered = grads((logp * g_logp + entropy * g_entropy).sum(), [h, w])

    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    log_probs = torch.log_softmax((h16 @ w16.T).float(), dim=-1)
    naive_entropy = -(log_probs.exp() * log_probs).sum(-1)
    naive_logp = log_probs.gather(-1, targets[:, None])[:, 0]
    naive = grads((naive_logp * g_logp + naive_entropy * g_entropy).sum(), [h16, w16])

    # a tile is kept if any of its 16 tokens has its target among the tile's 32 columns (40% of them) or a tail
    # column above the threshold
    assert 0.0 < tiles.kept_fraction < 0.9, f"kept {tiles.kept_fraction:.2f} of the tiles (seed {seed})"
    for name, filtered_error, naive_error in zip(
        ("d_hidden", "d_weight"), _relative_errors(filtered, expected), _relative_errors(naive, expected)
    ):
        assert filtered_error <= naive_error, f"{name}: filtered {filtered_error:.2e} > naive bf16 {naive_error:.2e}"


def test_gradient_filter_is_off_when_a_uniform_term_reaches_every_column():
    """Label smoothing adds eps / V to every column's gradient: skipping tiles would drop a constant share of it,
    so the filtered run equals the exact one."""
    problem = make_problem(
        "cross_entropy",
        64,
        32,
        512,
        dtype=torch.float32,
        device=torch.device("cpu"),
        seq_len=64,
        seed=int(torch.randint(0, 2**31 - 1, ())),
        distribution="trained",
    )
    hidden, weight = problem.hidden.detach().reshape(-1, 32), problem.weight.detach()
    targets = problem.targets.reshape(-1)
    results = []
    for gradient_filter in (None, FILTER):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_hybrid.linear_cross_entropy(
            h, w, targets, label_smoothing=0.1, backend="triton", gradient_filter=gradient_filter
        )
        results.append(grads(loss, [h, w]))
    for exact, filtered in zip(*results):
        assert torch.equal(exact, filtered)


@pytest.mark.parametrize(
    "bad, message",
    [
        (0.0, "gradient_filter must be a finite number > 0"),
        (1.5, "gradient_filter must lie in \\(0, 1\\)"),
        ("1e-4", "gradient_filter must be a Python number"),
    ],
)
def test_gradient_filter_bad_values_are_named(bad, message):
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises((TypeError, ValueError), match=message):
        fused_hybrid.linear_cross_entropy(hidden, weight, targets, gradient_filter=bad)
