"""The thin trainer: every mode learns something on CPU, checkpoints are atomic and resumable, bad input is named."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fused_hybrid.cli import main as cli_main  # noqa: E402
from fused_hybrid.demo import run_demo, save_model  # noqa: E402
from fused_hybrid.objectives.chord import trainer_mu  # noqa: E402
from fused_hybrid.trainer import ConfigError, HybridTrainer, UserError, load_config  # noqa: E402
from fused_hybrid.trainer.data import DataError  # noqa: E402
from fused_hybrid.trainer.rewards import RewardError  # noqa: E402

TINY = "{hidden_size: 48, intermediate_size: 96, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2}"


def starts_with_seven(prompts, completions, **_):
    """A reward a policy learns in a few steps: 1 when the completion starts with '7'."""
    return [float(c.startswith("7")) for c in completions]


def raises(prompts, completions, **_):
    raise KeyError("no such field")


def wrong_length(prompts, completions, **_):
    return [1.0]


def config(tmp_path, mode, *extra):
    return load_config(
        None,
        [
            f"mode={mode}",
            f"output_dir={tmp_path / mode}",
            f"model.tiny={TINY}",
            "data.synthetic_size=400",
            "data.eval_size=16",
            "optim.batch_size=16",
            "optim.learning_rate=3e-3",
            "optim.warmup_steps=2",
            "optim.max_steps=25",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "rollout.max_new_tokens=3",
            "log_every=1",
            "eval_every=100",
            "save_every=100",
            *extra,
        ],
    )


def early_late(history, key):
    values = [h[key] for h in history if key in h]
    return sum(values[:4]) / 4, sum(values[-4:]) / 4


@pytest.mark.parametrize(
    "mode, key, extra",
    [
        ("sft", "loss", "model.gradient_checkpointing=true"),
        ("dft", "sft_loss", ""),
        ("ift", "loss", ""),
        ("minor_sft", "loss", ""),
    ],
)
def test_supervised_modes_learn(tmp_path, mode, key, extra):
    history = HybridTrainer(
        config(tmp_path, mode, "optim.grad_accum=2", *filter(None, [extra])), progress=False
    ).train()
    early, late = early_late(history, key)
    assert late < early, f"{mode}: {key} went from {early:.3f} to {late:.3f}"
    assert (tmp_path / mode / "curves.png").is_file() and (tmp_path / mode / "metrics.jsonl").is_file()


@pytest.mark.parametrize("mode", ["grpo", "cispo", "gmpo", "chord"])
def test_rollout_modes_raise_the_reward(tmp_path, mode):
    trainer = HybridTrainer(
        config(
            tmp_path,
            mode,
            "objective.reward=tests.test_trainer.starts_with_seven",
            "objective.mu=0.2",
            "optim.max_steps=30",
            "rollout.temperature=1.0",
            "optim.learning_rate=1e-2",
        ),
        progress=False,
    )
    history = trainer.train()
    early, late = early_late(history, "reward")
    assert late > early + 0.2, f"{mode}: reward went from {early:.2f} to {late:.2f}"
    if mode == "chord":
        assert all(h["mu"] == pytest.approx(0.2) for h in history if "mu" in h)


# every loss type of the grpo mode, and its options on top (the sampler correction with the log-probs the sampler
# recorded during generation)
@pytest.mark.parametrize(
    "settings",
    [
        ["objective.loss_type=grpo"],
        ["objective.loss_type=bnpo"],
        ["objective.loss_type=dr_grpo"],
        ["objective.loss_type=cispo"],
        ["objective.loss_type=sapo"],
        ["objective.loss_type=luspo"],
        ["objective.loss_type=vespo", "objective.sampler_correction=token_mask", "objective.sampler_clip_min=0.5"],
        ["objective.delta=1.5", "objective.top_entropy_quantile=0.5", "objective.sampler_correction=token_truncate"],
        [
            "objective.importance_sampling=sequence",
            "objective.off_policy_mask_threshold=0.5",
            "objective.sampler_correction=sequence_mask",
            "objective.beta=0.02",
            "objective.use_bias_correction_kl=true",
        ],
    ],
    ids=lambda settings: "+".join(s.split("=")[-1] for s in settings),
)
def test_grpo_loss_types_raise_the_reward(tmp_path, settings):
    trainer = HybridTrainer(
        config(
            tmp_path,
            "grpo",
            "objective.reward=tests.test_trainer.starts_with_seven",
            "optim.max_steps=30",
            "optim.learning_rate=1e-2",
            *settings,
        ),
        progress=False,
    )
    history = trainer.train()
    early, late = early_late(history, "reward")
    assert late > early + 0.2, f"{settings}: reward went from {early:.2f} to {late:.2f}"
    if trainer.config.objective.sampler_correction is not None:
        # the sampler is the policy itself here: the sampler's log-probs are the trainer's up to rounding
        ratios = [h["sampler_ratio"] for h in history if "sampler_ratio" in h]
        assert ratios and all(abs(r - 1) < 1e-3 for r in ratios), ratios


@pytest.mark.parametrize("temperature", [0.5, 1.3])
@pytest.mark.parametrize("generation_config", [{}, {"top_p": 0.5, "top_k": 3, "repetition_penalty": 1.5}])
def test_the_sampler_and_the_loss_see_the_same_distribution(tmp_path, temperature, generation_config):
    """At a sampling temperature other than 1, and with a model whose generation_config would truncate or penalise
    the sampler's distribution: the log-prob the sampler recorded for each drawn token is the one the loss's logits
    give it (the rollout policy's old_logp, at the same temperature), so the sampler correction's ratio is 1."""
    trainer = HybridTrainer(
        config(
            tmp_path,
            "grpo",
            f"rollout.temperature={temperature}",
            "objective.sampler_correction=token_truncate",
            "optim.max_steps=1",
        ),
        progress=False,
    )
    for name, value in generation_config.items():
        setattr(trainer.model.generation_config, name, value)
    micro, _, _, _ = trainer.step_batches(torch.Generator().manual_seed(0))
    for batch in micro:
        drawn = batch["labels"][:, 1:] != -100
        assert drawn.any() and batch["sampler_logp"][drawn].isfinite().all()
        gap = (batch["old_logp"][drawn] - batch["sampler_logp"][drawn]).abs().max().item()
        assert gap < 1e-4, f"old_logp and the sampler's log-probs differ by {gap:.3g}"
    assert trainer.train_step()["sampler_ratio"] == pytest.approx(1.0, abs=1e-4)


def test_a_sampling_temperature_is_refused_for_a_soft_capped_model():
    from fused_hybrid.hf import HeadTransform
    from fused_hybrid.trainer.model import sampled_logit_options

    assert sampled_logit_options(HeadTransform(temperature=2.0), 0.5) == {"temperature": 1.0, "softcap": None}
    assert sampled_logit_options(HeadTransform(softcap=30.0), 1.0) == {"temperature": 1.0, "softcap": 30.0}
    with pytest.raises(ConfigError, match=r"rollout.temperature: 0.7 .*soft-capped"):
        sampled_logit_options(HeadTransform(softcap=30.0), 0.7)


# A random teacher with large weights: peaked next-token distributions, far from a fresh student's near-uniform ones.
PEAKED_TEACHER = (
    "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, "
    "initializer_range: 1.0}"
)


# on-policy with the reverse KL (mode-seeking, on the student's samples), off-policy with the forward KL (classic KD)
@pytest.mark.parametrize("policy, beta", [("on", 1.0), ("off", 0.0)])
def test_distill_brings_the_student_to_its_teacher(tmp_path, policy, beta):
    history = HybridTrainer(
        config(
            tmp_path,
            "distill",
            f"teacher.tiny={PEAKED_TEACHER}",
            f"objective.distill_policy={policy}",
            f"objective.distill_beta={beta}",
            "optim.grad_accum=2",
            "optim.learning_rate=1e-2",
            "optim.max_steps=40",
        ),
        progress=False,
    ).train()
    early, late = early_late(history, "divergence")
    assert late < 0.6 * early, f"distill {policy}-policy: divergence went from {early:.3f} to {late:.3f}"
    assert "reward" not in history[-1]  # on-policy distillation samples without a reward
    assert (tmp_path / "distill" / "curves.png").is_file()


def sevens_file(folder):
    """Addition prompts all answered "7": a task a tiny model learns in a few SFT steps."""
    rows = [{"prompt": f"{a}+{b}=", "response": "7", "answer": "7"} for a in range(20) for b in range(10)]
    path = folder / "sevens.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sevens_teacher(tmp_path_factory):
    """(a tiny model folder that answers sevens_file's prompts with "7", that data file)."""
    folder = tmp_path_factory.mktemp("teacher")
    data = sevens_file(folder)
    trainer = HybridTrainer(
        config(folder, "sft", f"data.path={data}", "optim.max_steps=15", "optim.learning_rate=1e-2"), progress=False
    )
    for _ in range(15):
        trainer.train_step()
    assert trainer.evaluate()["accuracy"] == 1.0
    save_model(trainer, folder / "model")
    return folder / "model", data


@pytest.mark.parametrize("policy", ["on", "off"])
def test_distill_from_a_saved_teacher_raises_the_accuracy(tmp_path, sevens_teacher, policy):
    teacher, data = sevens_teacher
    trainer = HybridTrainer(
        config(
            tmp_path,
            "distill",
            f"data.path={data}",
            f"teacher.path={teacher}",
            f"objective.distill_policy={policy}",
            "optim.max_steps=20",
            "optim.learning_rate=1e-2",
            "eval_every=20",
        ),
        progress=False,
    )
    history = trainer.train()
    before, after = history[0]["accuracy"], history[-1]["accuracy"]
    assert after > before + 0.5, f"distill {policy}-policy: accuracy went from {before:.2f} to {after:.2f}"
    early, late = early_late(history, "divergence")
    assert late < early


def saved_tiny_model(folder, characters, rows=None):
    """A tiny Llama folder (random weights) with the character tokenizer of `characters` and a head of `rows` rows
    (the tokenizer's size by default)."""
    import transformers

    from fused_hybrid.trainer.text import CharTokenizer

    tokenizer = CharTokenizer(characters)
    model_config = transformers.LlamaConfig(
        vocab_size=rows or len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True)
    transformers.AutoModelForCausalLM.from_config(model_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "characters, rows, words",
    [
        (
            "0123456789-=",
            None,
            "the teacher's tokenizer is not the student's (15 tokens there, 15 here; '+' is absent there, id 13 here",
        ),
        ("0123456789+=", 18, "the teacher's LM head has 18 vocabulary entries, the student's 15"),
    ],
)
def test_a_teacher_with_another_vocabulary_is_refused_before_training(tmp_path, characters, rows, words):
    teacher = saved_tiny_model(tmp_path / "teacher", characters, rows)
    with pytest.raises(ConfigError, match="^teacher.path: ") as error:
        HybridTrainer(config(tmp_path, "distill", f"teacher.path={teacher}"), progress=False)
    assert words in str(error.value) and "the teacher needs the student's vocabulary" in str(error.value)
    assert not (tmp_path / "distill").exists()


def test_a_distill_config_names_its_teacher(tmp_path):
    with pytest.raises(ConfigError, match="teacher: mode 'distill' learns from a teacher: set teacher.path"):
        config(tmp_path, "distill")
    with pytest.raises(ConfigError, match="give teacher.path or teacher.tiny, not both"):
        config(tmp_path, "distill", f"teacher.tiny={TEACHER}", f"teacher.path={tmp_path}")
    with pytest.raises(ConfigError, match="objective.distill_policy: 'both' is not one of the allowed values: on, off"):
        config(tmp_path, "distill", f"teacher.tiny={TEACHER}", "objective.distill_policy=both")
    with pytest.raises(ConfigError, match="objective.distill_beta: 1.5 is out of range; allowed: >= 0 and <= 1"):
        config(tmp_path, "distill", f"teacher.tiny={TEACHER}", "objective.distill_beta=1.5")
    # on-policy distillation needs prompts only; off-policy the demonstrations' responses too
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(40)))
    HybridTrainer(config(tmp_path, "distill", f"teacher.tiny={TEACHER}", f"data.path={path}"), progress=False)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['response'\]"):
        HybridTrainer(
            config(tmp_path, "distill", f"teacher.tiny={TEACHER}", f"data.path={path}", "objective.distill_policy=off"),
            progress=False,
        )


def preference_file(folder):
    """A JSONL of addition prompts with the right sum chosen and a wrong one rejected."""
    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": f"99{a}"} for a in range(20) for b in range(5)]
    path = folder / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_learns_preferences_from_jsonl(tmp_path):
    path = preference_file(tmp_path)
    history = HybridTrainer(
        config(tmp_path, "dpo", f"data.path={path}", "optim.grad_accum=2", "objective.beta=0.5"), progress=False
    ).train()
    early, late = early_late(history, "loss")
    assert late < early
    assert early_late(history, "reward_accuracy")[1] > 0.6


@pytest.mark.parametrize("mode, extra", [("orpo", []), ("cpo", ["objective.cpo_label_smoothing=0.1"])])
def test_odds_ratio_and_contrastive_preferences_learn_from_jsonl(tmp_path, mode, extra):
    path = preference_file(tmp_path)
    history = HybridTrainer(
        config(
            tmp_path,
            mode,
            f"data.path={path}",
            "optim.grad_accum=2",
            "objective.beta=0.5",
            "optim.max_steps=12",
            *extra,
        ),
        progress=False,
    ).train()
    early, late = early_late(history, "loss")
    assert late < early
    assert early_late(history, "reward_accuracy")[1] > 0.6


def unpaired_file(folder, *, labels=True):
    """The preference rows unpaired, as KTO data: each right sum desirable, each wrong one undesirable."""
    rows = [
        {"prompt": f"{a}+{b}=", "response": response, "label": label if labels else int(label)}
        for a in range(20)
        for b in range(5)
        for response, label in ((str(a + b), True), (f"99{a}", False))
    ]
    path = folder / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_learns_from_unpaired_labels(tmp_path):
    path = unpaired_file(tmp_path)
    history = HybridTrainer(
        config(tmp_path, "kto", f"data.path={path}", "optim.grad_accum=2", "objective.beta=0.5", "optim.max_steps=12"),
        progress=False,
    ).train()
    early, late = early_late(history, "loss")
    assert late < early
    assert early_late(history, "reward_accuracy")[1] > 0.6
    last = history[-1]
    assert last["reward_chosen"] > last["reward_rejected"]
    assert all(h["kl"] >= 0 for h in history if "kl" in h)


def test_kto_names_a_label_that_is_not_a_bool(tmp_path):
    path = unpaired_file(tmp_path, labels=False)
    with pytest.raises(DataError, match="column 'label' holds 1; expected true"):
        HybridTrainer(config(tmp_path, "kto", f"data.path={path}"), progress=False)


# The same two steps at grad_accum 1, 2 and 4. Rollouts of up to 8 tokens end at different lengths (so that the
# token-mean policy loss is not 0); CHORD with 3 expert rows among 19, so that some micro-batches hold none;
# distillation on- and off-policy, with a JSD, a temperature and a hard term.
ROLLOUT_EXTRA = [
    "objective.reward=tests.test_trainer.starts_with_seven",
    "rollout.temperature=1.0",
    "rollout.max_new_tokens=8",
]
TEACHER = (
    "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"
)
ACCUMULATED_RUNS = {
    "grpo": ("grpo", ROLLOUT_EXTRA),
    "chord": ("chord", [*ROLLOUT_EXTRA, "objective.mu=0.3", "optim.batch_size=3"]),
    "dpo": ("dpo", ["objective.beta=0.5", "optim.batch_size=8"]),
    "orpo": ("orpo", ["objective.beta=0.5", "optim.batch_size=8"]),
    "cpo": ("cpo", ["objective.beta=0.5", "objective.cpo_label_smoothing=0.1", "optim.batch_size=8"]),
    # 7 rows: micro-batches with different counts of desirable and undesirable rows
    "kto": ("kto", ["objective.beta=0.5", "objective.undesirable_weight=1.5", "optim.batch_size=7"]),
    "distill-on": (
        "distill",
        [
            "rollout.max_new_tokens=8",
            f"teacher.tiny={TEACHER}",
            "objective.distill_beta=1.0",
            "objective.hard_weight=0.3",
        ],
    ),
    "distill-off": (
        "distill",
        [
            f"teacher.tiny={TEACHER}",
            "objective.distill_policy=off",
            "objective.distill_beta=0.5",
            "objective.distill_temperature=2.0",
            "objective.hard_weight=0.3",
            "optim.batch_size=8",
        ],
    ),
}


def comparable(metrics):
    """Every logged value of a step but the wall-clock throughput."""
    return {k: v for k, v in metrics.items() if k != "tokens_per_s"}


@pytest.mark.parametrize("run", sorted(ACCUMULATED_RUNS))
def test_logged_metrics_do_not_depend_on_grad_accum(tmp_path, run):
    """Micro-batches are one batch cut in parts: each step logs what the whole batch would (the loss parts already
    divided by the step's counts summed, the local means weighted by their counts), whatever grad_accum."""
    mode, extra = ACCUMULATED_RUNS[run]
    extra = list(extra)
    if mode in ("dpo", "orpo", "cpo"):
        extra.append(f"data.path={preference_file(tmp_path)}")
    if mode == "kto":
        extra.append(f"data.path={unpaired_file(tmp_path)}")
    runs = {}
    for accum in (1, 2, 4):
        trainer = HybridTrainer(
            config(tmp_path / f"accum{accum}", mode, f"optim.grad_accum={accum}", *extra), progress=False
        )
        runs[accum] = [comparable(trainer.train_step()) for _ in range(2)]
    whole = runs[1]
    logged = set(whole[0]) - {"step", "lr", "grad_norm", "loss", "reward"}
    assert logged and logged <= set(whole[1]), f"{run} logs no objective metric"
    for accum in (2, 4):
        for step, (got, want) in enumerate(zip(runs[accum], whole), start=1):
            assert set(got) == set(want)
            for key in want:
                # abs: after a step, the weights differ by the rounding of the micro-batches' sums; a reward is a
                # difference of two sums of log-probs (tens of nats each) that this rounding reaches
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (
                    f"{run} step {step} {key}: {got[key]} at grad_accum={accum}, {want[key]} at grad_accum=1"
                )


def test_resume_gives_the_state_of_an_uninterrupted_run(tmp_path):
    extra = [
        "objective.reward=tests.test_trainer.starts_with_seven",
        "optim.max_steps=6",
        "save_every=3",
        "objective.mu_decay_steps=10",
        "optim.grad_accum=2",
    ]
    straight = HybridTrainer(config(tmp_path / "a", "chord", *extra), progress=False)
    straight.train()

    interrupted = HybridTrainer(config(tmp_path / "b", "chord", *extra), progress=False)
    original_step = interrupted.train_step

    def crash_after_step_four():
        if interrupted.step == 4:  # killed one step after the checkpoint at step 3
            raise KeyboardInterrupt
        return original_step()

    interrupted.train_step = crash_after_step_four
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = HybridTrainer(config(tmp_path / "b", "chord", *extra), progress=False)
    schedule = trainer_mu(straight.config.objective)
    assert resumed.step == 3 and resumed.objective_options()["mu"] == pytest.approx(schedule(3))
    resumed.train()
    assert resumed.step == straight.step == 6
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    marker = json.loads((tmp_path / "b" / "chord" / "checkpoint-0000006" / "fused_hybrid_checkpoint.json").read_text())
    assert marker["step"] == 6 and marker["options"]["mu"] == pytest.approx(schedule(6))
    logged = [h["step"] for h in resumed.history if "loss" in h]
    assert logged == sorted(set(logged)) == list(range(1, 7))


def test_a_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    trainer = HybridTrainer(config(tmp_path, "sft", "optim.max_steps=2", "save_every=1"), progress=False)
    trainer.train_step()
    good = trainer.save_checkpoint()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    trainer.train_step()
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "sft").glob("checkpoint-*")] == [good.name]
    assert HybridTrainer(config(tmp_path, "sft"), progress=False).step == 1


def test_a_foreign_checkpoint_folder_is_refused(tmp_path):
    (tmp_path / "sft" / "checkpoint-0000100").mkdir(parents=True)
    with pytest.raises(UserError, match="not a fused-hybrid checkpoint"):
        HybridTrainer(config(tmp_path, "sft"), progress=False)


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "1+1=", "response": "2"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prompt'\]"):
        HybridTrainer(config(tmp_path, "sft", f"data.path={path}"), progress=False)


def test_a_prompt_longer_than_max_length_is_dropped_once_with_a_warning(tmp_path, caplog):
    rows = [{"prompt": "1" * 40, "response": "2"}] + [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(50)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="fused_hybrid.trainer"):
        trainer = HybridTrainer(
            config(tmp_path, "sft", f"data.path={path}", "data.max_length=20", "optim.batch_size=40"), progress=False
        )
    assert "skipping 1 of" in caplog.text and "data.max_length=20" in caplog.text
    assert "1" * 40 not in list(trainer.train_rows["prompt"])
    for _ in range(2):
        trainer.train_step()


@pytest.mark.parametrize(
    "reward, words",
    [
        ("tests.test_trainer.raises", "raised KeyError"),
        ("tests.test_trainer.wrong_length", "returned 1 rewards for 16"),
        ("tests.nowhere.reward", "cannot be imported"),
    ],
)
def test_bad_reward_functions_are_named(tmp_path, reward, words):
    with pytest.raises((RewardError, ValueError), match=words):
        HybridTrainer(config(tmp_path, "grpo", f"objective.reward={reward}"), progress=False).train_step()


def test_cli_train_reads_yaml_and_toml_and_names_config_errors(tmp_path, capsys):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        f"mode: sft\noutput_dir: {tmp_path / 'yaml'}\nmodel:\n  tiny: {TINY}\noptim:\n  max_steps: 2\n"
        "data:\n  synthetic_size: 100\n"
    )
    cli_main(["train", str(yaml_path), "--set", "optim.batch_size=4"])
    assert (tmp_path / "yaml" / "checkpoint-0000002").is_dir()
    toml_path = tmp_path / "run.toml"
    toml_path.write_text(
        f'mode = "dft"\noutput_dir = "{tmp_path / "toml"}"\n[optim]\nmax_steps = 1\nbatch_size = 4\n'
        "[data]\nsynthetic_size = 100\n"
    )
    cli_main(["train", str(toml_path), "--set", f"model.tiny={TINY}"])
    assert (tmp_path / "toml" / "checkpoint-0000001").is_dir()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", str(yaml_path), "--set", "optim.lr=3"])
    assert exit_info.value.code == 2
    assert "unknown key 'optim.lr'; allowed keys here: learning_rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="mode: 'ppo' is not one of the allowed values: chord, cispo, cpo, dft"):
        load_config(yaml_path, ["mode=ppo"])
    with pytest.raises(ConfigError, match="optim.max_steps: expected an integer"):
        load_config(yaml_path, ["optim.max_steps=many"])


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_demo_runs_end_to_end_and_restores_its_base_and_teacher_models(tmp_path, capsys):
    from fused_hybrid.demo import METHODS, METRICS, label

    out = run_demo(tmp_path / "report", steps=4, progress=False, base_steps=6, seeds=1, teacher_steps=3)
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["methods"]) == set(METHODS) and summary["base_steps"] == 6
    assert summary["teacher"]["steps"] == 3 and 0.0 <= summary["teacher"]["new_task_accuracy"] <= 1.0
    for method in METHODS:
        for key in METRICS:
            value = summary["methods"][method][key]["mean"]
            assert 0.0 <= value <= (1.0 if "accuracy" in key else 10.0), (method, key)
    large = summary["memory"]["vocab_128256"]
    assert large["materialised_bytes"] == 2 * summary["memory"]["tokens"] * 128256 * 4
    text = (out / "metrics.md").read_text()
    assert all(f"| {label(method)} |" in text for method in METHODS) and "128,256" in text
    assert "| distill (on-policy, from a teacher trained on both tasks) |" in text
    assert "The distillation row learns from a teacher the other rows do not have" in text
    assert all((out / f"{key}.png").stat().st_size > 0 for key in METRICS)
    stamps = [(out / f"{name}-model" / f"demo_{name}.json").read_text() for name in ("base", "teacher")]
    capsys.readouterr()
    run_demo(out, steps=2, progress=False, base_steps=6, seeds=1, methods=("sft", "distill"), teacher_steps=3)
    printed = capsys.readouterr().out
    assert "base model restored" in printed and "teacher model restored" in printed
    assert [(out / f"{name}-model" / f"demo_{name}.json").read_text() for name in ("base", "teacher")] == stamps


def test_prompts_go_through_the_chat_template_when_the_tokenizer_has_one():
    from fused_hybrid.trainer.text import prompt_ids
    from tests.test_hf import word_level_tokenizer

    tokenizer = word_level_tokenizer(20)
    plain = prompt_ids(tokenizer, "t5 t6")
    assert plain == [5, 6]
    tokenizer.chat_template = (
        "{% for m in messages %}t3 {{ m['content'] }} t4{% endfor %}{% if add_generation_prompt %} t7{% endif %}"
    )
    assert prompt_ids(tokenizer, "t5 t6") == [3, 5, 6, 4, 7]


def test_no_training_row_repeats_an_evaluation_prompt(tmp_path):
    """2-digit addition has 10,000 problems: 400 random rows repeat some; the held-out ones must not be trained on."""
    trainer = HybridTrainer(
        config(tmp_path, "sft", "data.synthetic_size=3000", "data.synthetic_digits=1", "data.eval_size=50"),
        progress=False,
    )
    held_out = set(trainer.eval_rows["prompt"])
    assert held_out and not held_out & set(trainer.train_rows["prompt"])
    assert len(trainer.train_rows) > 0
