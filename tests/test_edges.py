"""Edge cases with a documented result: NaN / Inf propagate, an empty batch, a transposed head, deterministic mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fused_hybrid
from fused_hybrid.engine.backends import logits_free_backend
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64

BACKENDS = ["chunked", "torch", "triton", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, value", [("hidden", float("nan")), ("weight", float("inf")), ("weight", float("nan"))])
def test_non_finite_inputs_propagate(backend, where, value):
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (6,))
    with torch.no_grad():
        (hidden if where == "hidden" else weight)[2, 3] = value
        if where == "weight":  # an inf weight gives +inf logits (not a finite -inf one) where hidden[:, 3] > 0
            hidden[:, 3] = hidden[:, 3].abs() + 0.1
    logp = fused_hybrid.linear_logprobs(hidden, weight, targets, backend=backend)
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert not torch.isfinite(logp).all(), "a non-finite input must not be silently dropped"
    assert not torch.isfinite(loss)
    if where == "hidden":
        assert torch.isfinite(logp[torch.arange(6) != 2]).all()  # other tokens are unaffected


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    logp, entropy = fused_hybrid.linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert logp.shape == entropy.shape == (0,)
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert loss.item() == 0.0
    d_hidden, d_weight = grads(loss, [hidden, weight])
    assert d_hidden.shape == (0, 8) and (d_weight == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_transposed_weight(backend):
    hidden = torch.randn(13, 10, requires_grad=True)
    weight_t = torch.randn(10, 41, requires_grad=True)  # stored [D, V]; the head is its transpose view
    targets = torch.randint(0, 41, (13,))
    logp = fused_hybrid.linear_logprobs(hidden, weight_t.T, targets, backend=backend)
    h64, w64 = leaf64(hidden), leaf64(weight_t)
    expected = logprobs_entropy64(h64, w64.T, targets)[0]
    assert_close_scaled(logp, expected, 1e-5)
    for got, want in zip(grads(logp.sum(), [hidden, weight_t]), grads(expected.sum(), [h64, w64])):
        assert_close_scaled(got, want, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_deterministic_mode_gives_bitwise_identical_gradients(backend, monkeypatch):
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    chunked_backward = []
    original = logits_free_backend("torch").backward
    monkeypatch.setattr(
        logits_free_backend("torch"), "backward", lambda *a, **k: chunked_backward.append(1) or original(*a, **k)
    )
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            loss = fused_hybrid.grpo_loss(
                hidden[None], weight, targets[None], advantages=torch.tensor([1.0]), entropy_coef=0.1, backend=backend
            ).loss
            runs.append(grads(loss, [hidden, weight]))
    finally:
        torch.use_deterministic_algorithms(previous)
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    # the Triton backend swaps its atomic backward for the chunked one in deterministic mode
    assert len(chunked_backward) == 2


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_of_ignored_tokens_give_finite_statistics_and_gradients(backend, deterministic):
    """A long prompt and trailing padding fill whole token blocks with ignored targets (the Triton kernels skip
    them); every statistic, the lse a backward reads included, must stay finite on every backend and mode."""
    n, d, v = 70, 12, 45
    hidden = (torch.randn(n, d) * 3).requires_grad_()  # wide logits: exp(z - wrong lse) would overflow
    weight = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[:37] = -100  # more than two 16-token blocks of prompt
    targets[-17:] = -100  # and a block of padding
    upstream = torch.randn(3, n)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        stats = fused_hybrid.linear_head_stats(hidden, weight, targets, backend=backend)
        for name, statistic in zip(stats._fields, stats):
            assert torch.isfinite(statistic).all(), name
        total = (stats.logp * upstream[0] + stats.entropy * upstream[1] + stats.lse * upstream[2]).sum()
        got = grads(total, [hidden, weight])
    finally:
        torch.use_deterministic_algorithms(previous)
    h64, w64 = leaf64(hidden), leaf64(weight)
    logp64, entropy64 = logprobs_entropy64(h64, w64, targets)
    valid = targets != -100
    lse64 = torch.where(valid, torch.logsumexp(h64 @ w64.T, -1), 0.0)
    expected = grads((logp64 * upstream[0] + entropy64 * upstream[1] + lse64 * upstream[2]).sum(), [h64, w64])
    assert_close_scaled(stats.logp, logp64, 1e-5, "logp")
    assert_close_scaled(stats.lse, lse64, 1e-5, "lse")
    for name, g, want in zip(("d_hidden", "d_weight"), got, expected):
        assert_close_scaled(g, want, 1e-4, name, atol=1e-6)
    assert (got[0][~valid] == 0).all()


def test_backends_are_looked_up_by_name_and_a_registered_one_runs(tmp_path, monkeypatch):
    from fused_hybrid.engine import backends

    with pytest.raises(ValueError, match="no logits-free backend named 'reference'"):
        backends.logits_free_backend("reference")  # the naive baseline is not a logits-free backend
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        # the fallback is decided in one place
        assert backends.backward_backend("triton") is logits_free_backend("torch")
    finally:
        torch.use_deterministic_algorithms(previous)
    pytest.importorskip("triton")
    assert backends.backward_backend("triton") is backends.logits_free_backend("triton")
    # a backend of one's own: a module with partials / backward / DETERMINISTIC_BACKWARD, registered by name
    (tmp_path / "counting_backend.py").write_text(
        "from fused_hybrid.engine.backends import logits_free_backend\n"
        "DETERMINISTIC_BACKWARD = True\n"
        "calls = []\n"
        "def partials(*args):\n    calls.append('partials')\n    return logits_free_backend('torch').partials(*args)\n"
        "def backward(*args, **kwargs):\n    calls.append('backward')\n"
        "    return logits_free_backend('torch').backward(*args, **kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    backends.register_backend("counting", "counting_backend")
    try:
        hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
        targets = torch.randint(0, 20, (6,))
        logp = fused_hybrid.linear_logprobs(hidden, weight, targets, backend="counting")
        expected = fused_hybrid.linear_logprobs(hidden, weight, targets, backend="reference")
        assert_close_scaled(logp, expected, 1e-5)
        logp.sum().backward()
    finally:
        del backends.LOGITS_FREE_BACKENDS["counting"]
    import counting_backend

    assert counting_backend.calls == ["partials", "backward"]


@pytest.mark.parametrize("count", [np.int64(7), np.float64(7.0), torch.tensor(7), torch.tensor(7.0), 7, 7.0])
def test_counts_are_taken_as_users_pass_them(count):
    """NumPy scalars (a count from a data pipeline) included."""
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    expected = fused_hybrid.linear_cross_entropy(hidden, weight, targets, reduction="sum") / 7
    torch.testing.assert_close(fused_hybrid.linear_cross_entropy(hidden, weight, targets, num_items=count), expected)


def test_a_loss_mask_of_zeros_and_ones_selects_as_a_bool_mask_does():
    hidden, weight, targets = torch.randn(2, 5, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 5))
    loss_mask = (torch.rand(2, 5) < 0.6).float()
    expected = fused_hybrid.dft_loss(hidden, weight, targets, loss_mask=loss_mask.bool()).loss
    for mask in (loss_mask, loss_mask.long()):
        torch.testing.assert_close(fused_hybrid.dft_loss(hidden, weight, targets, loss_mask=mask).loss, expected)
