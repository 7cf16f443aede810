"""What one optimizer step logs: each micro-batch's counts, and its metrics combined over micro-batches and ranks
by the rule each objective declares for them (Objective.metric_counts), so that a step logs what one batch holding
all of its rows would, whatever grad_accum and the world size."""

from __future__ import annotations

from collections.abc import Callable

from ..objectives.registry import CONSTANT, SUMMED, Objective
from .data import IGNORE_INDEX


def batch_counts(batch: dict) -> dict[str, int]:
    """One micro-batch's counts (registry.STEP_COUNTS): summed over the step, the normalisers that make the
    accumulated micro-batches give the full-batch gradient; on their own, the weights of its mean metrics."""
    tokens = batch["labels"][:, 1:] != IGNORE_INDEX
    pairs = batch["labels"].shape[0] // 2  # preference batches: the P chosen rows, then their P rejected twins
    counts = {
        "tokens": int(tokens.sum()),
        "sequences": int((tokens.sum(-1) > 0).sum()),
        "pairs": pairs,
        "chosen_tokens": int(tokens[:pairs].sum()),
    }
    if "desirable" in batch:
        counts["desirable_sequences"] = int(batch["desirable"].sum())
        counts["undesirable_sequences"] = len(batch["desirable"]) - counts["desirable_sequences"]
    if "is_expert" in batch:
        counts["expert_tokens"] = int(tokens[batch["is_expert"]].sum())
        counts["rollout_tokens"] = counts["tokens"] - counts["expert_tokens"]
    return counts


class StepMetrics:
    """A step's metrics as (total, count) per metric over this rank's micro-batches (count None: a summed metric).

    A metric already divided by the step's global count (the loss, its parts) adds its value, to be summed; a mean
    over the micro-batch's own tokens, sequences or pairs adds value * count and that count, so the step logs their
    weighted mean (a micro-batch with none counts for nothing); a constant adds value and 1."""

    def __init__(self, objective: Objective, means: dict[str, tuple[float, int]]) -> None:
        self.objective = objective
        self.parts: dict[str, list] = {key: list(pair) for key, pair in means.items()}

    def add(self, batch_metrics: dict, counts: dict[str, int]) -> None:
        for key, value in batch_metrics.items():
            kind = SUMMED if key == "loss" else self.objective.metric_count(key)
            if kind == SUMMED:
                weight = None
            elif kind == CONSTANT:
                weight = 1
            elif kind in counts:
                weight = counts[kind]
            else:
                raise ValueError(
                    f"objective {self.objective.name!r}: metric {key!r} is declared a mean over {kind!r}, which "
                    f"its batches do not count (they count {', '.join(counts)})"
                )
            entry = self.parts.setdefault(key, [0.0, None if weight is None else 0])
            entry[0] = entry[0] + (value if weight is None else value * weight)
            if weight is not None:
                entry[1] += weight

    def combined(self, all_reduce: Callable[[list[float]], list[float]]) -> dict[str, float]:
        """The logged metrics: totals and counts summed over the ranks (one `all_reduce`), then each summed metric
        is its total and each mean its total / count (0 with no count)."""
        names = sorted(self.parts)
        reduced = all_reduce([float(v) for k in names for v in (self.parts[k][0], self.parts[k][1] or 0)])
        out = {}
        for i, key in enumerate(names):
            total, count = reduced[2 * i], reduced[2 * i + 1]
            out[key] = total if self.parts[key][1] is None else (total / count if count > 0 else 0.0)
        return out
