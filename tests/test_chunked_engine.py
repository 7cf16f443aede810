"""The chunked engine: chunk sizing by the workspace, the gradient inside the forward (three GEMMs, no recompute)
for every token-separable objective, ignored tokens compacted before the GEMMs, forward and recompute on
bit-identical logits, and the Triton epilogue against the PyTorch one (through the interpreter)."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from fused_hybrid import HeadSpec
from fused_hybrid.engine import chunked, torch_epilogue
from fused_hybrid.engine.chunked import GEMM_ROW_MULTIPLE, chunk_rows  # the real sizing
from fused_hybrid.engine.core import SoftmaxNorm, token_grad_coefficients
from tests.reference import assert_close_scaled, grads

D, V = 16, 45


def batch(rows=6, length=9, ignore_fraction=0.3):
    hidden = torch.randn(rows, length, D).requires_grad_()
    weight = (torch.randn(V, D) / 3).requires_grad_()
    targets = torch.randint(0, V, (rows, length))
    targets[torch.rand(rows, length) < ignore_fraction] = -100
    return hidden, weight, targets


def rollouts(targets):
    return dict(
        advantages=torch.randn(targets.shape[0]),
        old_logp=-torch.rand(targets.shape) * 3,
        loss_mask=(torch.rand(targets.shape) > 0.2).long(),
    )


# Every objective the engine runs with its gradient in the forward, with its optional terms on.
SEPARABLE = {
    "cross_entropy": lambda h, w, t, **k: fused_hybrid.linear_cross_entropy(
        h, w, t, label_smoothing=0.1, z_loss=1e-3, **k
    ),
    "dft": lambda h, w, t, **k: fused_hybrid.dft_loss(h, w, t, **k).loss,
    "grpo": lambda h, w, t, **k: (
        fused_hybrid.grpo_loss(
            h,
            w,
            t,
            **rollouts(t),
            ref_logp=-torch.rand(t.shape),
            beta=0.1,
            entropy_coef=0.01,
            aggregation="seq-mean-token-mean",
            **k,
        ).loss
    ),
    "cispo": lambda h, w, t, **k: fused_hybrid.cispo_loss(h, w, t, **rollouts(t), **k).loss,
    "chord": lambda h, w, t, **k: (
        fused_hybrid.chord_loss(
            h, w, t, **rollouts(t), mu=0.3, use_phi=True, is_expert=torch.arange(t.shape[0]) % 3 == 0, **k
        ).loss
    ),
    "ift": lambda h, w, t, **k: fused_hybrid.ift_loss(h, w, t, gamma=0.9, **k).loss,
}


def test_chunk_rows_fill_the_workspace_evenly():
    per_logit = torch_epilogue.bytes_per_logit(torch.float32)
    vocab = 128256
    budget = 1 << 30
    most = budget // (vocab * per_logit)
    for tokens in (1, 100, most, most + 1, 5 * most + 3, 100_000):
        rows = chunk_rows(tokens, vocab, per_logit, budget)
        assert 1 <= rows <= most and rows * vocab * per_logit <= budget
        chunks = -(-tokens // rows)
        assert chunks == -(-tokens // most)  # no more chunks than the budget needs
        if rows > GEMM_ROW_MULTIPLE and rows < most:
            assert rows % GEMM_ROW_MULTIPLE == 0 or (rows + GEMM_ROW_MULTIPLE - rows % GEMM_ROW_MULTIPLE) > most
    assert chunk_rows(0, vocab, per_logit, budget) >= 1


# Objectives that are sums of per-sequence (or per-pair) terms: chunks hold whole sequences (pairs).
GROUPED = {
    "gspo": lambda h, w, t, **k: (
        fused_hybrid.grpo_loss(
            h, w, t, **rollouts(t), importance_sampling="sequence", aggregation="seq-mean-token-mean", **k
        ).loss
    ),
    "gmpo": lambda h, w, t, **k: fused_hybrid.gmpo_loss(h, w, t, **rollouts(t), **k).loss,
    "minor_sft": lambda h, w, t, **k: fused_hybrid.minor_sft_loss(h, w, t, ref_logp=-torch.rand(t.shape), **k).loss,
    "dpo_sigmoid": lambda h, w, t, **k: (
        fused_hybrid.dpo_loss(h, w, t, ref_logp=-torch.rand(t.shape), nll_weight=0.3, **k).loss
    ),
    "dpo_ipo": lambda h, w, t, **k: (
        fused_hybrid.dpo_loss(h, w, t, ref_logp=-torch.rand(t.shape), loss_type="ipo", **k).loss
    ),
    "simpo": lambda h, w, t, **k: fused_hybrid.dpo_loss(h, w, t, loss_type="simpo", **k).loss,
}


def engine_against_two_passes(loss_fn, monkeypatch, hidden, weight, targets) -> tuple[dict, list]:
    """Run `loss_fn` on the chunked engine and on the two-pass path with the same inputs; assert the same loss and
    gradients; return the engine's call counts and the token rows of each chunk."""
    seed = torch.seed()
    torch.manual_seed(seed)
    two_pass = loss_fn(hidden, weight, targets, backend="torch")
    expected = grads(two_pass, [hidden, weight])

    calls = {"statistics": 0, "gradients": 0, "recomputed": 0, "fused": 0}
    chunks = []
    real_statistics, real_gradient = torch_epilogue.statistics, torch_epilogue.gradient
    real_sweep, real_plan = chunked.statistics_and_gradients, chunked.plan_chunks

    def statistics(logits, *args):
        calls["statistics"] += 1
        return real_statistics(logits, *args)

    def gradient(logits, state, *args):
        calls["gradients"] += 1
        calls["recomputed"] += state is None
        return real_gradient(logits, state, *args)

    def plan(valid, *args):
        planned = real_plan(valid, *args)
        chunks.append((valid, planned))
        return planned

    monkeypatch.setattr(torch_epilogue, "statistics", statistics)
    monkeypatch.setattr(torch_epilogue, "gradient", gradient)
    monkeypatch.setattr(chunked, "plan_chunks", plan)
    monkeypatch.setattr(
        chunked,
        "statistics_and_gradients",
        lambda *a, **k: calls.__setitem__("fused", calls["fused"] + 1) or real_sweep(*a, **k),
    )
    monkeypatch.setattr(chunked, "backward", lambda *a, **k: pytest.fail("the chunked engine recomputed logits"))
    torch.manual_seed(seed)  # the same rollout inputs
    fused = loss_fn(hidden, weight, targets, backend="chunked")
    got = grads(fused, [hidden, weight])
    assert_close_scaled(fused, two_pass.detach(), 1e-6, "loss", atol=1e-7)
    for label, a, b in zip(("d_hidden", "d_weight"), got, expected):
        assert_close_scaled(a, b, 1e-5, label, atol=1e-7)
    return calls, chunks


@pytest.mark.parametrize("name", list(SEPARABLE))
def test_gradient_in_forward_matches_two_passes(name, monkeypatch):
    calls, _ = engine_against_two_passes(SEPARABLE[name], monkeypatch, *batch())
    # one sweep of several chunks (5 rows each in the tests), each chunk's logits formed once and used for both
    assert calls["fused"] == 1 and calls["recomputed"] == 0
    assert calls["statistics"] == calls["gradients"] >= 2


@pytest.mark.parametrize("name", list(GROUPED))
def test_sequence_level_objectives_take_whole_sequences_per_chunk(name, monkeypatch):
    hidden, weight, targets = batch(rows=6, length=9)
    calls, chunks = engine_against_two_passes(GROUPED[name], monkeypatch, hidden, weight, targets)
    assert calls["fused"] == 1 and calls["recomputed"] == 0 and calls["statistics"] == calls["gradients"] >= 2
    groups = torch.arange(6).repeat_interleave(9)
    if name.startswith(("dpo", "simpo")):
        groups = groups % 3  # pair i: sequences i and i + 3
    ((loss_tokens, plan),) = chunks
    for rows in plan:  # every group a chunk touches has all its loss tokens there
        for group in groups[rows].unique():
            assert set(rows.tolist()) >= set(((groups == group) & loss_tokens).nonzero().squeeze(1).tolist())


def test_a_sequence_larger_than_the_workspace_takes_two_passes(monkeypatch):
    hidden, weight, targets = batch(rows=4, length=9, ignore_fraction=0.0)
    inputs = dict(rollouts(targets), loss_mask=torch.ones_like(targets))
    budget = 8 * V * torch_epilogue.bytes_per_logit(torch.float32)  # 8 rows: less than one sequence of 9
    recomputes = []
    real_backward = chunked.backward
    monkeypatch.setattr(chunked, "backward", lambda *a, **k: recomputes.append(1) or real_backward(*a, **k))
    loss = fused_hybrid.gmpo_loss(hidden, weight, targets, **inputs, backend="chunked", workspace_bytes=budget).loss
    got = grads(loss, [hidden, weight])
    expected = grads(
        fused_hybrid.gmpo_loss(hidden, weight, targets, **inputs, backend="reference").loss, [hidden, weight]
    )
    assert recomputes == [1]  # the two-pass path's backward
    for label, a, b in zip(("d_hidden", "d_weight"), got, expected):
        assert_close_scaled(a, b, 1e-5, label, atol=1e-7)


def test_grad_output_scales_the_precomputed_gradients():
    hidden, weight, targets = batch()
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend="chunked")
    once = torch.autograd.grad(loss, [hidden, weight], retain_graph=True)
    thrice = torch.autograd.grad(3.0 * loss, [hidden, weight])
    for a, b in zip(once, thrice):
        torch.testing.assert_close(3.0 * a, b)


def test_ignored_tokens_never_reach_a_gemm(monkeypatch):
    hidden, weight, targets = batch(ignore_fraction=0.6)
    rows = []
    real = torch_epilogue.statistics
    monkeypatch.setattr(
        torch_epilogue, "statistics", lambda logits, *a: rows.append(logits.shape[0]) or real(logits, *a)
    )
    fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend="chunked").backward()
    assert sum(rows) == int((targets != -100).sum())
    ignored = (targets == -100).reshape(-1)
    assert (hidden.grad.reshape(-1, D)[ignored] == 0).all()


def test_forward_and_recompute_see_bit_identical_logits(monkeypatch):
    hidden, weight, targets = batch()
    seen = {"forward": [], "backward": []}
    real_statistics, real_gradient = torch_epilogue.statistics, torch_epilogue.gradient

    def statistics(logits, *args):
        seen["forward"].append(logits.clone())
        return real_statistics(logits, *args)

    def gradient(logits, state, *args):
        seen["backward"].append(logits.clone())
        return real_gradient(logits, state, *args)

    monkeypatch.setattr(torch_epilogue, "statistics", statistics)
    monkeypatch.setattr(torch_epilogue, "gradient", gradient)
    logp = fused_hybrid.linear_logprobs(hidden, weight, targets, backend="torch")
    (logp * torch.randn(logp.shape)).sum().backward()
    assert len(seen["forward"]) == len(seen["backward"]) > 1
    for a, b in zip(seen["forward"], seen["backward"]):
        assert torch.equal(a, b)


def test_a_chunk_never_exceeds_the_workspace(monkeypatch):
    monkeypatch.setattr(chunked, "chunk_rows", chunk_rows)  # the real sizing, not the suite's 5-row cap
    hidden, weight, targets = batch(rows=8, length=16, ignore_fraction=0.0)
    budget = 7 * V * torch_epilogue.bytes_per_logit(torch.float32)
    sizes = []
    real = torch_epilogue.statistics
    monkeypatch.setattr(
        torch_epilogue, "statistics", lambda logits, *a: sizes.append(logits.numel()) or real(logits, *a)
    )
    fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend="chunked", workspace_bytes=budget).backward()
    assert max(sizes) * torch_epilogue.bytes_per_logit(torch.float32) <= budget and len(sizes) >= 128 // 7


def test_default_chunk_is_the_devices(monkeypatch):
    """On the CPU 512-row chunks, at most 256 MiB (a 128k vocabulary); on CUDA at most 1 GiB; an explicit budget
    wins."""
    from fused_hybrid.engine.core import default_chunk_bytes, default_workspace_bytes

    per_logit = torch_epilogue.bytes_per_logit(torch.float32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_workspace_bytes(cpu) == 256 << 20 and default_workspace_bytes(cuda) == 1 << 30
    assert default_chunk_bytes(cpu, 8192, per_logit) == 512 * 8192 * per_logit
    assert default_chunk_bytes(cpu, 128256, per_logit) == 256 << 20
    assert default_chunk_bytes(cuda, 8192, per_logit) == 1 << 30
    budgets = []
    real = chunked.plan_chunks
    monkeypatch.setattr(
        chunked,
        "plan_chunks",
        lambda valid, v, b, workspace, *a: budgets.append(workspace) or real(valid, v, b, workspace, *a),
    )
    hidden, weight, targets = batch()
    fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend="chunked").backward()
    fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend="chunked", workspace_bytes=12345).backward()
    assert budgets == [512 * weight.shape[0] * per_logit, 12345]


def test_inputs_that_require_grad_keep_the_two_pass_path():
    hidden, weight, targets = batch()
    inputs = rollouts(targets)
    advantages = inputs.pop("advantages").requires_grad_()
    loss = fused_hybrid.cispo_loss(hidden, weight, targets, advantages=advantages, backend="chunked", **inputs).loss
    loss.backward()
    assert advantages.grad is not None and advantages.grad.abs().sum() > 0


def test_bad_input_fails_before_any_gemm(monkeypatch):
    hidden, weight, targets = batch()
    monkeypatch.setattr(chunked, "statistics_and_gradients", lambda *a, **k: pytest.fail("a GEMM ran"))
    with pytest.raises(ValueError, match="advantages"):
        fused_hybrid.grpo_loss(hidden, weight, targets, advantages=torch.randn(5), backend="chunked")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", [HeadSpec(), HeadSpec(temperature=0.7, softcap=2.5)])
def test_triton_epilogue_matches_pytorch(dtype, head):
    from fused_hybrid.kernels import logit_epilogue

    rows, vocab = 7, 70
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    bias = torch.randn(vocab).to(dtype)
    targets = torch.randint(-1, vocab, (rows,))
    want, state = torch_epilogue.statistics(logits.clone(), targets, bias, head)
    got, _ = logit_epilogue.statistics(logits.clone(), targets, bias, head)
    for name, a, b in zip(want._fields, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    want_extras = torch_epilogue.extras(logits, state, targets, bias, head, want.max)
    got_extras = logit_epilogue.extras(logits.clone(), None, targets, bias, head, want.max)
    for name, a, b in zip(want_extras._fields, got_extras, want_extras):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    z64 = transform_reference(logits, bias, head)
    row_max = z64.amax(-1)
    norm = SoftmaxNorm(row_max.float(), torch.log(torch.exp(z64 - row_max[:, None]).sum(-1)).float())
    upstream = tuple(torch.randn(rows) for _ in range(4))
    coefs = token_grad_coefficients(upstream, torch.rand(rows), torch.ones(rows, dtype=torch.bool))
    want = torch_epilogue.gradient(logits.clone(), None, targets, bias, norm, coefs, head)
    buffer = logits.clone()
    got = logit_epilogue.gradient(buffer, None, targets, bias, norm, coefs, head)
    assert got.data_ptr() == buffer.data_ptr() and got.dtype == dtype  # dz written over the logits
    torch.testing.assert_close(
        got.float(),
        want.to(dtype).float(),
        rtol=1e-2 if dtype != torch.float32 else 1e-5,
        atol=1e-2 if dtype != torch.float32 else 4e-6,
    )


def transform_reference(logits, bias, head):
    z = (logits.double() + bias.double()) / head.temperature
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)
