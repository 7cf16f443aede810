"""Objectives as declarations: the registry drives the trainer's modes; a new objective is one definition."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from fused_hybrid.objectives import OBJECTIVES, LossOutput, Objective, distill_loss, objective_module, register
from fused_hybrid.objectives.registry import TEACHER_INPUTS
from fused_hybrid.trainer import ConfigError, HybridTrainer, load_config
from tests.reference import assert_close_scaled, grads, leaf64, logprobs_entropy64


# The README's "Add your own objective" example, as written there.
def focal_sft_loss(hidden, weight, targets, bias=None, *, gamma=2.0, num_items=None, head=None, **head_options):
    """Focal SFT: each token's NLL weighted by the detached (1 - p)^gamma (confident tokens count less)."""
    head = fused_hybrid.HeadSpec.resolve(head, head_options)  # temperature, softcap, ignore_index, backend, ...
    logp = fused_hybrid.linear_head_stats(hidden, weight, targets, bias, head=head).logp
    mask = targets != head.ignore_index
    focus = (1.0 - logp.detach().exp()) ** gamma
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = torch.where(mask, -focus * logp, 0.0).sum() / count
    return LossOutput(loss, {"mean_focus": focus[mask].mean().detach()})


@pytest.fixture
def focal_sft():
    objective = register(
        Objective(
            name="focal_sft",
            loss=focal_sft_loss,
            data="demonstrations",
            normalisers={"num_items": "tokens"},
            options=lambda config, step: {"gamma": 2.0},
        )
    )
    yield objective
    del OBJECTIVES["focal_sft"]


def test_a_registered_objective_is_a_trainer_mode(tmp_path, focal_sft):
    from tests.test_trainer import config, early_late

    trainer = HybridTrainer(config(tmp_path, "focal_sft", "optim.max_steps=12"), progress=False)
    assert trainer.objective is focal_sft
    history = trainer.train()
    early, late = early_late(history, "loss")
    assert late < early and all("mean_focus" in h for h in history if "loss" in h)
    # the example's math, against float64
    hidden, weight = torch.randn(3, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = -100
    loss = focal_sft_loss(hidden, weight, targets, temperature=0.9).loss
    h64, w64 = leaf64(hidden), leaf64(weight)
    logp64, _ = logprobs_entropy64(h64, w64, targets, temperature=0.9)
    mask = targets != -100
    expected = (-((1 - logp64.detach().exp()) ** 2) * logp64)[mask].sum() / mask.sum()
    assert_close_scaled(loss, expected, 1e-5)
    for got, want in zip(grads(loss, [hidden, weight]), grads(expected, [h64, w64])):
        assert_close_scaled(got, want, 1e-4, atol=1e-7)
    # and its module form, as the README makes it
    focal_module = objective_module("FocalSFTLoss", focal_sft_loss, check_options=lambda gamma=2.0: None)
    assert torch.equal(focal_module(temperature=0.9)(hidden, weight, targets), loss)


def test_every_objective_declares_what_it_needs():
    assert set(OBJECTIVES) >= {"sft", "dft", "chord", "grpo", "cispo", "gmpo", "dpo", "minor_sft", "ift", "distill"}
    grouped = {
        name: objective.gradient for name, objective in OBJECTIVES.items() if objective.gradient in ("sequence", "pair")
    }
    assert grouped == {
        "gmpo": "sequence",
        "dpo": "pair",
        "orpo": "pair",
        "cpo": "pair",
        "kto": "sequence",
        "minor_sft": "sequence",
    }
    grpo, dft = OBJECTIVES["grpo"], OBJECTIVES["dft"]
    assert [grpo.gradient_plan(importance_sampling=s) for s in ("token", "sequence")] == ["token", "sequence"]
    assert grpo.gradient_plan(importance_sampling="token", loss_type="vespo") == "sequence"
    assert grpo.gradient_plan(importance_sampling="token", off_policy_mask=True) == "sequence"
    assert grpo.gradient_plan(importance_sampling="token", sequence_sampler_correction=True) == "sequence"
    assert grpo.gradient_plan(importance_sampling="sequence", top_entropy_quantile=0.2) == "two-pass"
    assert [dft.gradient_plan(reduction=r) for r in ("mean", "none")] == ["token", "two-pass"]
    with pytest.raises(ValueError, match="gradient must be one of"):
        Objective(name="x", loss=focal_sft_loss, data="demonstrations", gradient="sequences")
    defaults = load_config(None)
    assert {n for n, o in OBJECTIVES.items() if o.rewarded(defaults)} == {"chord", "grpo", "cispo", "gmpo"}
    assert {n for n, o in OBJECTIVES.items() if o.samples(defaults)} == {"chord", "grpo", "cispo", "gmpo", "distill"}
    with pytest.raises(ValueError, match="already registered"):
        register(Objective(name="sft", loss=focal_sft_loss, data="demonstrations"))
    with pytest.raises(ValueError, match="data must be one of"):
        Objective(name="x", loss=focal_sft_loss, data="tokens")
    with pytest.raises(ValueError, match="batch_inputs"):
        Objective(name="x", loss=focal_sft_loss, data="rollouts", batch_inputs=("rewards",))
    with pytest.raises(ConfigError, match="mode: 'focal_sft' is not one of"):
        load_config(None, ["mode=focal_sft"])  # not registered here


TEACHER = (
    "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"
)


def test_distillation_takes_its_data_from_the_config_and_its_inputs_from_a_teacher():
    distill = OBJECTIVES["distill"]
    on = load_config(None, ["mode=distill", f"teacher.tiny={TEACHER}"])
    off = load_config(None, ["mode=distill", f"teacher.tiny={TEACHER}", "objective.distill_policy=off"])
    assert distill.data_kind(on) == "completions" and distill.data_kind(off) == "demonstrations"
    assert distill.samples(on) and not distill.rewarded(on) and not distill.samples(off)
    assert distill.needs_teacher(on) and set(distill.batch_inputs) == set(TEACHER_INPUTS)
    assert distill.normaliser_counts(on) == {"num_items": "tokens"} and not distill.needs_reference(on)
    assert distill.options(on, 0) == {"beta": 0.0, "temperature": 1.0, "hard_weight": 0.0}
    tuned = load_config(
        None,
        [
            "mode=distill",
            f"teacher.tiny={TEACHER}",
            "objective.distill_beta=0.5",
            "objective.distill_temperature=2.0",
            "objective.hard_weight=0.1",
            "objective.beta=0.3",  # GRPO's KL weight: not distillation's
        ],
    )
    assert distill.options(tuned, 7) == {"beta": 0.5, "temperature": 2.0, "hard_weight": 0.1}
    with pytest.raises(ValueError, match="come from a teacher model: declare needs_teacher"):
        Objective(name="x", loss=distill_loss, data="demonstrations", batch_inputs=("teacher_hidden",))
    with pytest.raises(ValueError, match="data must be one of"):
        Objective(name="x", loss=focal_sft_loss, data=lambda config: "tokens").data_kind(on)


@pytest.fixture
def teacher_forced_ce():
    """An objective of one's own on a teacher: the hard cross-entropy plus the divergence to the teacher's head."""
    objective = register(
        Objective(
            name="teacher_forced_ce",
            loss=distill_loss,
            data="demonstrations",
            normalisers={"num_items": "tokens"},
            batch_inputs=("teacher_hidden", "teacher_weight"),
            options=lambda config, step: {"hard_weight": 1.0},
            needs_teacher=lambda config: True,
        )
    )
    yield objective
    del OBJECTIVES["teacher_forced_ce"]


def test_a_registered_objective_gets_its_teacher_from_the_config(tmp_path, teacher_forced_ce):
    from tests.test_trainer import config

    with pytest.raises(ConfigError, match="mode 'teacher_forced_ce' learns from a teacher"):
        config(tmp_path, "teacher_forced_ce")
    trainer = HybridTrainer(
        config(tmp_path, "teacher_forced_ce", f"teacher.tiny={TEACHER}", "optim.max_steps=2"), progress=False
    )
    assert trainer.teacher is not None and trainer.data_kind == "demonstrations"
    history = trainer.train()
    assert all(h["hard_loss"] > 0 and h["divergence"] > 0 for h in history if "loss" in h)
