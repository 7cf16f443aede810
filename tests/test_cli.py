"""The `fused-hybrid` command as a careless user meets it: every bad value, data file and output folder gets one
clear line naming it and a non-zero exit, with no traceback and no half-written run folder; resumes never mix
runs; Ctrl-C saves and says how to resume; a finished run says so."""

from __future__ import annotations

import json
import signal

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from fused_hybrid.cli import main as cli_main  # noqa: E402
from fused_hybrid.trainer import HybridTrainer  # noqa: E402

TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2}"


def run_cli(tmp_path, capsys, *overrides, mode="sft", config_text=None):
    """(exit code, stderr, stdout) of `fused-hybrid train` on a small config in tmp_path."""
    path = tmp_path / "run.yaml"
    path.write_text(config_text or f"mode: {mode}\noutput_dir: {tmp_path / 'run'}\n")
    arguments = [
        f"model.tiny={TINY}",
        "data.synthetic_size=80",
        "data.eval_size=8",
        "optim.batch_size=8",
        "optim.max_steps=3",
        "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=3",
        "log_every=1",
        "eval_every=100",
        "save_every=2",
        *overrides,
    ]
    code = 0
    try:
        cli_main(["train", str(path), *[item for a in arguments for item in ("--set", a)]])
    except SystemExit as error:
        code = error.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.max_steps=-5", "optim.max_steps: -5 is out of range; allowed: >= 1"),
        ("optim.grad_accum=0", "optim.grad_accum: 0 is out of range; allowed: >= 1"),
        ("optim.batch_size=0", "optim.batch_size: 0 is out of range; allowed: >= 1"),
        ("data.max_length=0", "data.max_length: 0 is out of range; allowed: >= 2"),
        ("rollout.group_size=0", "rollout.group_size: 0 is out of range; allowed: >= 2"),
        ("rollout.group_size=1", "every group-normalised advantage would be 0"),
        ("rollout.temperature=0", "rollout.temperature: 0.0 is out of range; allowed: > 0"),
        ("optim.learning_rate=-1e-3", "optim.learning_rate: -0.001 is out of range; allowed: > 0"),
        ("objective.mu=1.5", "objective.mu: 1.5 is out of range; allowed: >= 0 and <= 1"),
        ("optim.grad_accum=9", "optim.grad_accum: 9 micro-batches for 8 sequences per step"),
        ("model.path=no/such/model", "model.path: 'no/such/model': no such folder"),
        ("objective.reward=nowhere.reward", "objective.reward 'nowhere.reward' cannot be imported"),
        ("model.tiny.hidden_sise=32", "unknown key 'model.tiny.hidden_sise'; allowed keys here: hidden_size,"),
        ("model.tiny.hidden_size=30", "model.tiny.hidden_size: 30 is not a multiple of num_attention_heads 4"),
        ("model.tiny.num_hidden_layers=0", "model.tiny.num_hidden_layers: 0 is out of range; allowed: >= 1"),
    ],
)
def test_bad_values_are_named_in_one_line(tmp_path, capsys, override, words):
    code, err, _ = run_cli(tmp_path, capsys, override, mode="grpo")
    assert code == 2 and words in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # no half-written run folder


def test_a_partial_tiny_model_setting_keeps_the_other_defaults(tmp_path):
    """--set model.tiny.hidden_size=32 changes that key only (not the whole model.tiny, which would leave the others
    to LlamaConfig's 7B-sized defaults); teacher.tiny merges into the same defaults."""
    from fused_hybrid.trainer import load_config
    from fused_hybrid.trainer.config import TinyModelConfig
    from fused_hybrid.trainer.model import tiny_llama
    from fused_hybrid.trainer.text import CharTokenizer

    config = load_config(None, [f"model.tiny={TINY}", "model.tiny.hidden_size=64", "teacher.tiny.num_hidden_layers=3"])
    assert config.model.tiny == TinyModelConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
    )
    assert config.teacher.tiny == TinyModelConfig(num_hidden_layers=3)
    tokenizer = CharTokenizer("0123456789")
    model = tiny_llama(config, config.model.tiny, tokenizer, len(tokenizer))
    built = model.config
    assert (built.hidden_size, built.intermediate_size, built.num_hidden_layers) == (64, 64, 1)


@pytest.mark.parametrize(
    "text, words",
    [
        (
            "mode: sft\noptim:\n  max_steps: 3\n  max_steps: 5\n",
            "line 4: not valid YAML: the key 'max_steps' is given twice",
        ),
        ("mode: sft\nmode: dpo\n", "line 2: not valid YAML: the key 'mode' is given twice"),
        ("mode: sft\noptim: [1, 2\nseed: 1\n", "line 3: not valid YAML: expected ',' or ']'"),
    ],
)
def test_a_malformed_or_ambiguous_yaml_file_is_named_in_one_line(tmp_path, capsys, text, words):
    code, err, _ = run_cli(tmp_path, capsys, config_text=text)
    assert code == 2 and f"run.yaml', {words}" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "content, words",
    [
        ("", "no rows (the file is empty)"),
        ('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": \n', "line 2: not valid JSON"),
        ('{"prompt": "1+1=", "response": 2}\n', "row 1: column 'response' holds 2; expected text"),
        ('{"prompt": null, "response": "2"}\n', "row 1: column 'prompt' holds None; expected text"),
        ('["1+1=", "2"]\n', "row 1: expected an object with named columns"),
        ('{"question": "1+1=", "response": "2"}\n', "lacks the column(s) ['prompt']"),
    ],
)
def test_data_problems_are_named_in_one_line(tmp_path, capsys, content, words):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    code, err, _ = run_cli(tmp_path, capsys, f"data.path={data}")
    assert code == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


TEACHER = (
    "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}"
)


def other_vocabulary_teacher(tmp_path):
    from tests.test_trainer import saved_tiny_model

    return saved_tiny_model(tmp_path / "teacher", "0123456789-=")


@pytest.mark.parametrize(
    "override, words",
    [
        (None, "teacher: mode 'distill' learns from a teacher: set teacher.path"),
        ("teacher.path=no/such/model", "teacher.path: 'no/such/model': no such folder"),
        ("teacher.path={empty}", "teacher.path: '{empty}': not a Hugging Face causal-LM folder with a tokenizer"),
        ("teacher.path={other}", "the teacher's tokenizer is not the student's"),
        ("objective.distill_temperature=0", "objective.distill_temperature: 0.0 is out of range; allowed: > 0"),
        ("objective.hard_weight=-1", "objective.hard_weight: -1.0 is out of range; allowed: >= 0"),
    ],
)
def test_a_bad_teacher_is_named_in_one_line_before_training(tmp_path, capsys, override, words):
    empty = tmp_path / "empty"
    empty.mkdir()
    folders = {"empty": empty, "other": other_vocabulary_teacher(tmp_path)}
    capsys.readouterr()  # what saving the folder printed
    overrides = [] if override is None else [override.format(**folders)]
    if override is not None and override.startswith("objective."):
        overrides.append(f"teacher.tiny={TEACHER}")
    code, err, _ = run_cli(tmp_path, capsys, *overrides, mode="distill")
    assert code == 2 and words.format(**folders) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_resume_with_another_teacher_stops(tmp_path, capsys):
    code, _, out = run_cli(tmp_path, capsys, f"teacher.tiny={TEACHER}", mode="distill")
    assert code == 0 and "done, step 3 of 3" in out
    other = TEACHER.replace("hidden_size: 16", "hidden_size: 24")
    code, err, _ = run_cli(tmp_path, capsys, f"teacher.tiny={other}", "optim.max_steps=4", mode="distill")
    assert code == 2 and "teacher.tiny=" in err and "resume=false" in err


def test_prompts_that_all_exceed_max_length_fail_at_the_start(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}+{i}+{i}=", "response": "0"}) + "\n" for i in range(40)))
    code, err, _ = run_cli(tmp_path, capsys, f"data.path={data}", "data.max_length=5")
    assert code == 2 and "data.max_length: 5 tokens leave no room for a response" in err


def test_a_resume_under_other_settings_stops_and_a_fresh_start_replaces_the_run(tmp_path, capsys):
    code, _, _ = run_cli(tmp_path, capsys, "objective.chord_preset=chord-mu", mode="chord")
    assert code == 0
    first_metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    code, err, _ = run_cli(tmp_path, capsys, "objective.chord_preset=chord-phi", mode="chord")
    assert code == 2 and "objective.chord_preset='chord-mu' there, 'chord-phi' now" in err and "resume=false" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first_metrics  # the old run untouched
    code, _, _ = run_cli(tmp_path, capsys, "objective.chord_preset=chord-phi", "resume=false", mode="chord")
    assert code == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(1) == 1  # one run's metrics, not two appended
    marker = json.loads((tmp_path / "run" / "checkpoint-0000003" / "fused_hybrid_checkpoint.json").read_text())
    assert marker["settings"]["objective"]["chord_preset"] == "chord-phi"


def test_a_finished_run_says_it_is_complete(tmp_path, capsys, caplog):
    assert run_cli(tmp_path, capsys)[0] == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with caplog.at_level("INFO", logger="fused_hybrid.trainer"):
        code, _, out = run_cli(tmp_path, capsys)
    assert code == 0 and "is complete (step 3 of 3)" in caplog.text and "done" not in out
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    code, _, out = run_cli(tmp_path, capsys, "optim.max_steps=4")  # raising max_steps trains on
    assert code == 0 and "done, step 4 of 4" in out


def test_ctrl_c_ends_the_step_saves_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    real_step = HybridTrainer.train_step

    def step_then_ctrl_c(self):
        metrics = real_step(self)
        if self.step == 1:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends, in the middle of a step's work
        return metrics

    monkeypatch.setattr(HybridTrainer, "train_step", step_then_ctrl_c)
    code, err, _ = run_cli(tmp_path, capsys)
    assert code == 130 and "interrupted at step 1; run the same command to resume" in err
    assert (tmp_path / "run" / "checkpoint-0000001").is_dir()
    monkeypatch.undo()
    code, _, out = run_cli(tmp_path, capsys)
    assert code == 0 and "done, step 3 of 3" in out


def test_version_and_help_say_what_there_is(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("fused-hybrid ")
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    assert "chord" in text and "grpo" in text and "distill" in text and "fused_hybrid/trainer/config.py" in text
    keys = " ".join(text.split())  # the key list as one line, however it is wrapped
    assert "teacher: path=null, tiny=null" in keys
    for key in ("distill_policy=on", "distill_beta=0.0", "distill_temperature=1.0", "hard_weight=0.0"):
        assert key in keys


def test_the_examples_command_writes_the_shipped_examples_and_never_overwrites(tmp_path, capsys):
    from pathlib import Path

    source = Path(__file__).parents[1] / "examples"
    expected = sorted(p.name for p in source.iterdir() if p.suffix in (".py", ".yaml") and p.name != "__init__.py")
    assert {"plain_pytorch_loop.py", "chord.yaml", "distill.yaml"} <= set(expected)
    cli_main(["examples", str(tmp_path / "mine")])
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == expected
    for name in expected:
        assert (tmp_path / "mine" / name).read_bytes() == (source / name).read_bytes()
    (tmp_path / "mine" / "chord.yaml").write_text("edited")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["examples", str(tmp_path / "mine")])
    assert exit_info.value.code == 2 and "already holds chord.yaml" in capsys.readouterr().err
    assert (tmp_path / "mine" / "chord.yaml").read_text() == "edited"
