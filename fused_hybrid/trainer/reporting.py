"""What the trainer reports: metrics.jsonl, TensorBoard when installed, a progress bar, and the curves' PNG."""

from __future__ import annotations

import json
from pathlib import Path


def append_metrics(path: Path, metrics: dict, writer) -> None:
    with path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            if key != "step":
                writer.add_scalar(key, value, metrics["step"])


def read_metrics(path: Path, up_to_step: int, rewrite: bool) -> list[dict]:
    """The logged metrics up to `up_to_step` (what was logged after the last checkpoint is dropped, and with
    `rewrite` dropped from the file too)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if r["step"] <= up_to_step]
    if rewrite:
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="training", dynamic_ncols=True)


# The curves that say what a mode is doing: CHORD's two parts, not their mu-weighted sum (which falls as mu decays
# whether or not anything is learnt); the preference modes' rewards and accuracy, not only their loss;
# distillation's divergence to its teacher apart from its hard cross-entropy.
PANELS = {
    "chord": ("sft_loss", "grpo_loss", "mu", "reward", "accuracy"),
    "dpo": ("loss", "reward_margin", "reward_accuracy"),
    "orpo": ("nll_loss", "log_odds_ratio", "reward_accuracy"),
    "cpo": ("nll_loss", "reward_margin", "reward_accuracy"),
    "kto": ("loss", "reward_chosen", "reward_rejected", "reward_accuracy", "kl"),
    "distill": ("divergence", "hard_loss", "student_entropy", "accuracy"),
}
DEFAULT_PANELS = ("loss", "reward", "accuracy", "entropy")


def plot_history(history: list[dict], path: Path, title: str, label: str | None = None, mode: str = "") -> None:
    """PNG of the logged curves of `mode` against the step (see PANELS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PANELS.get(mode, DEFAULT_PANELS) if any(k in h for h in history)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
