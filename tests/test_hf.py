"""The generic Hugging Face patch on tiny random-weight models of five families, under Trainer, TRL and PEFT."""

from __future__ import annotations

import pytest
import torch

import fused_hybrid
from tests.reference import assert_close_scaled

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "gemma2": (
        "Gemma2Config",
        dict(head_dim=8, final_logit_softcapping=5.0, attn_logit_softcapping=None, query_pre_attn_scalar=8),
    ),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    # logit multipliers under their families' names: HyperCLOVA X multiplies by logits_scaling, Granite divides
    "hyperclovax": ("HyperCLOVAXConfig", dict(logits_scaling=2.5, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(logits_scaling=4.0)),
}


def tiny_model(family: str):
    config_name, options = FAMILIES[family]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(**COMMON, **options)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).float()


def batch(vocab=97, size=3, length=11):
    input_ids = torch.randint(1, vocab, (size, length))
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[0, -2:] = -100
    return input_ids, labels


def word_level_tokenizer(vocab_size: int):
    """A tokenizer over the tokens t0..t{V-1} (t0 is padding), for trainers that insist on one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="t0", eos_token="t2", unk_token="t1"
    )


def loss_and_grads(model, input_ids, labels, **kwargs):
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=labels, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_loss_and_gradients_equal_the_models_own(family):
    model = tiny_model(family)
    input_ids, labels = batch()
    expected_loss, expected = loss_and_grads(model, input_ids, labels)
    fused_hybrid.patch_model(model)
    output = model(input_ids=input_ids, labels=labels)
    assert output.logits is None
    loss, got = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close_scaled(got[name], expected[name], 1e-4, name, atol=1e-7)
    # num_items_in_batch (the Trainer's global token count) is honoured like the model's own loss does
    fused_hybrid.unpatch_model(model)
    expected_sum, _ = loss_and_grads(model, input_ids, labels, num_items_in_batch=torch.tensor(50))
    fused_hybrid.patch_model(model)
    got_sum, _ = loss_and_grads(model, input_ids, labels, num_items_in_batch=torch.tensor(50))
    assert_close_scaled(got_sum, expected_sum, 1e-5, "loss with num_items_in_batch")


def test_generation_and_evaluation_are_unchanged():
    model = tiny_model("llama").eval()
    input_ids, labels = batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=labels)
        generated = model.generate(input_ids[:, :4], max_new_tokens=5, do_sample=False)
    fused_hybrid.patch_model(model)
    with torch.no_grad():
        got = model(input_ids=input_ids, labels=labels)
        assert torch.equal(model.generate(input_ids[:, :4], max_new_tokens=5, do_sample=False), generated)
    assert got.logits is not None and torch.allclose(got.loss, expected.loss)
    fused_hybrid.unpatch_model(model)
    assert not fused_hybrid.hf.is_patched(model)
    with pytest.raises(ValueError, match="not patched"):
        fused_hybrid.unpatch_model(model)


def test_patch_refuses_bad_targets():
    with pytest.raises(TypeError, match="transformers causal LM"):
        fused_hybrid.patch_model(torch.nn.Linear(3, 3))
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="objective must be one of"):
        fused_hybrid.patch_model(model, objective="ppo")
    fused_hybrid.patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        fused_hybrid.patch_model(model)


def test_dft_objective_matches_the_dft_loss():
    model = tiny_model("llama")
    input_ids, labels = batch()
    fused_hybrid.patch_model(model, objective="dft")
    loss = model(input_ids=input_ids, labels=labels).loss
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    expected = fused_hybrid.dft_loss(hidden[:, :-1], model.lm_head.weight, labels[:, 1:]).loss
    assert_close_scaled(loss, expected, 1e-6)


def test_hf_trainer_trains_a_patched_model(tmp_path):
    model = fused_hybrid.patch_model(tiny_model("llama"))
    sequences = torch.arange(8)[:, None] * 3 + torch.arange(16)[None, :]  # counting sequences: learnable
    data = [{"input_ids": (s % 90 + 1).tolist(), "labels": (s % 90 + 1).tolist()} for s in sequences.repeat(4, 1)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=12,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        gradient_accumulation_steps=2,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 10 and losses[-1] < losses[0]


def test_trl_sft_trainer_trains_a_patched_model(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model = fused_hybrid.patch_model(tiny_model("qwen2"))
    rows = [{"input_ids": [(i * 3 + t) % 90 + 1 for t in range(16)]} for i in range(32)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=10,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL < 1.16 defaults to bf16, which accelerate < 1.5 then keeps for every later trainer
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=word_level_tokenizer(97),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]


def test_peft_lora_model_with_a_frozen_head():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    input_ids, labels = batch()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    expected_loss, expected = loss_and_grads(lora, input_ids, labels)
    fused_hybrid.patch_model(lora)
    seen = []
    from fused_hybrid.engine import chunked

    original = chunked.statistics_and_gradients

    def recording(*args, **kwargs):
        seen.append(args[-1])  # needs: (hidden, weight, bias)
        return original(*args, **kwargs)

    chunked.statistics_and_gradients = recording
    try:
        loss, got = loss_and_grads(lora, input_ids, labels)
    finally:
        chunked.statistics_and_gradients = original
    assert seen == [(True, False, False)]  # dhidden only: the frozen head costs no dW work
    assert_close_scaled(loss, expected_loss, 1e-5)
    for name in expected:
        assert_close_scaled(got[name], expected[name], 1e-4, name, atol=1e-7)


def test_patched_loss_under_bf16_autocast():
    model = tiny_model("mistral")
    input_ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected = loss_and_grads(model, input_ids, labels)
        fused_hybrid.patch_model(model)
        loss, got = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 2e-2, "loss")
    for name in expected:
        assert_close_scaled(got[name], expected[name], 5e-2, name, atol=1e-4)


class ScaledLogitsLlama(transformers.LlamaForCausalLM):
    """A causal LM that scales its logits by a factor no config name tells."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden) * 1.5
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def test_an_unknown_logit_transform_is_refused_even_with_near_uniform_logits():
    config = transformers.LlamaConfig(**COMMON)
    model = ScaledLogitsLlama(config).float()  # fresh random weights: near-uniform logits
    with pytest.raises(fused_hybrid.hf.PatchMismatchError, match="ScaledLogitsLlama: its logits are f") as info:
        fused_hybrid.patch_model(model)
    assert "verify=False" in str(info.value)
    assert not fused_hybrid.hf.is_patched(model)


def test_a_config_value_the_model_does_not_apply_is_not_applied():
    """Llama ignores final_logit_softcapping; reading the transform back from the model keeps it out of the loss."""
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 0.5
    input_ids, labels = batch()
    expected_loss, _ = loss_and_grads(model, input_ids, labels)
    fused_hybrid.patch_model(model)
    loss, _ = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")


def test_moe_router_loss_is_part_of_the_patched_loss():
    config = transformers.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5
    )
    model = transformers.MixtralForCausalLM(config).float()
    input_ids, labels = batch()
    expected_loss, expected = loss_and_grads(model, input_ids, labels)
    model.config.output_router_logits = False
    without_router_loss, _ = loss_and_grads(model, input_ids, labels)
    assert abs(expected_loss - without_router_loss) > 0.1  # the coefficient 0.5 times a loss of about 2
    model.config.output_router_logits = True
    fused_hybrid.patch_model(model)
    loss, got = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")
    for name in expected:
        assert_close_scaled(got[name], expected[name], 1e-4, name, atol=1e-6)


def test_shift_labels_are_used_as_given():
    model = tiny_model("qwen2")
    input_ids, labels = batch()
    shift_labels = torch.randint(0, 97, labels.shape)  # already shifted (context parallelism hands them over)
    shift_labels[:, :2] = -100
    expected_loss, expected = loss_and_grads(model, input_ids, labels, shift_labels=shift_labels)
    fused_hybrid.patch_model(model)
    loss, got = loss_and_grads(model, input_ids, labels, shift_labels=shift_labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")
    for name in expected:
        assert_close_scaled(got[name], expected[name], 1e-4, name, atol=1e-7)


def test_only_labelled_tokens_reach_the_head(monkeypatch):
    from fused_hybrid.engine import chunked

    model = fused_hybrid.patch_model(tiny_model("llama"))
    input_ids, labels = batch()
    rows = []
    original = chunked.statistics_and_gradients
    monkeypatch.setattr(
        chunked,
        "statistics_and_gradients",
        lambda hidden, *a, **k: rows.append(hidden.shape[0]) or original(hidden, *a, **k),
    )
    model(input_ids=input_ids, labels=labels).loss.backward()
    assert rows == [int((labels[:, 1:] != -100).sum())]


def test_the_probe_runs_again_when_the_precision_changes(monkeypatch):
    calls = []
    original = fused_hybrid.hf.verify_patch
    monkeypatch.setattr(fused_hybrid.hf, "verify_patch", lambda fused: calls.append(1) or original(fused))
    model = fused_hybrid.patch_model(tiny_model("mistral"))
    input_ids, labels = batch()
    model(input_ids=input_ids, labels=labels).loss.backward()
    assert len(calls) == 1  # at patching; the first training call is in the same setting
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=input_ids, labels=labels).loss.backward()
    assert len(calls) == 2  # once more, on the first call under bf16 autocast


def test_patch_options_are_checked_when_patching_and_unmaterialised_models_need_verify_false():
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['label_smothing'\]"):
        fused_hybrid.patch_model(tiny_model("llama"), label_smothing=0.1)
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['lable_smoothing'\].*'backend'"):
        fused_hybrid.patch_model(tiny_model("llama"), objective="dft", lable_smoothing=0.1)
    fused_hybrid.unpatch_model(fused_hybrid.patch_model(tiny_model("llama"), objective="dft", backend="torch"))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    with pytest.raises(fused_hybrid.hf.PatchMismatchError, match="not materialised.*verify=False"):
        fused_hybrid.patch_model(model)
    assert fused_hybrid.hf.is_patched(fused_hybrid.patch_model(model, verify=False))


def test_a_tuple_output_keeps_the_models_positions():
    """return_dict=False: (loss, None where the logits would be, then the rest in the model's own order)."""
    model = tiny_model("llama")
    input_ids, labels = batch()
    options = dict(return_dict=False, use_cache=False, output_hidden_states=True)
    own = model(input_ids=input_ids, labels=labels, **options)
    fused_hybrid.patch_model(model)
    fused = model(input_ids=input_ids, labels=labels, **options)
    assert len(fused) == len(own) and fused[1] is None and own[1].shape[-1] == 97
    assert_close_scaled(fused[0], own[0], 1e-5, "loss")
    for got, want in zip(fused[2], own[2]):  # the hidden states of every layer
        torch.testing.assert_close(got, want)


def column_scaled_model():
    """A tiny Dory model (its head multiplies each logit column by a learned scale), the scales spread out."""
    if not hasattr(transformers, "DoryConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Dory family")
    from tests import model_zoo

    model = model_zoo.tiny_causal_lm("dory")
    with torch.no_grad():
        model.lm_head.logit_scale.mul_(torch.rand_like(model.lm_head.logit_scale) * 1.5 + 0.25)
    return model


def test_a_column_scaled_head_is_fused_with_its_scale_and_its_scales_gradient():
    model = column_scaled_model()
    input_ids, labels = batch(vocab=model.config.vocab_size)
    expected_loss, expected = loss_and_grads(model, input_ids, labels)
    fused_hybrid.patch_model(model)
    loss, got = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")
    assert "lm_head.logit_scale" in got and got.keys() == expected.keys()
    for name in expected:
        assert_close_scaled(got[name], expected[name], 1e-4, name, atol=1e-7)


def test_a_head_with_a_forward_of_its_own_is_refused_naming_what_it_is():
    class OffsetHead(torch.nn.Linear):
        def forward(self, hidden):
            return super().forward(hidden) + 1.0

    model = tiny_model("llama")
    model.lm_head = OffsetHead(32, 97, bias=False)
    with pytest.raises(
        fused_hybrid.hf.UnsupportedHeadError,
        match=r"LlamaForCausalLM.*OffsetHead, a subclass of "
        r"nn.Linear with a forward of its own",
    ) as refused:
        fused_hybrid.patch_model(model)
    assert "LoRA" not in str(refused.value) and not fused_hybrid.hf.is_patched(model)


class OperandDtypeHead(torch.nn.Linear):
    """A head that only picks dtypes (as transformers' ErgoLinearWithFP32Output): both operands rounded to the
    weight's (or the input's) dtype, multiplied with autocast off, fp32 logits."""

    def __init__(self, *args, operands: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.operands = operands

    def forward(self, hidden):
        dtype = self.weight.dtype if self.operands == "weight" else hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.to(dtype).float(), self.weight.to(dtype).float())


@pytest.mark.parametrize("operands", ["weight", "input"])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_head_that_only_picks_its_dtypes_is_fused_in_them(operands, autocast):
    """Under bf16 autocast an fp32 model's operand-dtype head computes in fp32 (or in the bf16 hidden states' dtype),
    not in autocast's bf16: the fused loss follows it to fp32 rounding; outside autocast, the same."""
    model = tiny_model("llama")
    head = OperandDtypeHead(32, 97, bias=False, operands=operands)
    head.weight = model.lm_head.weight
    model.lm_head = head
    input_ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected_loss, expected = loss_and_grads(model, input_ids, labels)
        fused_hybrid.patch_model(model)
        assert fused_hybrid.hf.head_transform(model).operands == operands
        loss, got = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")  # bf16 logits would be ~1e-3 off
    # autocast's bf16 backward below the head rounds the two runs' fp32-close gradients apart
    for name in expected:
        assert_close_scaled(got[name], expected[name], 5e-2 if autocast else 1e-4, name, atol=1e-7)


@pytest.mark.parametrize("chunk, axial", [(8, None), (4, (4, 4))])
def test_the_probe_takes_a_length_the_model_accepts_in_training(chunk, axial):
    """Reformer trains only on sequences that are a multiple of its chunk lengths (and exactly as long as its
    axial position grid): the probe must run on such a length, so that verify=True patches it. Local attention only:
    LSH attention hashes with a seed drawn afresh on every training forward, so no two runs of the model agree."""
    grid = dict(axial_pos_embds=True, axial_pos_shape=axial, axial_pos_embds_dim=(8, 8)) if axial else {}
    grid.setdefault("axial_pos_embds", False)
    config = transformers.ReformerConfig(
        vocab_size=61,
        hidden_size=16,
        attention_head_size=8,
        num_attention_heads=2,
        feed_forward_size=32,
        attn_layers=["local", "local"],
        lsh_attn_chunk_length=chunk,
        local_attn_chunk_length=chunk,
        num_buckets=2,
        is_decoder=True,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        **grid,
    )
    model = transformers.ReformerModelWithLMHead(config).train()
    length = fused_hybrid.hf.probe_length(model)
    assert length == 16 and length % chunk == 0
    input_ids = torch.randint(0, 61, (2, length))
    labels = input_ids.clone()
    labels[:, :3] = -100
    expected_loss, _ = loss_and_grads(model, input_ids, labels)
    fused_hybrid.patch_model(model)  # verify=True
    loss, _ = loss_and_grads(model, input_ids, labels)
    assert_close_scaled(loss, expected_loss, 1e-5, "loss")
