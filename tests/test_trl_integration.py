"""fused_hybrid.integrations.trl: TRL's fused LM head computed by fused-hybrid, checked against a float64 reference
written from TRL's documented transform, against TRL's own function, and inside TRL's SFT, DPO and GRPO trainers
(same logged losses and metrics, same weights, TRL's kernel never called)."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from accelerate.state import AcceleratorState  # noqa: E402
from trl.kernels import ChunkedLogProbFunction  # noqa: E402

from fused_hybrid.integrations import trl as integration  # noqa: E402
from tests.reference import assert_close_scaled, grads  # noqa: E402
from tests.test_hf import tiny_model, word_level_tokenizer  # noqa: E402

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def _trl_own_head_after_each_test():
    yield
    integration.uninstall()


def trl_logits64(hidden, weight, bias, temperature, softcap, logit_scale) -> torch.Tensor:
    """TRL's documented transform in float64: z = softcap(logit_scale * (h w + b)) / temperature."""
    z = logit_scale * (hidden.double() @ weight.double().T + bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def trl_reference(hidden, weight, bias, targets, temperature, softcap, logit_scale):
    """TRL's per-token fields from the float64 logits."""
    z = trl_logits64(hidden, weight, bias, temperature, softcap, logit_scale)
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    return (
        log_p.gather(1, targets[:, None])[:, 0],
        -(p * log_p).sum(-1),
        torch.logsumexp(2 * log_p, -1),
        z.mean(-1),
        z.argmax(-1) == targets,
    )


def reference_margin(hidden, weight, bias, targets, options) -> torch.Tensor:
    """The target's float64 logit minus the best other column's: near 0, fp32 rounding (a saturated softcap)
    decides which is the arg-max."""
    z = trl_logits64(hidden, weight, bias, options["temperature"], options["softcap"], options["logit_scale"])
    return z.gather(1, targets[:, None])[:, 0] - z.scatter(1, targets[:, None], float("-inf")).amax(-1)


@pytest.mark.parametrize(
    "options",
    [dict(temperature=1.0, softcap=None, logit_scale=1.0), dict(temperature=0.7, softcap=3.0, logit_scale=1.7)],
)
def test_every_field_and_gradient_matches_trls_transform(options):
    n, d, v = 41, 16, 103
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) / 3).requires_grad_()
    bias = (torch.randn(v) * 0.1).requires_grad_()
    targets = torch.randint(0, v, (n,))
    # An exact tie, whatever order a GEMM sums in: these tokens' hidden states have one nonzero component, and
    # columns 3 and 7 hold the same value there (z = 90 + b, far above every other column). argmax picks column 3,
    # so a target 7 on the tie is not top-1.
    hidden.data[:4] = 0.0
    hidden.data[:4, 5] = 10.0
    weight.data[3, 5] = weight.data[7, 5] = 9.0
    bias.data[7] = bias.data[3]
    targets[:4] = torch.tensor([3, 7, 3, 7])
    g_logp, g_entropy = torch.randn(n), torch.randn(n)
    args = (options["temperature"], 32, options["softcap"], options["logit_scale"], OUTPUTS)

    ours = integration.FusedHybridLogProbFunction.apply(hidden, weight, bias, targets, *args)
    theirs = ChunkedLogProbFunction.apply(hidden, weight, bias, targets, *args)
    reference = trl_reference(
        hidden, weight, bias, targets, options["temperature"], options["softcap"], options["logit_scale"]
    )
    for name, got, trl_value, want in zip(OUTPUTS, ours, theirs, reference):
        if name == "is_top1":  # exact where fp32 can tell: the target's lead (or lag) above fp32 rounding
            clear = (reference_margin(hidden, weight, bias, targets, options).abs() > 1e-4) | (torch.arange(n) < 4)
            assert torch.equal(got[clear], want[clear]) and torch.equal(got[clear], trl_value[clear])
            assert got[:4].tolist() == [True, False, True, False]
        else:
            assert_close_scaled(got, want, 2e-6, name)
            assert_close_scaled(got, trl_value, 1e-5, f"{name} vs TRL")
    leaves = [hidden, weight, bias]
    expected = grads((reference[0] * g_logp.double() + reference[1] * g_entropy.double()).sum(), leaves)
    for label, got, want in zip(
        ("d_hidden", "d_weight", "d_bias"), grads((ours[0] * g_logp + ours[1] * g_entropy).sum(), leaves), expected
    ):
        assert_close_scaled(got, want, 1e-5, label)


def test_fields_not_requested_are_none_and_without_gradient():
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (5,))
    logp, entropy, log_sum_sq, mean_logits, top1 = integration.FusedHybridLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, 32, None, 1.0, ("log_probs", "mean_logits")
    )
    assert entropy is None and log_sum_sq is None and top1 is None
    assert logp.requires_grad and not mean_logits.requires_grad


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(outputs=("log_probs", "perplexity")), "outputs: unknown"),
        (dict(logit_scale=0.0), "logit_scale must be > 0"),
    ],
)
def test_bad_arguments_are_named(bad, message):
    arguments = dict(temperature=1.0, chunk_size=32, final_logit_softcapping=None, logit_scale=1.0, outputs=OUTPUTS)
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        integration.FusedHybridLogProbFunction.apply(
            torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(3, dtype=torch.long), *arguments.values()
        )


def test_install_and_uninstall_swap_trls_function():
    import trl.trainer.utils as utils

    own = utils._ChunkedLogProbFunction
    integration.install()
    integration.install()  # twice is once
    assert utils._ChunkedLogProbFunction is integration.FusedHybridLogProbFunction and integration.installed()
    integration.uninstall()
    assert utils._ChunkedLogProbFunction is own and not integration.installed()


def test_an_unsupported_trl_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "1.10.0")
    with pytest.raises(integration.TRLIntegrationError, match="TRL 1.10.0 is not supported"):
        integration.install()
    assert not integration.installed()


def test_a_changed_fused_head_is_refused(monkeypatch):
    from trl.kernels import chunked_logprob

    monkeypatch.setattr(chunked_logprob, "OPTIONAL_OUTPUTS", ("entropy", "top_k"))
    with pytest.raises(integration.TRLIntegrationError, match="offers the outputs"):
        integration.install()

    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, something_new):
        raise AssertionError

    monkeypatch.undo()
    monkeypatch.setattr(ChunkedLogProbFunction, "forward", staticmethod(forward))
    with pytest.raises(integration.TRLIntegrationError, match="something_new"):
        integration.install()


# ------------------------------------------------------------------------------------------- TRL's trainers
VOCAB = 97


def _text(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _sft_trainer(model, reference, tmp_path):
    rows = [{"input_ids": [(i * 3 + t) % 90 + 3 for t in range(12)]} for i in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=3,
    )
    return trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_level_tokenizer(VOCAB),
    )


def _dpo_trainer(model, reference, tmp_path):
    rows = [
        {
            "prompt": _text(range(3 + i, 8 + i)),
            "chosen": _text(range(8 + i, 12 + i)),
            "rejected": _text([50 + i, 40, 41 + i % 5]),
        }
        for i in range(8)
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=3,
    )
    return trl.DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_level_tokenizer(VOCAB),
    )


def _grpo_trainer(model, reference, tmp_path):
    def reward_counting(completions, **kwargs):
        return [float(len(set(c.split()))) for c in completions]

    rows = [{"prompt": _text(range(3 + i, 7 + i))} for i in range(8)]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=3,
    )
    return trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_counting,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_level_tokenizer(VOCAB),
    )


@pytest.mark.parametrize("make_trainer", [_sft_trainer, _dpo_trainer, _grpo_trainer], ids=["sft", "dpo", "grpo"])
def test_trls_trainers_log_and_train_the_same_with_fused_hybrid(make_trainer, tmp_path, monkeypatch):
    start = tiny_model("qwen2")
    runs, our_calls = {}, []
    ours = integration.FusedHybridLogProbFunction.apply
    monkeypatch.setattr(
        integration.FusedHybridLogProbFunction, "apply", staticmethod(lambda *a: our_calls.append(a[-1]) or ours(*a))
    )
    for name in ("trl", "fused-hybrid"):
        if name == "fused-hybrid":
            integration.install()
            monkeypatch.setattr(
                ChunkedLogProbFunction, "forward", staticmethod(lambda *a, **k: pytest.fail("TRL's own kernel ran"))
            )
        torch.manual_seed(0)
        AcceleratorState._reset_state(reset_partial_state=True)  # older accelerate keeps earlier trainers' precision
        trainer = make_trainer(copy.deepcopy(start), copy.deepcopy(start), tmp_path / name)
        assert trainer.accelerator.mixed_precision == "no"  # fp32 on both sides: the comparison is at 1e-5
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    (trl_logs, trl_weights), (our_logs, our_weights) = runs["trl"], runs["fused-hybrid"]
    assert our_calls and "log_probs" in our_calls[0]  # the trainer's head ran through fused-hybrid
    assert len(trl_logs) == len(our_logs) >= 2
    for theirs, ours in zip(trl_logs, our_logs):
        assert theirs.keys() == ours.keys()
        for key, value in theirs.items():
            if isinstance(value, float) and not any(clock in key for clock in ("time", "runtime", "per_second")):
                assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    moved = 0
    for key, value in trl_weights.items():
        assert_close_scaled(our_weights[key], value, 1e-5, key)
        moved += not torch.equal(value, start.state_dict()[key])
    assert moved > 0  # the steps trained something
