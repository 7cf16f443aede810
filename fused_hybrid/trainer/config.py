"""Training configuration: the settings as nested dataclasses, their ranges and choices, and the rules that tie
one section to another (config_reading.py reads them from YAML or TOML with `--set section.key=value` overrides).

Every value is checked when the config is built: errors name the key, the value and what it accepts (the allowed
keys of a section, the values of a choice, the range of a number). Each setting is documented by its comment
below (the README's trainer section lists the modes and sections).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from ..objectives import AGGREGATIONS, OBJECTIVES
from ..objectives.policy_gradient import IMPORTANCE_SAMPLING, LOSS_TYPES, SAMPLER_CORRECTIONS


def registered_modes() -> tuple[str, ...]:
    """Every registered objective is a mode (read when a config is built, so later registrations count)."""
    return tuple(sorted(OBJECTIVES))


class UserError(ValueError):
    """Something the user can fix (a config value, a data file, an output folder); the message says what. The CLI
    prints it as one line and exits non-zero."""


class ConfigError(UserError):
    """A configuration value or key is not accepted; the message names it."""


# Ranges of the numeric settings: (lowest, highest, lowest allowed, highest allowed[, why]); None: unbounded.
def _at_least(low, why: str = ""):
    return (low, None, True, True, why)


_POSITIVE = (0, None, False, True)
_FRACTION = (0, 1, True, True)


@dataclasses.dataclass
class TinyModelConfig:
    # A Llama-style model built from a config, with random weights (transformers' LlamaConfig keys; a partial setting
    # merges into these defaults, so model.tiny.hidden_size=64 keeps the rest). null: LlamaConfig's default.
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # null: hidden_size / num_attention_heads
    hidden_act: str | None = None
    initializer_range: float | None = None
    rms_norm_eps: float | None = None

    RANGES: typing.ClassVar[dict] = {
        "hidden_size": _at_least(1),
        "intermediate_size": _at_least(1),
        "num_hidden_layers": _at_least(1),
        "num_attention_heads": _at_least(1),
        "num_key_value_heads": _at_least(1),
        "head_dim": _at_least(1),
        "initializer_range": _POSITIVE,
        "rms_norm_eps": _POSITIVE,
    }

    def check(self, key: str) -> None:
        """The rules between the sizes (`key`: model.tiny or teacher.tiny)."""
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{key}.hidden_size: {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads} (or set {key}.head_dim)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{key}.num_attention_heads: {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )

    def llama_options(self) -> dict:
        """The set keys, for transformers.LlamaConfig."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


@dataclasses.dataclass
class ModelConfig:
    # A local Hugging Face model folder, or None to build a Llama-style model from `tiny` (random weights).
    path: str | None = None
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    # Tiny models: the character tokenizer's alphabet (None: every character of the data), so that a model can
    # later read a task whose data it has not seen.
    characters: str | None = None
    gradient_checkpointing: bool = False
    # "auto": bf16 autocast on CUDA, fp32 elsewhere.
    precision: str = "auto"

    CHOICES = {"precision": ("auto", "float32", "bfloat16")}
    RANGES: typing.ClassVar[dict] = {}


@dataclasses.dataclass
class TeacherConfig:
    # The distill mode's teacher: frozen, in eval mode, on the student's device, fed the student's input ids; it must
    # have the student's vocabulary (the same tokenizer), checked before training starts. Give one of:
    # a local Hugging Face model folder with its tokenizer (loaded like model.path, in model.precision), ...
    path: str | None = None
    # ... or a Llama-style model built from this config (the keys and defaults of model.tiny) over the student's
    # vocabulary, with random weights (for tests: a random teacher still has a distribution to match).
    tiny: TinyModelConfig | None = None

    RANGES: typing.ClassVar[dict] = {}


@dataclasses.dataclass
class DataConfig:
    # A .jsonl or .parquet file, a folder written by datasets' save_to_disk, or "synthetic:addition".
    path: str = "synthetic:addition"
    prompt_column: str = "prompt"
    response_column: str = "response"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    label_column: str = "label"  # kto: true for a desirable response, false for an undesirable one
    answer_column: str = "answer"
    max_length: int = 128
    eval_size: int = 64  # held-out prompts for accuracy (needs the answer column)
    synthetic_size: int = 4000
    synthetic_digits: int = 2

    RANGES: typing.ClassVar[dict] = {
        "max_length": _at_least(2),
        "eval_size": _at_least(0),
        "synthetic_size": _at_least(1),
        "synthetic_digits": _at_least(1),
    }


@dataclasses.dataclass
class OptimConfig:
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 200
    batch_size: int = 32  # sequences per optimizer step (for rollout modes: prompts_per_step x group_size)
    grad_accum: int = 1  # micro-batches per step
    max_grad_norm: float = 1.0

    RANGES: typing.ClassVar[dict] = {
        "learning_rate": _POSITIVE,
        "weight_decay": _at_least(0),
        "warmup_steps": _at_least(0),
        "max_steps": _at_least(1),
        "batch_size": _at_least(1),
        "grad_accum": _at_least(1),
        "max_grad_norm": _POSITIVE,
    }


@dataclasses.dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    # completions per prompt; rewarded modes normalise advantages within a group, so they need 2 or more (on-policy
    # distillation, unrewarded, can take 1)
    group_size: int = 4
    # The sampling temperature (> 0). In the rewarded modes the losses' logits (and the rollout policy's and the
    # reference's log-probs) are divided by it too, as TRL does: those of the distribution the rollouts came from.
    temperature: float = 1.0
    max_new_tokens: int = 8

    RANGES: typing.ClassVar[dict] = {
        "prompts_per_step": _at_least(1),
        "temperature": _POSITIVE,
        "max_new_tokens": _at_least(1),
    }


@dataclasses.dataclass
class ObjectiveConfig:
    chord_preset: str | None = None  # "chord-mu" or "chord-phi"; the mu_* and use_phi keys otherwise
    mu: float | None = None  # constant mu; None with no preset: the schedule below
    mu_warmup_steps: int = 0
    mu_decay_steps: int = 200
    mu_peak: float = 0.9
    mu_valley: float = 0.05
    use_phi: bool = False
    # Clip bounds; None: the objective's own (GRPO and CHORD 0.2 / 0.2, CISPO 1.0 / 0.28, GMPO 0.4 / 0.4).
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    beta: float = 0.0  # GRPO / CISPO KL coefficient; DPO / MinorSFT beta when those modes run (defaults 0.1 there)
    # None: the loss type's normalisation (grpo mode), token-mean (cispo); a name overrides it.
    aggregation: str | None = None
    # The grpo mode's policy loss, TRL's names (grpo_loss; docs/objectives.md, "Loss types").
    loss_type: str = "dapo"
    importance_sampling: str | None = None  # "token" or "sequence" (GSPO); None: sequence for luspo, else token
    dual_clip: float | None = 3.0
    delta: float | None = None  # two-sided clip: the unclipped ratio capped at delta (INTELLECT-2)
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # drop negative-advantage rollouts whose mean log-ratio to the rollout policy exceeds it (DeepSeek-V3.2)
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = False  # the k3 KL times the importance ratio
    top_entropy_quantile: float = 1.0  # only this top fraction of tokens by entropy carries the policy loss
    # The sampler correction (TRL's vllm_importance_sampling_mode): None off; a mode records the log-probs the
    # sampler gave the drawn tokens during generation and weights each token by exp(old_logp - sampler_logp)
    # (token_* per token, sequence_* its product over the completion), truncated to or masked outside the clips.
    sampler_correction: str | None = None
    sampler_clip_min: float | None = None
    sampler_clip_max: float | None = 3.0
    dpo_loss_type: str = "sigmoid"
    # KTO's weights of the desirable and undesirable responses' losses (TRL's desirable_weight / undesirable_weight)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # CPO: the weight of the NLL on the chosen responses (TRL's cpo_alpha) and the label smoothing of its sigmoid
    cpo_alpha: float = 1.0
    cpo_label_smoothing: float = 0.0
    gamma: float = 0.95  # IFT
    ift_lambda: float = 0.2  # IFT input mixing
    reward: str = "exact_match"  # "exact_match", "numeric", or a dotted path to a callable
    # Distillation (mode distill, the teacher in the teacher section). "on": the student's own sampled completions
    # of the prompts (rollout.*), scored token by token by the teacher, no reward; "off": the demonstrations
    # (prompt + response), teacher-forced.
    distill_policy: str = "on"
    # The divergence (distill_loss's beta, as TRL's GKD): 0 forward KL(teacher || student), 1 reverse
    # KL(student || teacher), between the generalized JSD. Its own key: `beta` is GRPO's KL weight and DPO's beta.
    distill_beta: float = 0.0
    # Divides both heads' logits in the divergence; rollout.temperature is the sampling temperature, apart from it.
    distill_temperature: float = 1.0
    # Weight of the cross-entropy on the targets added to the divergence (off: the demonstrations' tokens; on: the
    # student's own samples, seldom wanted).
    hard_weight: float = 0.0

    RANGES: typing.ClassVar[dict] = {
        "mu": _FRACTION,
        "mu_warmup_steps": _at_least(0),
        "mu_decay_steps": _at_least(0),
        "mu_peak": _FRACTION,
        "mu_valley": _FRACTION,
        "epsilon_low": _POSITIVE,
        "epsilon_high": _POSITIVE,
        "beta": _at_least(0),
        "gamma": (0, 1, False, True),
        "ift_lambda": _FRACTION,
        "distill_beta": _FRACTION,
        "distill_temperature": _POSITIVE,
        "hard_weight": _at_least(0),
        "dual_clip": (1, None, False, True, "the dual-clip bound is a ratio > 1"),
        "delta": (1, None, False, True, "the two-sided clip's cap is a ratio > 1"),
        "sapo_temperature_pos": _POSITIVE,
        "sapo_temperature_neg": _POSITIVE,
        "vespo_k_pos": _at_least(0),
        "vespo_lambda_pos": _POSITIVE,
        "vespo_k_neg": _at_least(0),
        "vespo_lambda_neg": _POSITIVE,
        "off_policy_mask_threshold": _at_least(0),
        "top_entropy_quantile": _FRACTION,
        "desirable_weight": _at_least(0),
        "undesirable_weight": _at_least(0),
        "cpo_alpha": _at_least(0),
        "cpo_label_smoothing": (0, 0.5, True, False),
        "sampler_clip_min": _at_least(0),
        "sampler_clip_max": _at_least(0),
    }
    CHOICES = {
        "chord_preset": (None, "chord-mu", "chord-phi"),
        "aggregation": (None, *AGGREGATIONS),
        "loss_type": LOSS_TYPES,
        "importance_sampling": (None, *IMPORTANCE_SAMPLING),
        "sampler_correction": (None, *SAMPLER_CORRECTIONS),
        "dpo_loss_type": ("sigmoid", "ipo", "simpo"),
        "distill_policy": ("on", "off"),
    }
    # YAML reads an unquoted on / off as true / false: taken back as the word written.
    BOOLEAN_WORDS = {"distill_policy": ("off", "on")}


@dataclasses.dataclass
class TrainConfig:
    mode: str = "sft"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    output_dir: str = "runs/fused-hybrid"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    # Under torchrun (WORLD_SIZE > 1): "ddp" replicates the model, "fsdp2" shards it (fully_shard per layer).
    parallel: str = "ddp"

    CHOICES = {"mode": registered_modes, "parallel": ("ddp", "fsdp2")}
    RANGES: typing.ClassVar[dict] = {
        "seed": _at_least(0),
        "log_every": _at_least(1),
        "eval_every": _at_least(1),
        "save_every": _at_least(1),
        "keep_checkpoints": _at_least(1),
    }


def _check_range(value, bounds, key: str) -> None:
    low, high, low_allowed, high_allowed, why = (*bounds, "")[:5]
    below = low is not None and (value < low if low_allowed else value <= low)
    above = high is not None and (value > high if high_allowed else value >= high)
    if below or above or value != value or value in (float("inf"), float("-inf")):  # NaN and infinities too
        parts = []
        if low is not None:
            parts.append(f"{'>=' if low_allowed else '>'} {low}")
        if high is not None:
            parts.append(f"{'<=' if high_allowed else '<'} {high}")
        reason = f" ({why})" if why else ""
        raise ConfigError(
            f"{key}: {value!r} is out of range; allowed: {' and '.join(parts) or 'a finite number'}{reason}"
        )


def check_across_sections(config: TrainConfig) -> None:
    """The rules that tie one setting to another, and the model and teacher folders."""
    objective = OBJECTIVES[config.mode]
    try:
        objective.check_config_options(config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"objective: {error} (mode {config.mode!r})") from None
    if objective.rewarded(config):
        why = "a lone completion has no group to be compared with: every group-normalised advantage would be 0"
        _check_range(config.rollout.group_size, _at_least(2, why), "rollout.group_size")
    else:
        _check_range(config.rollout.group_size, _at_least(1), "rollout.group_size")
    rows_per_step = config.optim.batch_size
    if objective.samples(config):
        rows_per_step = config.rollout.prompts_per_step * config.rollout.group_size
    if config.optim.grad_accum > rows_per_step:
        raise ConfigError(
            f"optim.grad_accum: {config.optim.grad_accum} micro-batches for {rows_per_step} sequences "
            f"per step leaves some empty; allowed: <= {rows_per_step}"
        )
    if config.model.path is not None and not Path(config.model.path).is_dir():
        raise ConfigError(
            f"model.path: {config.model.path!r}: no such folder (a local Hugging Face model folder, "
            "or leave it out for a tiny model built from model.tiny)"
        )
    teacher = config.teacher
    if objective.needs_teacher(config) and teacher.path is None and teacher.tiny is None:
        raise ConfigError(
            f"teacher: mode {config.mode!r} learns from a teacher: set teacher.path (a local Hugging Face model "
            "folder) or teacher.tiny (a model config like model.tiny, random weights)"
        )
    config.model.tiny.check("model.tiny")
    if teacher.tiny is not None:
        teacher.tiny.check("teacher.tiny")
    if teacher.path is not None and teacher.tiny is not None:
        raise ConfigError("teacher: give teacher.path or teacher.tiny, not both")
    if teacher.path is not None and not Path(teacher.path).is_dir():
        raise ConfigError(
            f"teacher.path: {teacher.path!r}: no such folder (a local Hugging Face model folder with its tokenizer)"
        )
