"""CHORD (docs/objectives.md, "CHORD"): on-policy GRPO and phi-weighted SFT on expert data, mixed by a scheduled
mu."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..checks import check_non_negative
from ..engine.head import HeadSpec
from ..reduction import check_num_items
from .policy_gradient import (
    POLICY_METRICS,
    check_clip_options,
    clipped_surrogate,
    log_importance_ratio,
    policy_metrics,
)
from .registry import Objective, clip_options, register
from .tokens import LossOutput, ObjectiveModule, TokenBatch, TokenLayout, aggregate, evaluate_objective


@dataclasses.dataclass(frozen=True)
class MuSchedule:
    """mu for a global step k: linear warm-up to `peak` over `warmup_steps`, cosine decay to `valley` over
    `decay_steps`, then constant; ``MuSchedule(0, 0, peak, valley)`` is the constant `valley`."""

    warmup_steps: int = 0
    decay_steps: int = 200
    peak: float = 0.9
    valley: float = 0.05

    def __post_init__(self) -> None:
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("peak", "valley"):
            check_mu(getattr(self, name), name)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak * step / self.warmup_steps
        if step < self.warmup_steps + self.decay_steps:
            progress = (step - self.warmup_steps) / self.decay_steps
            return self.valley + (self.peak - self.valley) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.valley


def check_chord_options(cutoff_prob, epsilon_low, epsilon_high, dual_clip) -> None:
    """CHORD's options besides mu, checked by the function and when the module is built."""
    check_clip_options(epsilon_low, epsilon_high, dual_clip)
    check_non_negative("cutoff_prob", cutoff_prob)
    if not 0.0 < cutoff_prob <= 1.0:
        raise ValueError(f"cutoff_prob must lie in (0, 1], got {cutoff_prob}")


def check_mu(mu, name: str = "mu") -> None:
    if isinstance(mu, torch.Tensor):
        if mu.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-d tensor, got shape {tuple(mu.shape)}")
        return  # a tensor's value is not read on the host (no sync); the caller vouches for [0, 1]
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0.0 <= mu <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {mu!r}")


def chord_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    is_expert: torch.Tensor,
    mu: float | torch.Tensor,
    advantages: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    num_sequences: int | None = None,
    use_phi: bool = False,
    cutoff_prob: float = 1.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    dual_clip: float | None = 3.0,
    num_rollout_tokens: int | torch.Tensor | None = None,
    num_expert_tokens: int | torch.Tensor | None = None,
    head: HeadSpec | None = None,
    **head_options,
) -> LossOutput:
    """``L = (1 - mu) * L_GRPO(rollouts) + mu * L_SFT(expert demonstrations)`` on one batch.

    ``is_expert`` ([num_sequences] bool) tells the expert sequences from the on-policy rollouts. ``L_GRPO`` is the
    token-mean clipped surrogate over rollout tokens (no KL term); ``L_SFT = -(1/N_exp) sum_t sg(phi_t) logp_t``
    over expert tokens with ``phi_t = p_t (1 - p_t)`` when ``use_phi`` (``p_t`` from ``logp_t`` clamped to
    ``log(cutoff_prob)``), else ``phi_t = 1``. Each part is normalised by its own token count, or by
    ``num_rollout_tokens`` / ``num_expert_tokens`` when given (global counts for accumulation).
    ``advantages`` are needed for the rollout sequences (values on expert sequences are ignored).

    Metrics: ``mu``, ``grpo_loss``, ``sft_loss`` (the plain NLL of the expert tokens), ``mean_phi``, and the
    policy metrics of :func:`grpo_loss` over the rollout tokens.
    """
    check_mu(mu)
    check_chord_options(cutoff_prob, epsilon_low, epsilon_high, dual_clip)
    check_num_items(num_rollout_tokens, name="num_rollout_tokens")
    check_num_items(num_expert_tokens, name="num_expert_tokens")
    if advantages is None:
        raise ValueError("advantages is required for the rollout sequences (per token or per sequence)")

    def loss_of_batch(batch: TokenBatch) -> LossOutput:
        batch.require_sequences("chord_loss")
        expert_tokens = batch.to_tokens(batch.per_sequence(is_expert, "is_expert").to(torch.bool))
        rollouts = batch.restrict(~expert_tokens)
        experts = batch.restrict(expert_tokens)

        # Expert sequences have no rollout policy or advantage: whatever they hold there (even NaN) is replaced.
        is_rollout = rollouts.mask
        old_token_logp = None
        if old_logp is not None:
            old_token_logp = torch.where(
                is_rollout, batch.per_token(old_logp, "old_logp", per_sequence=False), batch.logp.detach()
            )
        token_advantages = torch.where(is_rollout, batch.per_token(advantages, "advantages"), 0.0)
        policy_loss, active = clipped_surrogate(
            log_importance_ratio(rollouts, old_token_logp, "token"),
            token_advantages,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            dual_clip=dual_clip,
        )
        grpo_part = aggregate(
            policy_loss, rollouts, "token-mean", num_items=num_rollout_tokens, count_name="num_rollout_tokens"
        )

        if use_phi:
            prob = batch.logp.detach().clamp(max=math.log(cutoff_prob)).exp()
            phi = prob * (1.0 - prob)
        else:
            phi = torch.ones_like(batch.logp)
        sft_part = aggregate(
            -phi * batch.logp, experts, "token-mean", num_items=num_expert_tokens, count_name="num_expert_tokens"
        )

        metrics = policy_metrics(rollouts, active)
        metrics.update(
            # a Python mu is written into the metric by a fill kernel, never copied from the host
            mu=mu.detach() if isinstance(mu, torch.Tensor) else torch.full_like(grpo_part, mu).detach(),
            grpo_loss=grpo_part.detach(),
            sft_loss=experts.token_mean(-batch.logp),
            mean_phi=experts.token_mean(phi),
        )
        return LossOutput((1.0 - mu) * grpo_part + mu * sft_part, metrics)

    head = HeadSpec.resolve(head, head_options)
    layout = TokenLayout.read(
        targets, head, loss_mask=loss_mask, sequence_ids=sequence_ids, num_sequences=num_sequences
    )
    layout.check_inputs(
        per_token={"old_logp": old_logp},
        per_token_or_sequence={"advantages": advantages},
        per_sequence={"is_expert": is_expert},
    )
    plan = CHORD.gradient_plan()
    return evaluate_objective(
        loss_of_batch, hidden, weight, bias, layout, head=head, plan=plan, inputs=(advantages, old_logp, mu)
    )


class CHORDLoss(ObjectiveModule):
    """Module form of :func:`chord_loss`; `mu` is a number or a :class:`MuSchedule` read at the call's `step`.

    Presets with the paper's settings: :meth:`chord_mu` (phi off, mu decays 0.9 -> 0.05 over 200 steps) and
    :meth:`chord_phi` (phi on, mu constant 0.1).
    """

    def __init__(
        self,
        *,
        mu: float | MuSchedule = 0.1,
        use_phi: bool = False,
        cutoff_prob: float = 1.0,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        dual_clip: float | None = 3.0,
        head: HeadSpec | None = None,
        **head_options,
    ) -> None:
        super().__init__()
        if not isinstance(mu, MuSchedule):
            check_mu(mu)
        check_chord_options(cutoff_prob, epsilon_low, epsilon_high, dual_clip)
        self.mu = mu
        self.options = dict(
            use_phi=use_phi,
            cutoff_prob=cutoff_prob,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            dual_clip=dual_clip,
            head=HeadSpec.resolve(head, head_options),
        )

    @classmethod
    def chord_mu(cls, **overrides) -> CHORDLoss:
        """CHORD-mu: phi off, mu cosine-decays from 0.9 to 0.05 over 200 steps with no warm-up."""
        return cls(
            **{"mu": MuSchedule(warmup_steps=0, decay_steps=200, peak=0.9, valley=0.05), "use_phi": False, **overrides}
        )

    @classmethod
    def chord_phi(cls, **overrides) -> CHORDLoss:
        """CHORD-phi: phi = p(1 - p) token weighting on, mu constant 0.1."""
        return cls(**{"mu": 0.1, "use_phi": True, **overrides})

    def mu_at(self, step: int | None) -> float:
        if isinstance(self.mu, MuSchedule):
            if step is None:
                raise ValueError("step is required: this CHORDLoss reads mu from a MuSchedule")
            return self.mu(step)
        return self.mu

    def forward(
        self,
        hidden,
        weight,
        targets,
        bias=None,
        *,
        is_expert,
        advantages,
        old_logp=None,
        loss_mask=None,
        sequence_ids=None,
        num_sequences=None,
        step=None,
        num_rollout_tokens=None,
        num_expert_tokens=None,
    ) -> torch.Tensor:
        return self._finish(
            chord_loss(
                hidden,
                weight,
                targets,
                bias,
                is_expert=is_expert,
                mu=self.mu_at(step),
                advantages=advantages,
                old_logp=old_logp,
                loss_mask=loss_mask,
                sequence_ids=sequence_ids,
                num_sequences=num_sequences,
                num_rollout_tokens=num_rollout_tokens,
                num_expert_tokens=num_expert_tokens,
                **self.options,
            )
        )


def trainer_mu(objective_config) -> MuSchedule | float:
    """mu from the trainer's objective config: a preset's, a constant `mu`, or the schedule of the mu_* keys."""
    if objective_config.chord_preset == "chord-mu":
        return CHORDLoss.chord_mu().mu
    if objective_config.chord_preset == "chord-phi":
        return CHORDLoss.chord_phi().mu
    if objective_config.mu is not None:
        return objective_config.mu
    return MuSchedule(
        objective_config.mu_warmup_steps,
        objective_config.mu_decay_steps,
        objective_config.mu_peak,
        objective_config.mu_valley,
    )


def _trainer_options(config, step: int) -> dict:
    objective = config.objective
    mu = trainer_mu(objective)
    preset = objective.chord_preset
    use_phi = preset == "chord-phi" if preset is not None else objective.use_phi
    return dict(mu=mu(step) if isinstance(mu, MuSchedule) else float(mu), use_phi=use_phi, **clip_options(config))


CHORD = register(
    Objective(
        name="chord",
        loss=chord_loss,
        data="rollouts+demonstrations",
        normalisers={"num_rollout_tokens": "rollout_tokens", "num_expert_tokens": "expert_tokens"},
        batch_inputs=("is_expert", "advantages", "old_logp"),
        options=_trainer_options,
        metric_counts={
            "mu": "constant",
            "grpo_loss": "sum",
            "sft_loss": "expert_tokens",
            "mean_phi": "expert_tokens",
            **dict.fromkeys(POLICY_METRICS, "rollout_tokens"),
        },
    )
)
