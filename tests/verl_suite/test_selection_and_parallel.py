"""fused-hybrid as verl's fused LM-head backend: how it is selected, installed and refused, Megatron's switch and
verl's tensor-parallel contract, and verl's kernels as benchmark peers. Runs in the verl environment
(tests/test_verl.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from verl.models.transformers import monkey_patch
from verl.utils.experimental import torch_functional
from verl.utils.kernel import linear_cross_entropy as verl_kernel

import fused_hybrid.integrations.verl as integration
from tests.reference import assert_close_scaled
from tests.verl_suite.models import (
    VERL_BACKENDS,
    VOCAB,
    forward_inputs,
    reference_outputs,
    relative_error,
    run_forward,
    select_fused_hybrid,
    sequences,
    tiny_model,
)


@pytest.mark.chunk_rows(None)
@pytest.mark.parametrize("backend", VERL_BACKENDS)
def test_install_puts_verls_own_backends_on_fused_hybrid_until_uninstall(backend):
    model = tiny_model("llama")
    own_forward = type(model).forward
    inputs, rolled, _ = forward_inputs(sequences(), remove_padding=True)
    weights = (torch.randn(rolled.shape, dtype=torch.float64), torch.randn(rolled.shape, dtype=torch.float64))
    _, logp64, entropy64 = reference_outputs(model, own_forward, inputs, rolled, 1.3)
    verl_own = (torch_functional.FusedLinearForPPO, verl_kernel.linear_cross_entropy)

    integration.install()
    assert integration.installed()
    assert torch_functional.FusedLinearForPPO is integration.FusedLinearForPPO
    assert verl_kernel.linear_cross_entropy is integration.linear_cross_entropy
    monkey_patch.apply_monkey_patch(
        model, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend=backend
    )
    logp, entropy, _ = run_forward(model, inputs, 1.3, weights)
    assert_close_scaled(logp.reshape(rolled.shape), logp64, 2e-6, "log_probs")
    assert_close_scaled(entropy.reshape(rolled.shape), entropy64, 2e-6, "entropy")

    integration.uninstall()
    assert not integration.installed()
    assert (torch_functional.FusedLinearForPPO, verl_kernel.linear_cross_entropy) == verl_own


def test_importing_changes_nothing_until_the_backend_is_selected():
    """In a fresh interpreter: `import verl` loads the module through its verl.plugins entry point, which only
    teaches verl's switch the name fused_hybrid; verl's own backends stay verl's."""
    script = """
import transformers, verl
import fused_hybrid.integrations.verl as integration
from verl.models.transformers import dense_common, monkey_patch
from verl.utils.experimental import torch_functional
from verl.utils.kernel import linear_cross_entropy
assert monkey_patch.patch_forward_with_backends.__module__ == "fused_hybrid.integrations.verl"  # the entry point
config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
model = transformers.AutoModelForCausalLM.from_config(config)
monkey_patch.apply_monkey_patch(model, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend="torch")
assert type(model).forward is dense_common.forward_with_torch_backend
assert torch_functional.FusedLinearForPPO.__module__ == "verl.utils.experimental.torch_functional"
assert linear_cross_entropy.linear_cross_entropy.__module__ != "fused_hybrid.integrations.verl"
assert not integration.installed()
print("unchanged")
"""
    environment = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "auto"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unchanged" in result.stdout


def test_a_verl_with_other_signatures_is_refused_and_nothing_is_replaced(monkeypatch):
    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0, chunk_size=512):
        raise AssertionError("never called")

    monkeypatch.setattr(torch_functional.FusedLinearForPPO, "forward", forward)
    model = tiny_model("llama")
    own_forward = type(model).forward
    verl_own = (torch_functional.FusedLinearForPPO, verl_kernel.linear_cross_entropy)
    with pytest.raises(integration.VerlIntegrationError, match="FusedLinearForPPO.forward"):
        select_fused_hybrid(model, remove_padding=True)
    assert not integration.installed()
    assert type(model).forward is own_forward
    assert (torch_functional.FusedLinearForPPO, verl_kernel.linear_cross_entropy) == verl_own


def test_an_unsupported_verl_version_is_refused(monkeypatch):
    import verl

    monkeypatch.setattr(verl, "__version__", "0.8.0")
    with pytest.raises(integration.VerlIntegrationError, match="verl 0.8.0 is not supported"):
        integration.install()
    assert not integration.installed()


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda h, w, y: integration.linear_cross_entropy(h, w, y, torch.tensor(0.7)), "temperature"),
        (lambda h, w, y: integration.linear_cross_entropy(h, w, y, 0.0), "temperature"),
        (lambda h, w, y: integration.linear_cross_entropy(h, w, y, 1.0, "max"), "reduction"),
        (lambda h, w, y: integration.linear_cross_entropy(h, w, y[:-1]), "labels"),
        (lambda h, w, y: integration.FusedLinearForPPO().forward(h, w, y[:-1]), "input_ids"),
        (lambda h, w, y: integration.FusedLinearForPPO(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, words):
    hidden, weight, labels = torch.randn(6, 8), torch.randn(VOCAB, 8), torch.randint(0, VOCAB, (6,))
    with pytest.raises(ValueError, match=words):
        call(hidden, weight, labels)


def test_megatron_engine_selects_fused_hybrid_from_its_model_config():
    """Megatron-Core's fused forward binds verl's linear_cross_entropy when imported; with impl_backend
    fused_hybrid the engine's _maybe_enable_fused_kernels binds ours there (its GPT models, built on CUDA, are not
    run here)."""
    pytest.importorskip("megatron.core", reason="Megatron-Core is part of the verl environment's constraints")
    from verl.models.mcore import model_forward_fused
    from verl.workers.engine.megatron.transformer_impl import MegatronEngine

    def engine(backend):
        return types.SimpleNamespace(
            engine_config=types.SimpleNamespace(use_fused_kernels=True, use_remove_padding=True),
            model_config=types.SimpleNamespace(
                fused_kernel_options={"impl_backend": backend}, mtp=types.SimpleNamespace(enable=False)
            ),
            is_value_model=False,
            module=[],
        )

    MegatronEngine._maybe_enable_fused_kernels(engine("triton"))
    assert model_forward_fused.linear_cross_entropy is not integration.linear_cross_entropy
    MegatronEngine._maybe_enable_fused_kernels(engine(integration.BACKEND))
    assert model_forward_fused.linear_cross_entropy is integration.linear_cross_entropy
    integration.uninstall()
    assert model_forward_fused.linear_cross_entropy is verl_kernel.linear_cross_entropy


# ---------------------------------------------------------------------------------------------------------------
# verl's tensor-parallel contract (Megatron's fused path), 2 gloo ranks.


def _tensor_parallel_rank(rank: int, world: int, port: int, inputs: dict, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        weight = inputs["weight"]
        rows = torch.tensor_split(torch.arange(weight.shape[0]), world)[rank]
        hidden = inputs["hidden"].float().clone().requires_grad_()
        local = weight[rows].float().clone().requires_grad_()
        logp, entropy = integration.linear_cross_entropy(
            hidden, local, inputs["labels"], inputs["temperature"], "none", dist.group.WORLD
        )
        (inputs["weights"][0] * logp.double() + inputs["weights"][1] * entropy.double()).sum().backward()
        results[rank] = dict(
            logp=logp.detach(), entropy=entropy.detach(), d_weight=local.grad, d_hidden=hidden.grad, rows=rows
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.chunk_rows(None)
def test_tensor_parallel_contract_with_two_gloo_ranks():
    """verl's contract: statistics of the whole vocabulary on every rank, the weight gradient of the rank's slice,
    the hidden gradient this rank's partial sum (verl all-reduces it outside the kernel). The slices are uneven."""
    tokens, dim, vocab, temperature = 24, 16, VOCAB, 0.9
    hidden, weight = torch.randn(2, tokens // 2, dim, dtype=torch.float64), torch.randn(vocab, dim, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2, tokens // 2))
    weights = (torch.randn(tokens, dtype=torch.float64), torch.randn(tokens, dtype=torch.float64))
    inputs = dict(hidden=hidden, weight=weight, labels=labels, temperature=temperature, weights=weights)
    manager = mp.Manager()
    results = manager.dict()
    port = 29500 + int.from_bytes(os.urandom(2), "little") % 2000
    mp.start_processes(_tensor_parallel_rank, args=(2, port, inputs, results), nprocs=2, start_method="spawn")

    hidden64, weight64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp64 = (hidden64.reshape(tokens, dim) @ weight64.T / temperature).log_softmax(-1)
    target = logp64.gather(1, labels.reshape(-1, 1))[:, 0]
    entropy64 = -(logp64.exp() * logp64).sum(-1)
    (weights[0] * target + weights[1] * entropy64).sum().backward()
    partial_hidden = []
    for rank in range(2):
        got = results[rank]
        assert_close_scaled(got["logp"], target, 2e-6, f"rank {rank} log_probs")
        assert_close_scaled(got["entropy"], entropy64, 2e-6, f"rank {rank} entropy")
        assert_close_scaled(got["d_weight"], weight64.grad[got["rows"]], 1e-5, f"rank {rank} weight gradient")
        partial_hidden.append(got["d_hidden"].double())
    assert_close_scaled(partial_hidden[0] + partial_hidden[1], hidden64.grad, 1e-5, "summed hidden gradient")
    assert relative_error(partial_hidden[0], hidden64.grad) > 1e-2  # partial, not already all-reduced


# ---------------------------------------------------------------------------------------------------------------
# verl's kernels as benchmark peers compute what fused-hybrid's providers compute.


@pytest.mark.chunk_rows(None)
@pytest.mark.parametrize("objective", ["logprobs_entropy", "grpo"])
def test_benchmark_peer_verl_computes_the_same_objective(objective):
    from fused_hybrid.benchmarks.problems import make_problem
    from fused_hybrid.benchmarks.providers import PROVIDERS

    problem = make_problem(objective, 256, 32, 512, dtype=torch.float32, device=torch.device("cpu"), seq_len=64)
    results = {}
    for name in ("fused-hybrid", "verl"):
        assert PROVIDERS[name].unavailable_reason(torch.device("cpu")) is None
        loss = PROVIDERS[name].build(torch.device("cpu"))[objective](problem)
        loss.backward()
        results[name] = loss.detach(), problem.hidden.grad.clone(), problem.weight.grad.clone()
        problem.zero_grad()
    for ours, theirs, what in zip(results["fused-hybrid"], results["verl"], ("loss", "d_hidden", "d_weight")):
        assert_close_scaled(ours, theirs, 1e-5, what)
