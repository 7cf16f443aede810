"""CUDA-only checks of the compiled Triton kernels (skipped without a GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fused_hybrid
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("options", [dict(), dict(softcap=30.0, temperature=0.8)])
def test_compiled_kernels_match_reference(backend, dtype, rel, options):
    """The compiled tile kernels (every launch config timed on the first call) and the chunked engine (cuBLAS and
    the compiled epilogue; several chunks under a small workspace) against float64."""
    n, d, v = 1000, 384, 5003
    hidden = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda") / d**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(v, device="cuda") * 0.1).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[:100] = -100
    g_logp, g_entropy = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")

    logp, entropy = fused_hybrid.linear_logprobs(
        hidden, weight, targets, bias, return_entropy=True, backend=backend, workspace_bytes=64 << 20, **options
    )
    actual = grads((logp * g_logp + entropy * g_entropy).sum(), [hidden, weight, bias])
    leaves = [leaf64(t) for t in (hidden, weight, bias)]
    logp64, entropy64 = logprobs_entropy64(leaves[0], leaves[1], targets, leaves[2], **options)
    expected = grads((logp64 * g_logp.double() + entropy64 * g_entropy.double()).sum(), leaves)

    assert (logp.double() - logp64).abs().max() <= rel * max(1.0, logp64.abs().max())
    assert (entropy.double() - entropy64).abs().max() <= rel * max(1.0, entropy64.abs().max())
    for name, got, want in zip(("d_hidden", "d_weight", "d_bias"), actual, expected):
        assert_close_scaled(got, want, rel, name)


def test_more_than_2_31_logits_use_int64_offsets():
    n, d, v = 17_000, 64, 128_256  # N * V > 2^31
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, d, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend=backend)
        results[backend] = (loss, *grads(loss, [hidden, weight]))
    for got, want in zip(results["triton"], results["torch"]):
        assert_close_scaled(got.float(), want.float(), 2e-2)


def test_out_of_range_target_fails_on_device():
    # A device-side assertion poisons the CUDA context, so it runs in a process of its own.
    script = (
        "import torch, fused_hybrid\n"
        "h = torch.randn(8, 16, device='cuda'); w = torch.randn(32, 16, device='cuda')\n"
        "y = torch.full((8,), 40, device='cuda')\n"
        "fused_hybrid.linear_logprobs(h, w, y).sum().item()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "targets must lie in [0, V)" in result.stderr


def _gpu_losses(hidden, weight, targets):
    """Every objective, with the Python-number options (integer counts, a float mu, DPO's pair count) that once
    made device tensors from host values."""
    batch, length = targets.shape
    mask = targets != -100
    ref_logp = -torch.rand(batch, length, device="cuda")
    advantages = torch.linspace(-1, 1, batch, device="cuda")
    is_expert = torch.arange(batch, device="cuda") % 2 == 0
    loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, num_items=200)
    grpo_options = dict(entropy_coef=0.01, beta=0.1, ref_logp=ref_logp, aggregation="seq-mean-token-mean")
    loss = (
        loss + fused_hybrid.grpo_loss(hidden, weight, targets, advantages=advantages, num_items=4, **grpo_options).loss
    )
    loss = (
        loss
        + fused_hybrid.chord_loss(
            hidden,
            weight,
            targets,
            is_expert=is_expert,
            mu=0.3,
            advantages=advantages,
            num_rollout_tokens=100,
            num_expert_tokens=90,
        ).loss
    )
    loss = loss + fused_hybrid.dpo_loss(hidden, weight, targets, ref_logp=ref_logp, nll_weight=0.2).loss
    loss = (
        loss
        + fused_hybrid.dpo_loss(
            hidden,
            weight,
            targets,
            ref_logp=ref_logp,
            nll_weight=0.2,
            num_items=2,
            num_chosen_tokens=mask[: batch // 2].sum(),
        ).loss
    )
    loss = loss + fused_hybrid.dft_loss(hidden, weight, targets, num_items=150).loss
    loss = (
        loss
        + fused_hybrid.cispo_loss(hidden, weight, targets, advantages=advantages, old_logp=ref_logp, num_items=150).loss
    )
    loss = (
        loss
        + fused_hybrid.gmpo_loss(hidden, weight, targets, advantages=advantages, old_logp=ref_logp, num_items=4).loss
    )
    loss = loss + fused_hybrid.minor_sft_loss(hidden, weight, targets, ref_logp=ref_logp, num_items=4).loss
    packed = fused_hybrid.ift_loss(
        hidden.reshape(batch * length, -1),
        weight,
        targets.reshape(-1),
        sequence_ids=torch.arange(batch, device="cuda").repeat_interleave(length),
        num_sequences=batch,
        num_items=4,
    ).loss
    return loss + packed


def test_no_host_device_sync_on_the_hot_path():
    hidden = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1000, 128, device="cuda") / 12).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (4, 64), device="cuda")
    _gpu_losses(hidden, weight, targets).backward()  # warm-up: compile the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _gpu_losses(hidden, weight, targets).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bad_sequence_ids_fail_on_device():
    script = (
        "import torch, fused_hybrid\n"
        "h = torch.randn(6, 16, device='cuda'); w = torch.randn(32, 16, device='cuda')\n"
        "y = torch.randint(0, 32, (6,), device='cuda'); ids = torch.tensor([0, 0, 1, 0, 1, 1], device='cuda')\n"
        "fused_hybrid.ift_loss(h, w, y, sequence_ids=ids, num_sequences=2).loss.item()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0
    assert "sequence_ids must be non-decreasing" in result.stderr


def test_fp32_under_tf32_precision_matches_reference_to_tf32_accuracy():
    n, d, v = 512, 256, 3001
    hidden = torch.randn(n, d, device="cuda", requires_grad=True)
    weight = (torch.randn(v, d, device="cuda") / d**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        logp = fused_hybrid.linear_logprobs(hidden, weight, targets, backend="triton")
        actual = grads(logp.sum(), [hidden, weight])
    finally:
        torch.set_float32_matmul_precision(previous)
    leaves = [leaf64(t) for t in (hidden, weight)]
    logp64, _ = logprobs_entropy64(leaves[0], leaves[1], targets)
    assert (logp.double() - logp64).abs().max() <= 5e-3 * max(1.0, logp64.abs().max())
    for name, got, want in zip(("d_hidden", "d_weight"), actual, grads(logp64.sum(), leaves)):
        assert_close_scaled(got, want, 5e-3, name)


def test_cuda_graph_capture_and_replay():
    hidden = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(3000, 128, device="cuda") / 12).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 3000, (256,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        for _ in range(2):
            hidden.grad = weight.grad = None
            fused_hybrid.linear_cross_entropy(hidden, weight, targets).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    hidden.grad = weight.grad = None
    with torch.cuda.graph(graph):
        static_loss = fused_hybrid.linear_cross_entropy(hidden, weight, targets)
        static_loss.backward()
    new_hidden = torch.randn_like(hidden)
    hidden.data.copy_(new_hidden)
    graph.replay()
    torch.cuda.synchronize()
    reference = fused_hybrid.linear_cross_entropy(new_hidden.float(), weight.detach().float(), targets, backend="torch")
    assert abs(static_loss.item() - reference.item()) < 2e-2


def test_autotuning_picks_a_shipped_config_per_problem():
    from fused_hybrid.kernels import autotune, token_statistics_backward, token_statistics_forward

    hidden = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(3001, 256, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 3001, (700,), device="cuda")
    fused_hybrid.linear_cross_entropy(hidden, weight, targets, backend="triton").backward()
    chosen = {entry["pass_name"]: entry for entry in autotune.tuned_configs() if entry["key"][2] == 3001}
    shipped = {"forward": token_statistics_forward.CUDA_CONFIGS, "backward": token_statistics_backward.CUDA_CONFIGS}
    for name, entry in chosen.items():
        assert tuple(entry["config"].values()) in shipped[name][torch.bfloat16]
    assert set(chosen) == {"forward", "backward"}


def test_gradient_filter_on_trained_like_inputs_stays_within_naive_bf16_error():
    from fused_hybrid.kernels.token_statistics_backward import count_filtered_tiles

    from benchmarks.problems import make_problem

    problem = make_problem(
        "cross_entropy",
        2048,
        1024,
        32000,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),
        seq_len=2048,
        distribution="trained",
    )
    hidden, weight, targets = problem.hidden.detach().reshape(-1, 1024), problem.weight.detach(), problem.targets
    targets = targets.reshape(-1)
    leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    expected = grads(logprobs_entropy64(*leaves, targets)[0].sum(), leaves)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with count_filtered_tiles() as tiles:
        filtered = grads(
            fused_hybrid.linear_logprobs(h, w, targets, backend="triton", gradient_filter=2.0**-12).sum(), [h, w]
        )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (h @ w.T).float().log_softmax(-1)
    naive = grads(logits.gather(-1, targets[:, None]).sum(), [h, w])
    assert tiles.kept_fraction < 1.0
    for got, ours, want in zip(naive, filtered, expected):
        naive_error = (got.double() - want).abs().max()
        assert (ours.double() - want).abs().max() <= naive_error


def test_compiled_reductions_as_accurate_as_naive_on_a_large_vocabulary(monkeypatch):
    """The compiled reductions at their CUDA block sizes over a 128k vocabulary, on exact logits against naive fp32
    (tests/test_statistics_accuracy.py): the tile forward in one vocabulary split (2004 tiles in one compensated
    running sum per token), the chunked epilogue's lanes and the PyTorch epilogue's blocked row dot on CUDA."""
    from fused_hybrid.kernels import logit_epilogue, token_statistics_forward

    from fused_hybrid.engine import torch_epilogue
    from tests.test_statistics_accuracy import REDUCTIONS, check_partials, exact_logits

    monkeypatch.setattr(token_statistics_forward, "_target_programs", lambda device: 1)
    hidden, weight, bias, targets, logits = (t.cuda() for t in exact_logits(64, 96, 128_256))
    tile = token_statistics_forward.vocabulary_partials(hidden, weight, targets, bias, REDUCTIONS)
    check_partials(tile, logits, bias)
    check_partials(logit_epilogue.statistics(logits, targets, bias, REDUCTIONS)[0], logits, bias)
    check_partials(torch_epilogue.statistics(logits, targets, bias, REDUCTIONS)[0], logits, bias)


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_distillation_on_the_compiled_divergence_epilogue_matches_float64(beta, dtype, rel):
    """Both heads through cuBLAS and the compiled divergence epilogue (several chunks), a teacher twice as wide with
    its own softcap, against the float64 formula; the default epilogue on CUDA is the Triton one."""
    from fused_hybrid.engine import backends, divergence
    from tests.test_distill import divergence64, loss64, transformed64

    n, d, v = 600, 256, 5003
    hidden = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda") / d**0.5).to(dtype).requires_grad_()
    bias = (torch.randn(v, device="cuda") * 0.1).to(dtype).requires_grad_()
    teacher_hidden = torch.randn(n, 2 * d, device="cuda").to(dtype)
    teacher_weight = (torch.randn(v, 2 * d, device="cuda") / d**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[:50] = -100
    teacher = divergence.TeacherHead(teacher_hidden, teacher_weight, None, fused_hybrid.HeadSpec())
    assert backends.default_divergence_epilogue(hidden, teacher).__name__.endswith("kernels.divergence_epilogue")
    out = fused_hybrid.distill_loss(
        hidden,
        weight,
        targets,
        bias,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_head=fused_hybrid.HeadSpec(softcap=20.0),
        beta=beta,
        temperature=1.5,
        hard_weight=0.3,
        workspace_bytes=16 << 20,
    )
    leaves = [leaf64(t) for t in (hidden, weight, bias)]
    zs = transformed64(*leaves, temperature=1.5)
    zt = transformed64(teacher_hidden, teacher_weight, None, softcap=20.0, temperature=1.5)
    expected = loss64(zs, divergence64(zs, zt, beta), targets, 0.3)
    assert_close_scaled(out.loss, expected, rel, "loss")
    for name, got, want in zip(
        ("d_hidden", "d_weight", "d_bias"), grads(out.loss, [hidden, weight, bias]), grads(expected, leaves)
    ):
        assert_close_scaled(got, want, rel, name)
