"""Objectives as declarations: what each objective needs, read by the trainer (its modes), the tests and the docs.

An objective file defines its loss function (`(hidden, weight, targets, bias=None, *, ...) -> LossOutput`), its
module, and registers an :class:`Objective` saying what the loss consumes; nothing else needs to change for the
trainer to offer it as a mode.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

# What the trainer feeds an objective each step.
DATA_KINDS = (
    "demonstrations",  # prompt + response rows
    "preferences",  # prompt + chosen + rejected rows: the P chosen sequences, then their P rejected twins
    "rollouts",  # sampled completions of prompts, with rewards and group-normalised advantages
    "rollouts+demonstrations",  # both in one batch, told apart by `is_expert`
    "completions",  # sampled completions of prompts with no reward: the loss scores them itself (against a teacher)
    "unpaired",  # prompt + response rows, each labelled desirable or not (KTO)
)
# The kinds for which the trainer samples completions of prompts, and those of them that carry rewards.
SAMPLED_KINDS = ("rollouts", "rollouts+demonstrations", "completions")
REWARDED_KINDS = ("rollouts", "rollouts+demonstrations")
# The step's global counts a loss can take as normalisers (summed over micro-batches and ranks): loss tokens,
# sequences with a loss token, preference pairs, loss tokens of the chosen responses, of rollouts, of experts,
# and the desirable and undesirable sequences of unpaired data.
STEP_COUNTS = (
    "tokens",
    "sequences",
    "pairs",
    "chosen_tokens",
    "rollout_tokens",
    "expert_tokens",
    "desirable_sequences",
    "undesirable_sequences",
)
# How a metric of one micro-batch combines into the step's (see Objective.metric_counts): "sum", "constant", or
# one of STEP_COUNTS (a mean over this micro-batch's own items of that kind).
SUMMED = "sum"
CONSTANT = "constant"
METRIC_COUNTS = (SUMMED, CONSTANT, *STEP_COUNTS)
DEFAULT_METRIC_COUNT = "tokens"
# How the engine computes an objective's gradient (engine.entry.linear_head_loss):
# - "token": the loss is token-separable (a sum of terms each depending on one token's statistics and inputs, with
#   normalisers the masks give): the gradient is formed inside the forward, three GEMMs;
# - "sequence" / "pair": a sum of terms each depending on one sequence's tokens / one preference pair's (sequences
#   i and i + P of 2P): the same, with every chunk holding whole groups;
# - "two-pass": the tokens' gradients depend on each other: the statistics first, then autograd recomputes.
GRADIENT_PLANS = ("token", "sequence", "pair", "two-pass")
# What a teacher model gives a loss for each micro-batch: its shifted last hidden states [B, T - 1, D_t] on the same
# input ids, its LM head's weight [V, D_t] and bias, and its logit transform (a HeadSpec: logit scale, softcap).
TEACHER_INPUTS = ("teacher_hidden", "teacher_weight", "teacher_bias", "teacher_head")
# Per-batch inputs the trainer can supply (advantages and old_logp come with rollouts, and sampler_logp, the
# sampler's own log-probs of the drawn tokens, when the config asks for the sampler correction; ref_logp from a
# frozen copy of the starting model; is_expert with rollouts+demonstrations; desirable, each row's label, with
# unpaired data, and kl, KTO's reference point, the policy's mean log-ratio to the reference on mismatched
# prompt / response pairs; the TEACHER_INPUTS from the config's teacher).
BATCH_INPUTS = ("advantages", "old_logp", "ref_logp", "sampler_logp", "is_expert", "desirable", "kl", *TEACHER_INPUTS)


def _no_options(config, step: int) -> dict:
    return {}


def _no_reference(config) -> bool:
    return False


def _no_teacher(config) -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class Objective:
    """A registered objective.

    name: the trainer's mode. loss: the function form (the trainer passes the model's logit transform as
    ``head=``). data: one of DATA_KINDS (or a callable of the trainer's config that picks it). normalisers: loss
    argument -> one of STEP_COUNTS (or a callable of the trainer's config that picks it). batch_inputs: loss
    arguments from BATCH_INPUTS. options: the loss options under the trainer's config at a step. needs_reference:
    whether the loss needs ref_logp under that config. needs_teacher: whether it needs a teacher model under that
    config (the trainer builds it from the config's `teacher` section; it gives the TEACHER_INPUTS). gradient:
    how the gradient is computed, one of GRADIENT_PLANS, or a callable of the loss's options (keywords) giving one;
    the loss function reads it (`gradient_plan`), so the declaration is what runs. input_mixing: the trainer mixes
    predicted-token embeddings into the inputs (IFT's temporal residual).

    check_options: the loss's option check (its keywords are loss options): the trainer runs it on the config's
    options before training, so that a bad combination is a config error, not a failure at the first step.

    metric_counts: metric -> how its value on one micro-batch combines over a step's micro-batches and ranks into
    the value one batch holding them all would give (what the trainer logs, whatever grad_accum and world size):

    - "sum": the metric is already divided by a step count among `normalisers` (a loss part over ``num_items``):
      the values are summed, as the loss is;
    - one of STEP_COUNTS: the metric is a mean over the micro-batch's own items of that kind (its loss tokens,
      its sequences with a loss token, its pairs, ...): the mean weighted by those counts, so that a micro-batch
      with none of them (CHORD's without an expert token) counts for nothing (0 when no micro-batch has any);
    - "constant": the same value in every micro-batch (an option, such as CHORD's mu): their mean.

    A metric not named is a mean over the micro-batch's loss tokens ("tokens").
    """

    name: str
    loss: Callable[..., Any]
    data: str | Callable[[Any], str]
    normalisers: Mapping[str, str | Callable[[Any], str]] = dataclasses.field(default_factory=dict)
    batch_inputs: tuple[str, ...] = ()
    options: Callable[[Any, int], dict] = _no_options
    needs_reference: Callable[[Any], bool] = _no_reference
    needs_teacher: Callable[[Any], bool] = _no_teacher
    gradient: str | Callable[..., str] = "token"
    input_mixing: bool = False
    metric_counts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    check_options: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not callable(self.data):
            self._check_data_kind(self.data)
        unknown = set(self.batch_inputs) - set(BATCH_INPUTS)
        if unknown:
            raise ValueError(f"objective {self.name!r}: batch_inputs {sorted(unknown)} not among {BATCH_INPUTS}")
        from_teacher = sorted(set(self.batch_inputs) & set(TEACHER_INPUTS))
        if from_teacher and self.needs_teacher is _no_teacher:
            raise ValueError(
                f"objective {self.name!r}: batch_inputs {from_teacher} come from a teacher model: declare "
                "needs_teacher (a callable of the trainer's config)"
            )
        if not callable(self.gradient) and self.gradient not in GRADIENT_PLANS:
            raise ValueError(
                f"objective {self.name!r}: gradient must be one of {GRADIENT_PLANS}, got {self.gradient!r}"
            )
        unknown = {name: count for name, count in self.metric_counts.items() if count not in METRIC_COUNTS}
        if unknown:
            raise ValueError(f"objective {self.name!r}: metric_counts {unknown} not among {METRIC_COUNTS}")

    def gradient_plan(self, **options) -> str:
        """How the gradient of a call with these loss options is computed: one of GRADIENT_PLANS."""
        plan = self.gradient(**options) if callable(self.gradient) else self.gradient
        if plan not in GRADIENT_PLANS:
            raise ValueError(f"objective {self.name!r}: its gradient plan {plan!r} is not one of {GRADIENT_PLANS}")
        return plan

    def check_config_options(self, config) -> None:
        """Run `check_options` on the options the trainer's `config` gives (the loss's defaults for the others)."""
        if self.check_options is None:
            return
        parameters = inspect.signature(self.loss).parameters
        options = self.options(config, 0)
        names = inspect.signature(self.check_options).parameters
        self.check_options(**{name: options.get(name, parameters[name].default) for name in names})

    def metric_count(self, metric: str) -> str:
        """How `metric` combines over micro-batches and ranks: one of METRIC_COUNTS (see metric_counts)."""
        return self.metric_counts.get(metric, DEFAULT_METRIC_COUNT)

    def _check_data_kind(self, kind) -> str:
        if kind not in DATA_KINDS:
            raise ValueError(f"objective {self.name!r}: data must be one of {DATA_KINDS}, got {kind!r}")
        return kind

    def data_kind(self, config) -> str:
        """What the trainer feeds the loss under the trainer's `config`: one of DATA_KINDS."""
        return self._check_data_kind(self.data(config) if callable(self.data) else self.data)

    def samples(self, config) -> bool:
        """Whether the trainer samples completions of prompts for the loss under `config`."""
        return self.data_kind(config) in SAMPLED_KINDS

    def rewarded(self, config) -> bool:
        """Whether those completions are rewarded (the config's reward function, group-normalised advantages)."""
        return self.data_kind(config) in REWARDED_KINDS

    def normaliser_counts(self, config) -> dict[str, str]:
        """Loss argument -> the step count it takes, under the trainer's `config`."""
        counts = {arg: count(config) if callable(count) else count for arg, count in self.normalisers.items()}
        unknown = set(counts.values()) - set(STEP_COUNTS)
        if unknown:
            raise ValueError(f"objective {self.name!r}: normalisers {sorted(unknown)} not among {STEP_COUNTS}")
        return counts


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add `objective` under its name (a trainer mode from then on)."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"an objective named {objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def clip_options(config) -> dict:
    """The clip bounds the trainer's config sets; the objective's own defaults for those it leaves None."""
    return {k: v for k in ("epsilon_low", "epsilon_high") if (v := getattr(config.objective, k)) is not None}


def aggregation_count(config, default: str = "token-mean") -> str:
    """The count the config's aggregation (`default` when it sets none) divides by: tokens for token-mean,
    sequences otherwise."""
    return "tokens" if (config.objective.aggregation or default) == "token-mean" else "sequences"


def policy_gradient_options(config, step: int) -> dict:
    """KL weight, aggregation (when the config sets one; with the Dr. GRPO length) and clip bounds of the
    GRPO-style objectives."""
    objective = config.objective
    aggregation = {} if objective.aggregation is None else {"aggregation": objective.aggregation}
    return dict(
        beta=objective.beta,
        max_response_length=config.rollout.max_new_tokens,
        **aggregation,
        **clip_options(config),
    )


def needs_kl_reference(config) -> bool:
    return config.objective.beta > 0
