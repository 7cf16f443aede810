"""fused_hybrid.distill_loss against float64 formulas written from the definitions (docs/objectives.md,
"Distillation"): every beta and temperature, both heads' transforms, teachers of another width, a top-k teacher,
on the PyTorch epilogue, the Triton epilogue (the interpreter on the CPU) and the naive reference; ignored tokens,
accumulation, no teacher gradient, and bad input named before any kernel."""

from __future__ import annotations

import math

import pytest
import torch

import fused_hybrid
from fused_hybrid import DistillLoss, HeadSpec, distill_loss
from fused_hybrid.engine import backends, divergence
from tests.reference import assert_close_scaled, grads

BETAS = (0.0, 1.0, 0.5, 0.1)


def transformed64(hidden, weight, bias, *, scale_temperature=1.0, softcap=None, temperature=1.0):
    """softcap((h W^T + b) / tau) / T in float64, tau the head's own temperature, T the distillation's."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / scale_temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def divergence64(zs, zt, beta):
    """The per-token divergence of TRL's convention, from the probabilities themselves."""
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    if beta == 0.0:
        return (pt * (pt.log() - ps.log())).sum(-1)
    if beta == 1.0:
        return (ps * (ps.log() - pt.log())).sum(-1)
    m = (1 - beta) * ps + beta * pt
    return beta * (pt * (pt.log() - m.log())).sum(-1) + (1 - beta) * (ps * (ps.log() - m.log())).sum(-1)


def loss64(zs, per_token_divergence, targets, hard_weight, count=None):
    valid = targets != -100
    cross_entropy = -torch.log_softmax(zs, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    per_token = torch.where(valid, per_token_divergence + hard_weight * cross_entropy, 0.0)
    return per_token.sum() / (valid.sum() if count is None else count)


@pytest.fixture
def triton_epilogue(monkeypatch):
    """The divergence engine with the Triton epilogue (the interpreter on the CPU)."""
    from fused_hybrid.kernels import divergence_epilogue

    monkeypatch.setattr(divergence, "default_divergence_epilogue", lambda hidden, teacher: divergence_epilogue)


ENGINES = ("torch", "triton-epilogue", "reference")


def _run_options(engine, request):
    if engine == "triton-epilogue":
        request.getfixturevalue("triton_epilogue")
        return dict(backend="chunked")
    return dict(backend=engine)


def _problem(n=23, d=12, d_teacher=20, v=67, dtype=torch.float32):
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, dtype=dtype) / 2).requires_grad_()
    bias = (torch.randn(v, dtype=dtype) * 0.3).requires_grad_()
    teacher_hidden = torch.randn(n, d_teacher, dtype=dtype)
    teacher_weight = torch.randn(v, d_teacher, dtype=dtype) / 2
    teacher_bias = torch.randn(v, dtype=dtype) * 0.3
    targets = torch.randint(0, v, (n,))
    targets[torch.rand(n) < 0.25] = -100
    return hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_matches_float64_formula(beta, temperature, engine, request):
    """Student bias, softcap and head temperature; a wider teacher with its own softcap, logit scale and bias."""
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets = _problem()
    student, teacher = dict(scale_temperature=1.3, softcap=4.0), dict(scale_temperature=0.7, softcap=6.0)
    out = distill_loss(
        hidden,
        weight,
        targets,
        bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        beta=beta,
        temperature=temperature,
        hard_weight=0.4,
        teacher_head=HeadSpec(temperature=teacher["scale_temperature"], softcap=teacher["softcap"]),
        head=HeadSpec(temperature=student["scale_temperature"], softcap=student["softcap"]),
        **_run_options(engine, request),
    )
    zs = transformed64(hidden, weight, bias, temperature=temperature, **student)
    zt = transformed64(teacher_hidden, teacher_weight, teacher_bias, temperature=temperature, **teacher)
    expected = loss64(zs, divergence64(zs, zt, beta), targets, 0.4)
    assert_close_scaled(out.loss, expected, 2e-6, "loss")
    for name, got, want in zip(
        ("d_hidden", "d_weight", "d_bias"),
        grads(out.loss, [hidden, weight, bias]),
        grads(expected, [hidden, weight, bias]),
    ):
        assert_close_scaled(got, want, 2e-5, name)
    valid = targets != -100
    ps = torch.softmax(zs, -1)
    assert_close_scaled(out.metrics["divergence"], divergence64(zs, zt, beta)[valid].mean(), 2e-6, "divergence")
    assert_close_scaled(out.metrics["student_entropy"], -(ps * ps.log()).sum(-1)[valid].mean(), 2e-6, "entropy")


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_float64_inputs_on_the_pytorch_epilogue_are_exact(beta):
    hidden, weight, bias, teacher_hidden, teacher_weight, _, targets = _problem(dtype=torch.float64)
    out = distill_loss(
        hidden,
        weight,
        targets,
        bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        beta=beta,
        temperature=1.5,
        hard_weight=0.2,
        backend="torch",
    )
    zs = transformed64(hidden, weight, bias, temperature=1.5)
    zt = transformed64(teacher_hidden, teacher_weight, None, temperature=1.5)
    expected = loss64(zs, divergence64(zs, zt, beta), targets, 0.2)
    assert_close_scaled(out.loss, expected, 1e-12, "loss")
    for got, want in zip(grads(out.loss, [hidden, weight, bias]), grads(expected, [hidden, weight, bias])):
        assert_close_scaled(got, want, 1e-11, "gradient")


def topk_loss64(zs, ids, teacher_logp, targets, hard_weight):
    """Forward KL over the k ids plus the tail bucket, from the student's float64 probabilities; no bucket when the
    ids cover the vocabulary (docs/objectives.md, "Distillation", top-k)."""
    ps = torch.softmax(zs, -1)
    pt_k, ps_k = teacher_logp.double().exp(), ps.gather(-1, ids)
    per_token = (pt_k * (pt_k.log() - ps_k.log())).sum(-1)
    if ids.shape[-1] < zs.shape[-1]:
        teacher_tail, student_tail = 1 - pt_k.sum(-1), 1 - ps_k.sum(-1)
        per_token = per_token + teacher_tail * (teacher_tail.log() - student_tail.log())
    return loss64(zs, per_token, targets, hard_weight)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5])
def test_topk_teacher_matches_float64_formula(k, temperature, backend):
    hidden, weight, bias, _, _, _, targets = _problem()
    teacher_logp = torch.log_softmax(torch.randn(hidden.shape[0], weight.shape[0]) * 2, -1)
    top = teacher_logp.topk(k, -1)
    out = distill_loss(
        hidden,
        weight,
        targets,
        bias,
        teacher_topk_ids=top.indices,
        teacher_topk_logp=top.values,
        temperature=temperature,
        hard_weight=0.3,
        softcap=5.0,
        backend=backend,
    )
    zs = transformed64(hidden, weight, bias, softcap=5.0, temperature=temperature)
    expected = topk_loss64(zs, top.indices, top.values, targets, 0.3)
    assert_close_scaled(out.loss, expected, 2e-6, "loss")
    for got, want in zip(grads(out.loss, [hidden, weight, bias]), grads(expected, [hidden, weight, bias])):
        assert_close_scaled(got, want, 2e-5, "gradient")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("mass", [1.0, 0.99])
def test_topk_of_every_id_is_differentiated_as_given(mass, backend):
    """k = V: no tail bucket, the loss sum_v p_t (log p_t - log p_s) of the teacher's log-probs as given (a mass
    below 1 too), and its gradient P_t p_s - p_t: finite on every backend, equal to float64 autograd's."""
    hidden, weight, bias, _, _, _, targets = _problem()
    v = weight.shape[0]
    teacher_logp = torch.log_softmax(torch.randn(hidden.shape[0], v) * 2, -1) + math.log(mass)
    ids = torch.argsort(torch.rand(hidden.shape[0], v), -1)  # every id, in a random order
    out = distill_loss(
        hidden,
        weight,
        targets,
        bias,
        teacher_topk_ids=ids,
        teacher_topk_logp=teacher_logp.gather(-1, ids),
        temperature=1.5,
        backend=backend,
    )
    zs = transformed64(hidden, weight, bias, temperature=1.5)
    expected = topk_loss64(zs, ids, teacher_logp.gather(-1, ids), targets, 0.0)
    assert_close_scaled(out.loss, expected, 2e-6, "loss")
    for name, got, want in zip(
        ("d_hidden", "d_weight", "d_bias"),
        grads(out.loss, [hidden, weight, bias]),
        grads(expected, [hidden, weight, bias]),
    ):
        assert_close_scaled(got, want, 2e-5, name)


def test_topk_of_the_whole_vocabulary_is_the_forward_kl_of_the_teacher_head():
    hidden, weight, _, teacher_hidden, teacher_weight, _, targets = _problem()
    teacher_logp = torch.log_softmax(teacher_hidden @ teacher_weight.T, -1)
    ids = torch.argsort(torch.rand_like(teacher_logp), -1)  # every id, in a random order
    topk = distill_loss(hidden, weight, targets, teacher_topk_ids=ids, teacher_topk_logp=teacher_logp.gather(-1, ids))
    head = distill_loss(hidden, weight, targets, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    assert_close_scaled(topk.loss, head.loss, 1e-5, "loss")
    for got, want in zip(grads(topk.loss, [hidden, weight]), grads(head.loss, [hidden, weight])):
        assert_close_scaled(got, want, 1e-4, "gradient")


def _naive_and_our_errors(hidden, weight, bias, targets, inputs, want, run_options, *, relative_norm=False):
    """The errors of (loss, d_hidden, d_weight) against `want`, naive PyTorch's and ours: max |error|, or with
    `relative_norm` ||error|| / ||want||."""

    def error(got, expected):
        if relative_norm:
            return ((got.double() - expected).norm() / expected.norm()).item()
        return (got.double() - expected).abs().max().item()

    def errors(out):
        got = [out.loss, *grads(out.loss, [hidden, weight])]
        return [error(g, w) for g, w in zip(got, want)]

    naive = errors(distill_loss(hidden, weight, targets, bias, **inputs, backend="reference"))
    return naive, errors(distill_loss(hidden, weight, targets, bias, **inputs, **run_options))


@pytest.mark.chunk_rows(None)  # the engine's own chunks: a BLAS may sum a GEMM of a few rows less accurately (conftest)
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("engine", ["torch", "triton-epilogue"])
def test_as_accurate_as_naive_fp32(beta, engine, request):
    """fp32 inputs, a vocabulary large enough for rounding to show: our error against float64 stays within a small
    multiple of naive PyTorch's (full logits, log_softmax, autograd) at the same precision."""
    hidden, weight, bias, teacher_hidden, teacher_weight, _, targets = _problem(n=12, d=32, d_teacher=48, v=4096)
    hidden.data *= 3  # confident rows: large logits, small divergences
    inputs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, beta=beta)

    zs = transformed64(hidden, weight, bias)
    expected = loss64(zs, divergence64(zs, transformed64(teacher_hidden, teacher_weight, None), beta), targets, 0)
    want = [expected, *grads(expected, [hidden, weight])]
    naive, ours = _naive_and_our_errors(hidden, weight, bias, targets, inputs, want, _run_options(engine, request))
    for name, our_error, naive_error, exact in zip(("loss", "d_hidden", "d_weight"), ours, naive, want):
        # a few ulps of the result's scale: a single rounding of either side moves a scalar loss that much
        ulps = 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()
        assert our_error <= 3 * naive_error + ulps, f"{name}: {our_error:.2e} vs naive {naive_error:.2e}"


def test_ignored_and_all_ignored_tokens():
    hidden, weight, bias, teacher_hidden, teacher_weight, _, targets = _problem()
    inputs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, beta=0.5, hard_weight=1.0)
    loss_mask = torch.rand(targets.shape) < 0.6
    masked = distill_loss(hidden, weight, targets, bias, loss_mask=loss_mask, **inputs)
    kept = torch.where(loss_mask, targets, -100)
    assert_close_scaled(masked.loss, distill_loss(hidden, weight, kept, bias, **inputs).loss, 1e-6, "loss_mask")
    none = distill_loss(hidden, weight, torch.full_like(targets, -100), bias, **inputs)
    assert none.loss.item() == 0.0 and all(value.item() == 0.0 for value in none.metrics.values())
    for gradient in grads(none.loss, [hidden, weight, bias]):
        assert torch.equal(gradient, torch.zeros_like(gradient))


def test_accumulated_micro_batches_equal_the_full_batch():
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets = _problem(n=30)
    inputs = dict(teacher_weight=teacher_weight, teacher_bias=teacher_bias, beta=0.1, temperature=2.0, hard_weight=0.5)
    full = distill_loss(hidden, weight, targets, bias, teacher_hidden=teacher_hidden, **inputs)
    full_grads = grads(full.loss, [hidden, weight, bias])
    count = (targets != -100).sum()
    total = 0.0
    for part in (slice(0, 11), slice(11, 30)):
        total = (
            total
            + distill_loss(
                hidden[part],
                weight,
                targets[part],
                bias,
                teacher_hidden=teacher_hidden[part],
                num_items=count,
                **inputs,
            ).loss
        )
    assert_close_scaled(total, full.loss, 1e-6, "loss")
    for got, want in zip(grads(total, [hidden, weight, bias]), full_grads):
        assert_close_scaled(got, want, 1e-5, "gradient")


def test_the_teacher_receives_no_gradient_and_the_module_form_agrees():
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets = _problem()
    for tensor in (teacher_hidden, teacher_weight, teacher_bias):
        tensor.requires_grad_()
    inputs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    loss_fn = DistillLoss(beta=0.5, temperature=1.5, softcap=3.0)
    loss = loss_fn(hidden, weight, targets, bias, **inputs)
    loss.backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None and teacher_bias.grad is None
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    function = distill_loss(hidden, weight, targets, bias, **inputs, beta=0.5, temperature=1.5, softcap=3.0)
    assert_close_scaled(loss, function.loss, 1e-7, "module")
    assert set(loss_fn.metrics) == {"divergence", "student_entropy", "hard_loss"}


def test_hard_loss_is_the_cross_entropy_of_the_tempered_student():
    hidden, weight, bias, teacher_hidden, teacher_weight, _, targets = _problem()
    out = distill_loss(hidden, weight, targets, bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    cross_entropy = fused_hybrid.linear_cross_entropy(hidden, weight, targets, bias)
    assert_close_scaled(out.metrics["hard_loss"], cross_entropy, 1e-6, "hard_loss")


def test_the_gradient_is_formed_inside_the_forward(monkeypatch):
    """Three student GEMMs and one teacher GEMM: the backward does no work of its own."""
    hidden, weight, _, teacher_hidden, teacher_weight, _, targets = _problem()
    out = distill_loss(hidden, weight, targets, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    monkeypatch.setattr(divergence, "statistics_and_gradients", None)
    monkeypatch.setattr(divergence, "backward", None)
    d_hidden, d_weight = torch.autograd.grad(3.0 * out.loss, (hidden, weight))
    assert torch.isfinite(d_hidden).all() and d_weight.abs().sum() > 0


def _bad_inputs():
    hidden, weight, _, teacher_hidden, teacher_weight, _, targets = _problem()
    n, v = targets.shape[0], weight.shape[0]
    head = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    top = torch.log_softmax(torch.randn(n, v), -1).topk(3, -1)
    topk = dict(teacher_topk_ids=top.indices, teacher_topk_logp=top.values)
    valid = (targets != -100).nonzero()[0].item()
    duplicated = top.indices.clone()
    duplicated[valid, 1] = duplicated[valid, 0]
    outside = top.indices.clone()
    outside[valid, 0] = v
    positive = top.values.clone()
    positive[valid, 0] = 0.1
    too_much = torch.log(torch.full((n, 3), 0.4))
    return (hidden, weight, targets), [
        ({}, "either as a head"),
        ({**head, **topk}, "not both"),
        ({**head, "teacher_weight": teacher_weight[:-1]}, "teacher_weight has"),
        ({**head, "teacher_hidden": teacher_hidden[:, :-1]}, "teacher_hidden must have shape"),
        ({**head, "teacher_weight": teacher_weight.double()}, "teacher_weight dtype"),
        ({**head, "teacher_bias": torch.zeros(v + 1)}, "teacher_bias must have shape"),
        ({**head, "beta": 1.5}, "beta must be"),
        ({**head, "temperature": 0.0}, "temperature must be"),
        ({**head, "hard_weight": -1.0}, "hard_weight must be"),
        ({**head, "teacher_head": "softcap"}, "teacher_head must be"),
        ({**head, "backend": "triton"}, "backend='triton'"),
        ({**topk, "beta": 0.5}, "forward KL only"),
        ({**topk, "teacher_head": HeadSpec(softcap=2.0)}, "teacher_head transforms"),
        ({**topk, "teacher_topk_ids": top.indices[:, :2]}, "teacher_topk_logp must have the shape"),
        ({**topk, "teacher_topk_ids": outside}, "teacher_topk_ids must lie in"),
        ({**topk, "teacher_topk_ids": duplicated}, "must be distinct"),
        ({**topk, "teacher_topk_logp": positive}, "teacher_topk_logp must be finite log-probs <= 0"),
        ({**topk, "teacher_topk_logp": too_much}, "must sum to at most 1"),
        ({**topk, "teacher_topk_ids": top.indices.float()}, "teacher_topk_ids must be an integer tensor"),
    ]


def test_bad_input_is_named_before_any_kernel(monkeypatch):
    (hidden, weight, targets), cases = _bad_inputs()

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep ran on bad input")

    monkeypatch.setattr(divergence, "statistics_and_gradients", no_sweep)
    for options, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            distill_loss(hidden, weight, targets, **options)


def test_default_epilogue_choice():
    """PyTorch's on the CPU; the Triton epilogue is CUDA's for two heads only (tests/test_gpu.py runs it there)."""
    hidden = torch.zeros(2, 3)
    teacher = divergence.TopKTeacher(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1))
    assert backends.default_divergence_epilogue(hidden, teacher).__name__.endswith("torch_divergence_epilogue")
    two_heads = divergence.TeacherHead(hidden, torch.zeros(4, 3), None, HeadSpec())
    assert backends.default_divergence_epilogue(hidden, two_heads).__name__.endswith("torch_divergence_epilogue")


@pytest.mark.parametrize("engine", ["torch", "triton-epilogue"])
def test_half_precision_heads_beat_naive_bf16(engine, request):
    """bf16 heads: the GEMMs' fp32 sums feed the divergence (never bf16-rounded logits), so the loss is far more
    accurate than naive bf16 PyTorch's and the gradients (one bf16 rounding of dz) several times more. The gradients
    are judged by their relative error norms: both end in the bf16 rounding of the result, whose half-ulp alone can
    make the largest single error of the two equal (over 30 seeds the norm ratio stays above 2.4)."""
    hidden, weight, bias, teacher_hidden, teacher_weight, _, targets = _problem(
        n=32, d=64, d_teacher=128, v=2048, dtype=torch.bfloat16
    )
    hidden.data *= 3
    inputs = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, beta=0.5)
    zs = transformed64(hidden, weight, bias)
    expected = loss64(zs, divergence64(zs, transformed64(teacher_hidden, teacher_weight, None), 0.5), targets, 0)
    want = [expected, *grads(expected, [hidden, weight])]
    naive, ours = _naive_and_our_errors(
        hidden, weight, bias, targets, inputs, want, _run_options(engine, request), relative_norm=True
    )
    # our loss is an fp32 number: a few fp32 ulps (relative) is as close as it can be, whatever naive's luck
    fp32_floor = 4 * torch.finfo(torch.float32).eps
    assert ours[0] <= naive[0] / 10 + fp32_floor, f"loss: {ours[0]:.2e} vs naive {naive[0]:.2e}"
    for name, our_error, naive_error in zip(("d_hidden", "d_weight"), ours[1:], naive[1:]):
        assert our_error <= naive_error / 2, f"{name}: {our_error:.2e} vs naive {naive_error:.2e}"
