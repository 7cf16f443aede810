"""fused-hybrid as verl's fused LM-head backend: the patched forward and verl's FSDP engine, against a float64
full-logits reference and verl's own paths. Runs in the verl environment (tests/test_verl.py)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from verl.models.transformers import monkey_patch
from verl.utils import tensordict_utils as tu
from verl.utils.experimental import torch_functional
from verl.utils.kernel import linear_cross_entropy as verl_kernel
from verl.workers.utils.losses import ppo_loss, sft_loss

import fused_hybrid.integrations.verl as integration
from tests.reference import assert_close_scaled
from tests.verl_suite.models import (
    FAMILIES,
    VOCAB,
    actor_config,
    forward_inputs,
    reference_outputs,
    relative_error,
    rollout_batch,
    run_forward,
    select_fused_hybrid,
    sequences,
    tiny_model,
)


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
