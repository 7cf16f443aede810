"""linear_logprobs (+ entropy) against a float64 full-logits reference, on every backend."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from fused_hybrid.engine import chunked
from fused_hybrid.engine.backends import logits_free_backend
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64

BACKENDS = ["chunked", "torch", "triton", "reference"]
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_inputs(n_shape, dim, vocab, dtype, *, bias=False, ignore_fraction=0.25, scale=1.0):
    hidden = torch.randn(*n_shape, dim).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim) * scale / dim**0.5).to(dtype).requires_grad_()
    bias_t = (torch.randn(vocab) * 0.5).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, n_shape)
    targets[torch.rand(n_shape) < ignore_fraction] = -100
    return hidden, weight, targets, bias_t


def check_against_reference(hidden, weight, targets, bias, dtype, backend, **options):
    g_logp = torch.randn(targets.shape)
    g_entropy = torch.randn(targets.shape)
    logp, entropy = fused_hybrid.linear_logprobs(
        hidden, weight, targets, bias, return_entropy=True, backend=backend, **options
    )
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    inputs = [hidden, weight, bias]
    actual = grads((logp * g_logp + entropy * g_entropy).sum(), inputs)

    inputs64 = [leaf64(t) for t in inputs]
    transform = {k: v for k, v in options.items() if k != "workspace_bytes"}
    logp64, entropy64 = logprobs_entropy64(inputs64[0], inputs64[1], targets, inputs64[2], **transform)
    expected = grads((logp64 * g_logp.double() + entropy64 * g_entropy.double()).sum(), inputs64)

    rel = REL_TOL[dtype]
    # log-probs and entropies are O(log V): compare them on an absolute scale of 1 (dtype-relative).
    assert (logp.double() - logp64).abs().max() <= rel * max(1.0, logp64.abs().max()), "logp"
    assert (entropy.double() - entropy64).abs().max() <= rel * max(1.0, entropy64.abs().max()), "entropy"
    ignored = targets == options.get("ignore_index", -100)
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), actual, expected):
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == dtype and got.shape == want.shape, name
            assert_close_scaled(got, want, rel, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n_shape, dim, vocab",
    [((37,), 24, 100), ((3, 11), 20, 67), ((5,), 40, 33)],  # V not a tile multiple, D not a power of two
)
def test_fp32_matches_reference(backend, n_shape, dim, vocab):
    inputs = make_inputs(n_shape, dim, vocab, torch.float32)
    check_against_reference(*inputs, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [0, 5])  # a token id, as pipelines that ignore the pad id use
def test_an_ignore_index_that_is_a_token_id(backend, ignore_index):
    hidden, weight, targets, bias = make_inputs((31,), 24, 70, torch.float32, bias=True)
    targets[targets == -100] = ignore_index
    check_against_reference(hidden, weight, targets, bias, torch.float32, backend, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7),
        dict(softcap=4.0),
        dict(softcap=2.5, temperature=1.6),
    ],
)
def test_logit_transform_and_bias(backend, options):
    inputs = make_inputs((29,), 24, 70, torch.float32, bias=True, scale=4.0)
    check_against_reference(*inputs, torch.float32, backend, **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    inputs = make_inputs((33,), 48, 90, dtype, bias=True, scale=3.0)
    check_against_reference(*inputs, dtype, backend, softcap=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_gives_zeros_and_zero_grads(backend):
    hidden, weight, targets, bias = make_inputs((9,), 16, 40, torch.float32, bias=True)
    targets.fill_(-100)
    logp, entropy = fused_hybrid.linear_logprobs(hidden, weight, targets, bias, return_entropy=True, backend=backend)
    assert (logp == 0).all() and (entropy == 0).all()
    d_hidden, d_weight, d_bias = grads((logp * torch.randn(9) + entropy * torch.randn(9)).sum(), [hidden, weight, bias])
    for g in (d_hidden, d_weight, d_bias):
        assert torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_grad_and_no_work(backend, frozen, monkeypatch):
    hidden, weight, targets, _ = make_inputs((21,), 24, 50, torch.float32)
    (hidden if frozen == "hidden" else weight).requires_grad_(False)
    impl = (
        logits_free_backend("torch")
        if backend == "torch"
        else (pytest.importorskip("triton") and logits_free_backend("triton"))
    )
    seen_needs = []
    original = impl.backward

    def recording_backward(*args, needs, **kwargs):
        seen_needs.append(needs)
        return original(*args, needs=needs, **kwargs)

    monkeypatch.setattr(impl, "backward", recording_backward)
    check_against_reference(hidden, weight, targets, None, torch.float32, backend)
    assert seen_needs == [(frozen != "hidden", frozen != "weight", False)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_through_one_output_only(backend):
    hidden, weight, targets, _ = make_inputs((17,), 16, 45, torch.float32)
    entropy = fused_hybrid.linear_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)[1]
    actual = grads(entropy.sum(), [hidden, weight])
    h64, w64 = leaf64(hidden), leaf64(weight)
    expected = grads(logprobs_entropy64(h64, w64, targets)[1].sum(), [h64, w64])
    for got, want, name in zip(actual, expected, ("d_hidden", "d_weight")):
        assert_close_scaled(got, want, 2e-5, name)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_a_small_workspace_matches_reference(backend):
    # 3 tokens per chunk: the PyTorch epilogue holds 16 bytes per fp32 logit
    inputs = make_inputs((20,), 16, 50, torch.float32, bias=True)
    check_against_reference(*inputs, torch.float32, backend, softcap=3.0, workspace_bytes=3 * 50 * 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend):
    hidden = torch.randn(24, 19).T.requires_grad_()  # [19, 24] with strides (1, 19)
    weight_t = (torch.randn(24, 55) / 5).requires_grad_()
    targets = torch.randint(0, 55, (19, 2))[:, 0]  # stride 2
    check_against_reference(hidden, weight_t.T, targets, None, torch.float32, backend)


def test_gradcheck_torch_backend_fp64():
    hidden = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 2])

    def fn(h, w, b):
        return fused_hybrid.linear_logprobs(
            h, w, targets, b, softcap=2.0, temperature=0.8, return_entropy=True, backend="torch"
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_auto_backend_on_cpu_is_the_chunked_engine(monkeypatch):
    calls = []
    original = chunked.partials
    monkeypatch.setattr(chunked, "partials", lambda *a: calls.append(1) or original(*a))
    hidden, weight, targets, _ = make_inputs((4,), 8, 10, torch.float32)
    fused_hybrid.linear_logprobs(hidden, weight, targets)
    assert calls == [1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unused_statistics_cost_no_backward_work(backend, monkeypatch):
    impl = (
        logits_free_backend("torch")
        if backend == "torch"
        else (pytest.importorskip("triton") and logits_free_backend("triton"))
    )
    seen = []
    original = impl.backward

    def recording_backward(hidden, weight, targets, bias, lse, coefs, *args, **kwargs):
        seen.append((coefs.logp_coef, coefs.uniform_coef))
        return original(hidden, weight, targets, bias, lse, coefs, *args, **kwargs)

    monkeypatch.setattr(impl, "backward", recording_backward)
    hidden, weight, targets, _ = make_inputs((9,), 8, 20, torch.float32)
    fused_hybrid.linear_logprobs(hidden, weight, targets, backend=backend).sum().backward()
    assert seen == [(None, None)]  # no entropy and no sum-of-logits terms when only logp is used


def test_fp32_dots_follow_pytorch_matmul_precision(monkeypatch):
    """fp32 inputs take TF32 tensor cores exactly when PyTorch's own matmuls would; the precision flag means
    nothing for half-precision inputs and is not passed."""
    from fused_hybrid.kernels import token_statistics_forward as forward_pass

    seen = []
    kernel = forward_pass.token_statistics_forward_kernel

    class RecordingLaunch:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["DOT_PRECISION"])
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(forward_pass, "token_statistics_forward_kernel", RecordingLaunch())
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (5,))
    previous = torch.get_float32_matmul_precision()
    try:
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            fused_hybrid.linear_logprobs(hidden, weight, targets, backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    fused_hybrid.linear_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, backend="triton")
    assert seen == ["ieee", "tf32", "tf32", None]
