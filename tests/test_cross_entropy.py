"""linear_cross_entropy / FusedLinearCrossEntropyLoss against F.cross_entropy on float64 full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_hybrid
from tests.reference import assert_close_scaled, grads, leaf64, logits64

BACKENDS = ["chunked", "torch", "triton", "reference"]


def reference_ce64(
    hidden,
    weight,
    targets,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    num_items=None,
):
    z = logits64(hidden, weight, bias, temperature=temperature, softcap=softcap)
    flat_z, flat_y = z.reshape(-1, z.shape[-1]), targets.reshape(-1)
    per_token = F.cross_entropy(
        flat_z, flat_y, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = flat_y != ignore_index
    per_token = per_token + z_loss * torch.where(valid, torch.logsumexp(flat_z, -1), 0.0) ** 2
    if reduction == "none":
        return per_token.reshape(targets.shape)
    if reduction == "sum":
        return per_token.sum()
    denominator = valid.sum() if num_items is None else num_items
    return per_token.sum() / max(int(denominator), 1)


def inputs(n_shape=(31,), dim=24, vocab=77, dtype=torch.float32, bias=True, ignore_index=-100):
    hidden = torch.randn(*n_shape, dim).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim) * 2 / dim**0.5).to(dtype).requires_grad_()
    bias_t = (torch.randn(vocab) * 0.3).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, n_shape)
    targets[torch.rand(n_shape) < 0.3] = ignore_index
    return hidden, weight, targets, bias_t


def check_ce(backend, dtype=torch.float32, rel=2e-5, n_shape=(31,), **options):
    hidden, weight, targets, bias = inputs(n_shape, dtype=dtype, ignore_index=options.get("ignore_index", -100))
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, bias, backend=backend, **options)
    upstream = torch.randn(loss.shape)
    actual = grads((loss * upstream).sum(), [hidden, weight, bias])

    leaves = [leaf64(t) for t in (hidden, weight, bias)]
    expected_loss = reference_ce64(leaves[0], leaves[1], targets, leaves[2], **options)
    expected = grads((expected_loss * upstream.double()).sum(), leaves)

    assert loss.shape == expected_loss.shape
    assert_close_scaled(loss, expected_loss, rel, "loss")
    for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), actual, expected):
        assert_close_scaled(got, want, rel, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction):
    check_ce(backend, reduction=reduction, n_shape=(3, 9))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "options",
    [
        dict(label_smoothing=0.1),
        dict(z_loss=1e-3),
        dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0, temperature=0.9),
        dict(num_items=100),
        dict(ignore_index=3),
    ],
)
def test_options(backend, options):
    check_ce(backend, **options)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype):
    check_ce(backend, dtype=dtype, rel=3e-2 if dtype == torch.bfloat16 else 5e-3, label_smoothing=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_is_zero_not_nan(backend, reduction):
    hidden, weight, targets, bias = inputs()
    targets.fill_(-100)
    loss = fused_hybrid.linear_cross_entropy(
        hidden, weight, targets, bias, reduction=reduction, z_loss=1e-3, label_smoothing=0.1, backend=backend
    )
    assert loss.item() == 0.0
    for g in grads(loss, [hidden, weight, bias]):
        assert torch.isfinite(g).all() and (g == 0).all()


def test_micro_batches_with_num_items_equal_full_batch():
    hidden, weight, targets, bias = inputs(n_shape=(40,))
    full = fused_hybrid.linear_cross_entropy(hidden, weight, targets, bias)
    full_grads = grads(full, [hidden, weight, bias])

    num_items = torch.tensor((targets != -100).sum().item())
    accumulated = sum(
        fused_hybrid.linear_cross_entropy(hidden[part], weight, targets[part], bias, num_items=num_items)
        for part in (slice(0, 13), slice(13, 29), slice(29, 40))
    )
    accumulated_grads = grads(accumulated, [hidden, weight, bias])
    assert_close_scaled(accumulated, full, 1e-6, "loss")
    for got, want in zip(accumulated_grads, full_grads):
        assert_close_scaled(got, want, 1e-5)


def test_module_matches_function():
    hidden, weight, targets, bias = inputs()
    loss_fn = fused_hybrid.FusedLinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4, softcap=8.0)
    expected = fused_hybrid.linear_cross_entropy(
        hidden, weight, targets, bias, label_smoothing=0.1, z_loss=1e-4, softcap=8.0
    )
    assert torch.equal(loss_fn(hidden, weight, targets, bias), expected)
    assert "label_smoothing=0.1" in repr(loss_fn)


def test_gradcheck_torch_backend_fp64_with_smoothing_and_z_loss():
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, -100, 8, 0, 4, 4])

    def fn(h, w, b):
        return fused_hybrid.linear_cross_entropy(
            h,
            w,
            targets,
            b,
            label_smoothing=0.3,
            z_loss=0.05,
            softcap=3.0,
            temperature=1.3,
            reduction="none",
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
