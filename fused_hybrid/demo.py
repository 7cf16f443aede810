"""`fused-hybrid demo`: adapting a model that already knows a task, one post-training method at a time.

1. **Base model.** A tiny Llama (built from a config, random weights) learns 2-digit addition (`37+45=` -> `82`)
   with SFT. It is saved in `<out>/base-model` and restored on a re-run with the same settings.
2. **New, related task.** 2-digit subtraction (`82-45=` -> `37`, never negative), from a small set of expert
   demonstrations and an exact-match reward: the setting CHORD and DFT were made for.
3. **Methods**, each from the same base for the same number of optimizer steps, on the same demonstrations and
   prompts: SFT, DFT, GRPO alone, SFT then GRPO (half the steps each), CHORD-mu, CHORD-phi and MinorSFT; and
   on-policy distillation, which learns from more than those: a teacher that knows both tasks (the base after
   more SFT on both, from rows of its own; saved in `<out>/teacher-model` and restored like the base), scoring the
   student's own completions of the same prompts token by token, with no reward. Its label says so.
4. **Measured** every few steps on held-out prompts: new-task accuracy, base-task accuracy (retention of what the
   base knew) and the policy's mean next-token entropy on the new task's demonstrations; over several seeds
   (data order, sampling) from the same base.

The report folder holds one PNG per metric (every method a labelled line, the seeds' mean with their range
shaded), `metrics.md` (a table and what the run shows), `metrics.json`, and the LM-head memory of the run's
micro-batch at its own vocabulary and at a 128k one.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from . import provenance
from .progress import Countdown
from .trainer import HybridTrainer, load_config

TINY_MODEL = (
    "{hidden_size: 128, intermediate_size: 384, num_hidden_layers: 3, num_attention_heads: 4, num_key_value_heads: 2}"
)
CHARACTERS = "0123456789+-="  # the base model's alphabet already holds the new task's '-'
BASE_STEPS = 1200
ADAPT_STEPS = 200
BASE_LEARNING_RATE = 2e-3
ADAPT_LEARNING_RATE = 1e-3
SEEDS = 2
EVAL_EVERY = 20
DEMONSTRATIONS = 256  # expert demonstrations of the new task
HELD_OUT = 128  # prompts per task for the accuracies
METHODS = ("sft", "dft", "grpo", "sft-then-grpo", "chord-mu", "chord-phi", "minor_sft", "distill")
# How a method is named in the report: the distillation row learns from a teacher the other rows do not have.
LABELS = {"distill": "distill (on-policy, from a teacher trained on both tasks)"}
TEACHER_STEPS = 600  # SFT steps from the base on both tasks
TEACHER_LEARNING_RATE = 2e-3
TEACHER_ROWS = 4000  # rows of each task the teacher learns from
LARGE_VOCAB = 128256


def label(method: str) -> str:
    return LABELS.get(method, method)


def _row(prompt: str, result: int) -> dict:
    """Answers are written least-significant digit first (`37+45=28` reads 82), the order in which carries and
    borrows are worked out, so that a tiny model learns the arithmetic in a minute rather than memorising it."""
    answer = str(result)[::-1]
    return {"prompt": prompt, "response": answer, "answer": answer}


def addition(rng: random.Random) -> dict:
    a, b = rng.randrange(100), rng.randrange(100)
    return _row(f"{a}+{b}=", a + b)


def subtraction(rng: random.Random) -> dict:
    a, b = rng.randrange(100), rng.randrange(100)
    return _row(f"{max(a, b)}-{min(a, b)}=", abs(a - b))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_files(out: Path) -> dict[str, Path]:
    """The demo's data, generated from fixed seeds: base-task training rows, the new task's demonstrations,
    held-out prompts of both tasks (disjoint from the training rows), and the teacher's rows of both tasks (its
    subtraction rows drawn afresh, disjoint from the held-out prompts too)."""
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    held_out_new = [subtraction(rng) for _ in range(HELD_OUT)]
    held_out_base = [addition(rng) for _ in range(HELD_OUT)]
    seen = {r["prompt"] for r in held_out_new + held_out_base}
    base, demos = [], []
    while len(base) < 8000:
        row = addition(rng)
        if row["prompt"] not in seen:
            base.append(row)
    while len(demos) < DEMONSTRATIONS:
        row = subtraction(rng)
        if row["prompt"] not in seen:
            demos.append(row)
    teacher = base[:TEACHER_ROWS]
    while len(teacher) < 2 * TEACHER_ROWS:
        row = subtraction(rng)
        if row["prompt"] not in seen:
            teacher.append(row)
    rng.shuffle(teacher)
    return {
        "base": write_rows(folder / "base-addition.jsonl", base),
        "demos": write_rows(folder / "new-subtraction-demos.jsonl", demos),
        "held_out_new": write_rows(folder / "held-out-subtraction.jsonl", held_out_new),
        "held_out_base": write_rows(folder / "held-out-addition.jsonl", held_out_base),
        "teacher": write_rows(folder / "teacher-both-tasks.jsonl", teacher),
    }


def common_overrides(run_dir: Path, seed: int) -> list[str]:
    return [
        f"output_dir={run_dir}",
        f"model.tiny={TINY_MODEL}",
        f"model.characters={CHARACTERS}",
        "data.max_length=16",
        "data.eval_size=0",
        "optim.batch_size=32",
        "rollout.prompts_per_step=8",
        "rollout.group_size=4",
        "rollout.max_new_tokens=4",
        "rollout.temperature=1.0",
        f"seed={seed}",
        "resume=false",
        "save_every=1000000",
    ]


def method_overrides(method: str, steps: int) -> list[str]:
    """The trainer settings of one adaptation method: half the base's peak learning rate, no warm-up (the base is
    trained)."""
    shared = [f"optim.learning_rate={ADAPT_LEARNING_RATE}", "optim.warmup_steps=0", f"optim.max_steps={steps}"]
    modes = {
        "sft": ["mode=sft"],
        "dft": ["mode=dft"],
        "grpo": ["mode=grpo"],
        "minor_sft": ["mode=minor_sft"],
        # CHORD-mu's schedule (0.9 -> 0.05, cosine) stretched over the run; CHORD-phi: phi-weighted SFT, mu 0.1
        "chord-mu": [
            "mode=chord",
            "objective.mu_warmup_steps=0",
            f"objective.mu_decay_steps={steps}",
            "objective.mu_peak=0.9",
            "objective.mu_valley=0.05",
            "objective.use_phi=false",
        ],
        "chord-phi": ["mode=chord", "objective.mu=0.1", "objective.use_phi=true"],
        # one completion for each of 32 prompts: as many sequences per step as the others, the most prompts
        "distill": [
            "mode=distill",
            "objective.distill_policy=on",
            "rollout.group_size=1",
            "rollout.prompts_per_step=32",
        ],
    }
    return shared + modes[method]


def build_base(out: Path, files: dict, steps: int, progress: bool) -> Path:
    """The base model (SFT on addition), trained here or restored from `<out>/base-model`."""
    settings = {
        "steps": steps,
        "model": TINY_MODEL,
        "characters": CHARACTERS,
        "data": files["base"].name,
        "learning_rate": BASE_LEARNING_RATE,
    }
    overrides = [
        "mode=sft",
        f"data.path={files['base']}",
        f"optim.learning_rate={BASE_LEARNING_RATE}",
        f"optim.warmup_steps={steps // 20}",
        f"optim.max_steps={steps}",
    ]
    what = f"base model: {steps} SFT steps of a tiny Llama on 2-digit addition"
    return sft_model(out, "base", settings, overrides, steps, progress, what)


def build_teacher(out: Path, files: dict, base: Path, steps: int, progress: bool) -> Path:
    """The distillation teacher (the base, then SFT on both tasks), trained here or restored from
    `<out>/teacher-model`."""
    settings = {
        "steps": steps,
        "base": json.loads((base / "demo_base.json").read_text()),
        "data": files["teacher"].name,
        "rows": TEACHER_ROWS,
        "learning_rate": TEACHER_LEARNING_RATE,
    }
    overrides = [
        "mode=sft",
        f"model.path={base}",
        f"data.path={files['teacher']}",
        f"optim.learning_rate={TEACHER_LEARNING_RATE}",
        f"optim.warmup_steps={steps // 20}",
        f"optim.max_steps={steps}",
    ]
    what = f"teacher: the base after {steps} SFT steps on both tasks ({TEACHER_ROWS} rows of each)"
    return sft_model(out, "teacher", settings, overrides, steps, progress, what)


def sft_model(out: Path, name: str, settings: dict, overrides: list[str], steps: int, progress: bool, what: str):
    """`<out>/<name>-model`: restored when its stamp holds `settings`, else trained by `steps` SFT steps under
    `overrides` and saved with that stamp."""
    folder = out / f"{name}-model"
    stamp = folder / f"demo_{name}.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"== {name} model restored from {folder}")
        return folder
    print(f"== {what}")
    config = load_config(None, common_overrides(out / "runs" / name, 0) + overrides)
    trainer = HybridTrainer(config, progress=False)
    countdown = Countdown(name, steps, progress)
    for _ in range(steps):
        trainer.train_step()
        countdown.step()
    shutil.rmtree(folder, ignore_errors=True)
    save_model(trainer, folder)
    stamp.write_text(json.dumps(settings))
    return folder


def save_model(trainer: HybridTrainer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(folder)
    trainer.tokenizer.save_pretrained(folder)


class Evaluation:
    """Held-out accuracy on both tasks and the entropy on the new task's demonstrations, for one trainer."""

    def __init__(self, files: dict) -> None:
        import datasets

        self.new = datasets.Dataset.from_json(str(files["held_out_new"]))
        self.base = datasets.Dataset.from_json(str(files["held_out_base"]))
        self.demos = datasets.Dataset.from_json(str(files["demos"])).select(range(64))

    def __call__(self, trainer: HybridTrainer, step: int) -> dict:
        return {
            "step": step,
            "new_task_accuracy": trainer.evaluate(self.new)["accuracy"],
            "base_task_accuracy": trainer.evaluate(self.base)["accuracy"],
            "entropy": trainer.policy_entropy(self.demos),
        }


def adapt(
    method: str,
    base: Path,
    files: dict,
    steps: int,
    seed: int,
    evaluation: Evaluation,
    out: Path,
    progress: bool,
    teacher: Path | None = None,
    countdown: Countdown | None = None,
) -> list[dict]:
    """One method from the base for `steps` optimizer steps (distillation from `teacher`); the evaluations every
    EVAL_EVERY steps."""
    run_dir = out / "runs" / f"{method}-seed{seed}"
    phases = [("sft", steps // 2), ("grpo", steps - steps // 2)] if method == "sft-then-grpo" else [(method, steps)]
    start, done, history = base, 0, []
    for phase, phase_steps in phases:
        config = load_config(
            None,
            common_overrides(run_dir, seed)
            + method_overrides(phase, phase_steps)
            + [f"model.path={start}", f"data.path={files['demos']}"]
            + ([f"teacher.path={teacher}"] if phase == "distill" else []),
        )
        trainer = HybridTrainer(config, progress=False)
        if done == 0:
            history.append(evaluation(trainer, 0))
        for _ in range(phase_steps):
            trainer.train_step()
            done += 1
            if countdown is not None:
                countdown.step()
            if done % EVAL_EVERY == 0 or done == steps:
                history.append(evaluation(trainer, done))
        if phase_steps < steps:  # the next phase starts from this one's model
            start = run_dir / "after-sft"
            save_model(trainer, start)
    if progress:
        last = history[-1]
        print(
            f"   {method:>14} seed {seed}: new task {last['new_task_accuracy']:.3f}, "
            f"base task {last['base_task_accuracy']:.3f}, entropy {last['entropy']:.3f}"
        )
    return history


def run_demo(
    out: str | Path = "demo-report",
    steps: int = ADAPT_STEPS,
    progress: bool = True,
    *,
    base_steps: int = BASE_STEPS,
    seeds: int = SEEDS,
    methods: tuple[str, ...] = METHODS,
    teacher_steps: int = TEACHER_STEPS,
) -> Path:
    """Train (or restore) the base model (and the teacher, for distillation), adapt the base with every method and
    seed, and write the report."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the demo's models load and save many times
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    files = task_files(out)
    base = build_base(out, files, base_steps, progress)
    evaluation = Evaluation(files)
    teacher, teacher_summary = None, None
    if "distill" in methods:
        teacher = build_teacher(out, files, base, teacher_steps, progress)
        scores = evaluate_model(teacher, files, evaluation, out)
        teacher_summary = {"steps": teacher_steps, "rows_per_task": TEACHER_ROWS, **{k: scores[k] for k in METRICS}}
    print(f"== adapting to 2-digit subtraction: {steps} steps per method, {seeds} seed(s), from the same base")
    countdown = Countdown("adaptation", len(methods) * seeds * steps, progress)
    histories = {
        m: [adapt(m, base, files, steps, seed, evaluation, out, progress, teacher, countdown) for seed in range(seeds)]
        for m in methods
    }
    report(out, histories, steps, base_steps, time.perf_counter() - begin, teacher_summary)
    print(f"report written to {out}")
    return out


def evaluate_model(folder: Path, files: dict, evaluation: Evaluation, out: Path) -> dict:
    """The Evaluation of the model saved in `folder`."""
    config = load_config(
        None, common_overrides(out / "runs" / "evaluation", 0) + [f"model.path={folder}", f"data.path={files['demos']}"]
    )
    return evaluation(HybridTrainer(config, progress=False), 0)


METRICS = {
    "new_task_accuracy": "held-out accuracy, new task (subtraction)",
    "base_task_accuracy": "held-out accuracy, base task (addition)",
    "entropy": "policy entropy on the new task (nats per token)",
}


def report(
    out: Path, histories: dict, steps: int, base_steps: int, seconds: float, teacher: dict | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, title in METRICS.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method, runs in histories.items():
            xs = [h["step"] for h in runs[0]]
            values = torch.tensor([[h[key] for h in run] for run in runs])
            ax.plot(xs, values.mean(0), marker=".", label=label(method))
            if len(runs) > 1:
                ax.fill_between(xs, values.min(0).values, values.max(0).values, alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("optimizer steps from the base model")
        ax.set_ylabel(title.split(",")[0] if "accuracy" in key else "entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"{key}.png", dpi=110)
        plt.close(fig)

    first = next(iter(histories.values()))
    summary = {
        "steps": steps,
        "base_steps": base_steps,
        "seeds": len(first),
        "seconds": seconds,
        "measured_on": provenance.label("cpu"),
        "base": {k: first[0][0][k] for k in METRICS},
        "methods": {},
    }
    if teacher is not None:
        summary["teacher"] = teacher
    for method, runs in histories.items():
        finals = {k: [run[-1][k] for run in runs] for k in METRICS}
        summary["methods"][method] = {
            k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in finals.items()
        }
    memory = head_memory(32 * 16, 128, len(CHARACTERS) + 3)
    summary["memory"] = memory
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    (out / "metrics.md").write_text(markdown(summary))


def head_memory(tokens: int, dim: int, vocab: int) -> dict:
    """Bytes of the LM-head loss beyond its inputs for a micro-batch of `tokens` positions, fp32: the materialised
    logits with their gradient against the fused path's per-token statistics (four fp32 numbers per token) plus
    one chunk of logits and epilogue buffers (512 rows on a CPU, at most 256 MiB), at the run's vocabulary and
    at a 128k one."""
    from .engine import torch_epilogue
    from .engine.chunked import chunk_rows
    from .engine.core import default_chunk_bytes

    per_logit = torch_epilogue.bytes_per_logit(torch.float32)
    sizes = {}
    for v in (vocab, LARGE_VOCAB):
        rows = chunk_rows(tokens, v, per_logit, default_chunk_bytes(torch.device("cpu"), v, per_logit))
        sizes[f"vocab_{v}"] = {
            "materialised_bytes": 2 * tokens * v * 4,
            "fused_bytes": 4 * tokens * 4 + rows * v * per_logit,
        }
    return {"tokens": tokens, "dim": dim, **sizes}


def markdown(summary: dict) -> str:
    base = summary["base"]
    lines = [
        "# fused-hybrid demo: adapting a base model to a new task",
        "",
        f"A tiny Llama trained for {summary['base_steps']} SFT steps on 2-digit addition (the base: held-out "
        f"addition accuracy {base['base_task_accuracy']:.3f}, subtraction {base['new_task_accuracy']:.3f}) "
        f"is adapted to 2-digit subtraction from {DEMONSTRATIONS} expert demonstrations and an exact-match "
        f"reward, {summary['steps']} optimizer steps per method, {summary['seeds']} seed(s) (data order and "
        f"sampling) from the same base; whole run {summary['seconds'] / 60:.1f} minutes on "
        f"{summary['measured_on']}.",
        "",
        "A tiny model trained from scratch is chaotic: another CPU, thread count or BLAS sums in another order, and "
        "that is another run. The figures below are this run's; a conclusion holds only where it holds across runs.",
        *teacher_paragraph(summary),
        "",
        "| method | new task accuracy | base task accuracy (retention) | entropy (nats) |",
        "|---|---:|---:|---:|",
    ]
    for method, finals in summary["methods"].items():
        cells = [f"{finals[k]['mean']:.3f} ({finals[k]['min']:.3f}-{finals[k]['max']:.3f})" for k in METRICS]
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Final values: the seeds' mean (their range). Curves: " + ", ".join(f"`{k}.png`" for k in METRICS) + ".",
        "",
        "## What this run shows",
        "",
        *findings(summary),
        "",
        "## LM-head memory of one micro-batch (fp32, 512 positions)",
        "",
        "| vocabulary | materialised logits + gradient | fused-hybrid (statistics + one chunk) |",
        "|---:|---:|---:|",
    ]
    memory = summary["memory"]
    for key, value in memory.items():
        if key.startswith("vocab_"):
            lines.append(
                f"| {int(key[6:]):,} | {value['materialised_bytes'] / 2**20:,.2f} MiB "
                f"| {value['fused_bytes'] / 2**20:,.2f} MiB |"
            )
    lines += [
        "",
        "At the demo's own vocabulary the logits are tiny and the fused path's buffers cost more than they "
        "save; the same micro-batch at a 128k vocabulary would materialise the logits and their gradient, "
        "the fused path one chunk (512 rows, at most 256 MiB, on a CPU; at most 1 GiB on a GPU) and four "
        "numbers per token.",
        "",
    ]
    return "\n".join(lines)


def teacher_paragraph(summary: dict) -> list[str]:
    """What the distillation row learns from that the others do not: its teacher, and how good it is."""
    teacher = summary.get("teacher")
    if teacher is None:
        return []
    return [
        "",
        f"The distillation row learns from a teacher the other rows do not have: the base after "
        f"{teacher['steps']} more SFT steps on both tasks ({teacher['rows_per_task']} rows of each, the subtraction "
        f"ones drawn for it, not the demonstrations; held-out subtraction accuracy "
        f"{teacher['new_task_accuracy']:.3f}, addition {teacher['base_task_accuracy']:.3f}). The teacher scores "
        "the student's own completions of the demonstrations' prompts token by token (the forward KL, one "
        "completion per prompt): no reward, no demonstration.",
    ]


def findings(summary: dict) -> list[str]:
    """Plain statements of what the numbers say (the ranking, the retention, the spread), no interpretation."""
    methods = summary["methods"]
    ranked = sorted(methods, key=lambda m: -methods[m]["new_task_accuracy"]["mean"])
    top = ", ".join(f"{label(m)} {methods[m]['new_task_accuracy']['mean']:.3f}" for m in ranked[:3])
    base = summary["base"]["base_task_accuracy"]
    kept = max(methods[m]["base_task_accuracy"]["mean"] for m in methods)
    lines = [f"- New task: the highest held-out accuracies are {top}."]
    lines.append(
        f"- Retention: the base task's accuracy went from {base:.3f} to at most {kept:.3f} under every "
        "method: training on the new task alone overwrote the old one in this tiny model."
        if kept < 0.5 * base
        else f"- Retention: the base task's accuracy went from {base:.3f} to between "
        f"{min(methods[m]['base_task_accuracy']['mean'] for m in methods):.3f} and {kept:.3f}."
    )
    accuracy = {m: methods[m]["new_task_accuracy"] for m in ranked}
    if len(ranked) > 1 and summary["seeds"] > 1 and accuracy[ranked[0]]["min"] <= accuracy[ranked[1]]["max"]:
        first, second = ranked[:2]
        lines.append(
            f"- {label(first)} and {label(second)} overlap across the {summary['seeds']} seeds: this run does not "
            "rank them."
        )
    return lines
