"""fused-hybrid as verl's fused LM-head backend, against a float64 full-logits reference and verl's own paths.

These tests run in an environment of their own (verl pins older transformers): tests/test_verl.py builds it from
constraints-verl.txt and runs them there, in the README's test command."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from tensordict import TensorDict
from verl.models.transformers import monkey_patch
from verl.utils import tensordict_utils as tu
from verl.utils.experimental import torch_functional
from verl.utils.kernel import linear_cross_entropy as verl_kernel
from verl.workers.config import ActorConfig
from verl.workers.engine.fsdp import transformer_impl
from verl.workers.utils.losses import ppo_loss, sft_loss
from verl.workers.utils.padding import left_right_2_no_padding

import fused_hybrid.integrations.verl as integration
from tests.reference import assert_close_scaled
from tests.test_hf import COMMON

VOCAB = COMMON["vocab_size"]
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # a logit softcap, which verl's own fused forwards leave out (0.3: it bends this tiny model's logits, ~0.5)
    "gemma2": (
        transformers.Gemma2Config,
        dict(head_dim=8, final_logit_softcapping=0.3, attn_logit_softcapping=None, query_pre_attn_scalar=8),
    ),
}
VERL_BACKENDS = ("torch", "triton")  # verl's own fused backends that run on a CPU (triton: through our kernel)


def tiny_model(family: str) -> transformers.PreTrainedModel:
    config_class, options = FAMILIES[family]
    config = config_class(**COMMON, **options)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).float()


@pytest.fixture(autouse=True)
def _verl_as_it_was():
    """Every test leaves verl and the model classes as it found them (verl patches a model's class)."""
    forwards = {
        c: c.forward
        for c in (transformers.LlamaForCausalLM, transformers.Qwen2ForCausalLM, transformers.Gemma2ForCausalLM)
    }
    yield
    integration.uninstall()
    for model_class, forward in forwards.items():
        model_class.forward = forward


def select_fused_hybrid(model, remove_padding: bool) -> None:
    """What verl's FSDP engine does with `use_fused_kernels: true`, `impl_backend: fused_hybrid`."""
    monkey_patch.apply_monkey_patch(
        model, use_remove_padding=remove_padding, use_fused_kernels=True, fused_kernels_backend=integration.BACKEND
    )


# ---------------------------------------------------------------------------------------------------------------
# The patched forward, both padding modes, against float64 and verl's own torch path.


def sequences(count: int = 3) -> list[torch.Tensor]:
    return [torch.randint(1, VOCAB, (int(n),)) for n in torch.randint(3, 9, (count,))]


def forward_inputs(seqs: list[torch.Tensor], remove_padding: bool) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """verl's model inputs in each padding mode, the rolled labels its forward reads, and the mask of positions
    whose label is the next token of the same sequence (the last position of each sequence predicts past it)."""
    if remove_padding:  # one packed row, positions restarting per sequence, labels rolled over the whole row
        input_ids = torch.cat(seqs)[None]
        position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        rolled = torch.roll(input_ids, -1, dims=1)
        inside = torch.cat([torch.arange(len(s)) < len(s) - 1 for s in seqs])[None]
        inputs = dict(input_ids=input_ids, position_ids=position_ids, shift_labels=rolled)
        return inputs, rolled, inside
    longest = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)], attention_mask[row, : len(s)] = s, 1
    inside = torch.arange(longest)[None] < attention_mask.sum(1, keepdim=True) - 1
    inputs = dict(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0)
    )
    return inputs, torch.roll(input_ids, -1, dims=1), inside


def reference_outputs(model, own_forward, inputs: dict, rolled: torch.Tensor, temperature: float):
    """log-probs and entropies in float64 from the model's own full logits."""
    model64 = copy.deepcopy(model).double()
    model_inputs = {k: v for k, v in inputs.items() if k != "shift_labels"}
    # use_cache=False as verl's engine passes it (transformers then masks packed sequences apart by position_ids)
    logits = own_forward(model64, **model_inputs, use_cache=False).logits / temperature
    logp = logits.log_softmax(-1)
    return model64, logp.gather(-1, rolled[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def run_forward(model, inputs: dict, temperature: float, weights):
    out = model(**inputs, temperature=temperature, return_dict=True, use_cache=False)
    loss = (weights[0] * out.log_probs.double()).sum() + (weights[1] * out.entropy.double()).sum()
    loss.backward()
    return out.log_probs.detach(), out.entropy.detach(), {n: p.grad for n, p in model.named_parameters()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


@pytest.mark.chunk_rows(None)  # against naive full-logits GEMMs: see tests/conftest.py
@pytest.mark.parametrize("remove_padding", [True, False], ids=["remove-padding", "padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_forward_matches_float64_and_verls_own(family, remove_padding):
    temperature = 0.7
    model = tiny_model(family)
    own_forward = type(model).forward
    inputs, rolled, inside = forward_inputs(sequences(), remove_padding)
    weights = (torch.randn(rolled.shape, dtype=torch.float64), torch.randn(rolled.shape, dtype=torch.float64))

    model64, logp64, entropy64 = reference_outputs(model, own_forward, inputs, rolled, temperature)
    ((weights[0] * logp64).sum() + (weights[1] * entropy64).sum()).backward()
    grads64 = {n: p.grad for n, p in model64.named_parameters()}

    verl_model = copy.deepcopy(model)
    monkey_patch.apply_monkey_patch(
        verl_model, use_remove_padding=remove_padding, use_fused_kernels=True, fused_kernels_backend="torch"
    )
    verl_logp, verl_entropy, verl_grads = run_forward(verl_model, inputs, temperature, weights)

    type(model).forward = own_forward
    select_fused_hybrid(model, remove_padding)
    assert type(model).forward is integration.forward_with_fused_hybrid
    logp, entropy, grads = run_forward(model, inputs, temperature, weights)

    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == rolled.shape
    assert_close_scaled(logp, logp64, 2e-6, "log_probs")
    assert_close_scaled(entropy, entropy64, 2e-6, "entropy")
    for name, grad in grads.items():
        assert_close_scaled(grad, grads64[name], 1e-4, name)
    if family == "gemma2":  # verl's own forward leaves the softcap out: its log-probs are not the model's
        assert relative_error(verl_logp[inside], logp64[inside]) > 100 * relative_error(logp[inside], logp64[inside])
        return
    # no less accurate than verl's own fp32 torch path, output by output and gradient by gradient
    for ours, theirs, exact, name in [
        (logp, verl_logp, logp64, "log_probs"),
        (entropy, verl_entropy, entropy64, "entropy"),
        *[(grads[n], verl_grads[n], grads64[n], n) for n in grads],
    ]:
        assert relative_error(ours, exact) <= 2 * relative_error(theirs, exact) + 1e-6, name


def test_entropy_is_exact_for_all_negative_logits():
    """verl's Triton kernel loses the entropy when every logit is negative (verl #7439): ours shifts by the row
    maximum, whatever its sign."""
    hidden = torch.randn(40, 16, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, dtype=torch.float64) * 0.3
    bias_column = torch.full((40, 1), -200.0, dtype=torch.float64)
    hidden_shifted = torch.cat([hidden, bias_column], 1)  # logits = h w - 200 through a constant feature
    weight_shifted = torch.cat([weight, torch.ones(VOCAB, 1, dtype=torch.float64)], 1)
    labels = torch.randint(0, VOCAB, (40,))
    logits = hidden_shifted @ weight_shifted.T / 0.8
    assert (logits < -150).all()
    logp64 = logits.log_softmax(-1)
    for function in (integration.linear_cross_entropy, integration.FusedLinearForPPO().forward):
        logp, entropy = function(hidden_shifted.float(), weight_shifted.float(), labels, 0.8)
        assert_close_scaled(logp, logp64.gather(1, labels[:, None])[:, 0], 1e-5, "log_probs")
        assert_close_scaled(entropy, -(logp64.exp() * logp64).sum(-1), 1e-5, "entropy")


# ---------------------------------------------------------------------------------------------------------------
# verl's FSDP engine: forward_step with sft_loss and ppo_loss, on packed variable-length sequences.


@pytest.fixture
def engine_on_cpu(monkeypatch):
    """verl's FSDPEngineWithLMHead around a plain module, its forward_step and loss code unchanged: the engine's
    device lookups answer "cpu" (verl has no CPU platform) and the attributes its __init__ would set from the
    engine config are set (fp32, no sequence parallelism, no static padding)."""
    monkeypatch.setattr(transformer_impl, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(transformer_impl, "get_device_name", lambda: "cpu")
    from verl.utils import torch_functional as verl_functional

    def build(module):
        engine = object.__new__(transformer_impl.FSDPEngineWithLMHead)
        engine.module, engine.pad_to_length, engine.use_ulysses_sp = module, False, False
        engine._autocast_dtype = torch.float32
        engine.engine_config = types.SimpleNamespace(
            entropy_checkpointing=False, entropy_from_logits_with_chunking=False
        )
        engine.compute_entropy_from_logits = verl_functional.entropy_from_logits
        engine.get_data_parallel_group = lambda: None
        return engine

    return build


def rollout_batch(size: int = 3, prompt: int = 5, response: int = 6, temperature: float = 0.7) -> TensorDict:
    """A rollout batch as verl's actor receives it: prompts left-padded, responses right-padded, of random lengths,
    then converted to verl's no-padding (nested) layout by verl's own left_right_2_no_padding."""
    mask = torch.ones(size, prompt + response, dtype=torch.long)
    for row in range(size):
        mask[row, : prompt - int(torch.randint(1, prompt + 1, ()))] = 0
        mask[row, prompt + int(torch.randint(1, response + 1, ())) :] = 0
    ids = torch.randint(1, VOCAB, mask.shape) * mask
    data = TensorDict(
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0),
            "prompts": ids[:, :prompt],
            "responses": ids[:, prompt:],
            "response_mask": mask[:, prompt:],
            "old_log_probs": -3 * torch.rand(size, response),
            "advantages": torch.randn(size, response),
        },
        batch_size=[size],
    )
    data = left_right_2_no_padding(data)
    # the SFT trainer's loss mask: nested over each whole sequence, 1 on the response tokens
    whole = torch.cat([torch.zeros_like(mask[:, :prompt]), mask[:, prompt:]], 1)[mask.bool()]
    data["sft_loss_mask"] = torch.nested.nested_tensor_from_jagged(whole, data["input_ids"].offsets())
    batch_info = dict(
        temperature=temperature, dp_size=1, batch_num_tokens=int(mask[:, prompt:].sum()), global_batch_size=size
    )
    for key, value in batch_info.items():
        tu.assign_non_tensor_data(data, key, value)
    return data


def actor_config() -> ActorConfig:
    return ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=2,
        ppo_micro_batch_size_per_gpu=2,
        rollout_n=1,
        entropy_coeff=0.01,
        clip_ratio=0.2,
    )


@pytest.mark.chunk_rows(None)
@pytest.mark.parametrize("remove_padding", [True, False], ids=["remove-padding", "padded"])
@pytest.mark.parametrize("loss", ["sft", "ppo"])
def test_forward_step_trains_on_fused_hybrid_as_on_the_models_own_logits(loss, remove_padding, engine_on_cpu):
    """The engine's loss, log-probs, entropies and every parameter gradient with `impl_backend: fused_hybrid`
    equal those of verl's unfused path (the model's own logits), in both padding modes."""
    loss_function = functools.partial(sft_loss if loss == "sft" else ppo_loss, actor_config())
    model = tiny_model("qwen2")
    own_forward = type(model).forward
    data = rollout_batch()
    runs = {}
    for fused in (False, True):
        module = copy.deepcopy(model)
        type(module).forward = own_forward
        if fused:
            select_fused_hybrid(module, remove_padding)
        batch = data.clone()
        if loss == "sft":
            batch["loss_mask"] = batch["sft_loss_mask"]
        options = dict(use_remove_padding=remove_padding, use_fused_kernels=fused, calculate_entropy=loss == "ppo")
        for key, value in options.items():
            tu.assign_non_tensor_data(batch, key, value)
        value, output = engine_on_cpu(module).forward_step(batch, loss_function, forward_only=False)
        value.backward()
        runs[fused] = value.detach(), output["model_output"], {n: p.grad for n, p in module.named_parameters()}
    (own_loss, own_output, own_grads), (loss_value, output, grads) = runs[False], runs[True]
    assert_close_scaled(loss_value, own_loss, 1e-5, "loss")
    # the last token of each sequence predicts past it; verl's loss masks it (and the padded mode labels it otherwise)
    ends = data["input_ids"].offsets()[1:] - 1
    used = torch.ones(output["log_probs"].values().shape[0], dtype=torch.bool)
    used[ends] = False
    assert_close_scaled(output["log_probs"].values()[used], own_output["log_probs"].values()[used], 1e-5, "log_probs")
    if loss == "ppo":
        assert_close_scaled(output["entropy"].values()[used], own_output["entropy"].values()[used], 1e-5, "entropy")
    for name, grad in grads.items():
        assert_close_scaled(grad, own_grads[name], 1e-4, name)


@pytest.mark.parametrize("remove_padding", [True, False], ids=["remove-padding", "padded"])
def test_verls_own_kernels_never_run_once_fused_hybrid_is_selected(remove_padding, engine_on_cpu, monkeypatch):
    def not_ours(*args, **kwargs):
        pytest.fail("verl's own fused kernel ran")

    monkeypatch.setattr(torch_functional.FusedLinearForPPOFunction, "apply", not_ours)
    monkeypatch.setattr(verl_kernel.LinearCrossEntropy, "apply", not_ours)
    monkeypatch.setattr(verl_kernel, "linear_cross_entropy", not_ours)
    model = tiny_model("llama")
    select_fused_hybrid(model, remove_padding)
    batch = rollout_batch()
    for key, value in dict(use_remove_padding=remove_padding, use_fused_kernels=True, calculate_entropy=True).items():
        tu.assign_non_tensor_data(batch, key, value)
    value, _ = engine_on_cpu(model).forward_step(batch, functools.partial(ppo_loss, actor_config()), forward_only=False)
    value.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Selection, install / uninstall, refusal.


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
