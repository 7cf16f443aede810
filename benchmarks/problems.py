"""What is benchmarked: LM-head shape presets and, per objective, the inputs of one training micro-batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PRESETS = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
    "llama3.2-1b": (2048, 128256),
    "tiny": (256, 8192),  # CPU-sized
}
OBJECTIVES = ("cross_entropy", "logprobs_entropy", "dft", "grpo", "chord", "dpo", "distill")
# random: unit-scale logits, near-uniform softmax. trained: what a trained head gives (the regime Cut Cross-Entropy's
# filtering is made for): a confident target logit and a heavy-tailed rest, where data-dependent work shows.
INPUT_DISTRIBUTIONS = ("random", "trained")
TRAINED_TARGET_MARGIN = 16.0  # the target logit's expected lead over a typical logit
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
IGNORE_INDEX = -100
# distill: the teacher's head is this many times the student's width; the first 1/DISTILL_IGNORED_SHARE of each
# sequence (a short prompt) is outside the loss, its targets ignore_index
DISTILL_TEACHER_WIDTH = 2
DISTILL_IGNORED_SHARE = 8


@dataclass
class Problem:
    """One micro-batch: hidden [B, T, D] and weight [V, D] are leaves that require grad; targets [B, T]; `options`
    are the objective's scalar settings (distill: beta, temperature)."""

    objective: str
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()

    @property
    def teacher_dim(self) -> int | None:
        teacher = self.extras.get("teacher_weight")
        return None if teacher is None else teacher.shape[1]

    @property
    def num_logits(self) -> int:
        """How many logits the naive loss builds: N x V per head (the student's, and a teacher's)."""
        heads = 1 if self.teacher_dim is None else 2
        return heads * self.num_tokens * self.weight.shape[0]

    @property
    def matmul_flops(self) -> int:
        """The GEMM FLOPs a fwd+bwd cannot avoid: the student's logits and both gradients (6 N D V), plus the
        teacher's logits (2 N D_t V) for distillation."""
        flops = 6 * self.num_tokens * self.hidden.shape[-1] * self.weight.shape[0]
        if self.teacher_dim is not None:
            flops += 2 * self.num_tokens * self.teacher_dim * self.weight.shape[0]
        return flops

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    def upcast(self, dtype: torch.dtype) -> Problem:
        """The same problem with hidden/weight (and floating extras) in `dtype`, as fresh leaves."""
        extras = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.extras.items()}
        return Problem(
            self.objective,
            self.hidden.detach().to(dtype).requires_grad_(),
            self.weight.detach().to(dtype).requires_grad_(),
            self.targets,
            extras,
            dict(self.options),
        )


def make_problem(
    objective: str,
    num_tokens: int,
    dim: int,
    vocab: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seq_len: int,
    weight: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    seed: int = 0,
    distribution: str = "random",
    distill_beta: float = 0.5,
    distill_temperature: float = 1.0,
) -> Problem:
    """Fresh random inputs for `objective` with `num_tokens` = B * T tokens (T = min(seq_len, num_tokens)).

    Logits have unit scale (weight ~ N(0, 1/D)); RL objectives mask the first quarter of each sequence (the
    prompt); DPO has an even number of sequences (chosen then rejected) and a frozen reference head's hidden states.
    Distillation has a frozen teacher head DISTILL_TEACHER_WIDTH times the student's width (the same vocabulary)
    with its own hidden states, the first 1/DISTILL_IGNORED_SHARE of each sequence ignored (ignore_index targets),
    and `distill_beta` (TRL's: 0 forward KL, 1 reverse KL, between the generalized JSD) and `distill_temperature`
    as its options. Pass `weight` (and `teacher_weight`) to share the heads between problems (the largest inputs).

    ``distribution="trained"``: the head's rows have log-normal norms (a heavy-tailed logit distribution) and each
    hidden state is noise plus a component along its target's row worth TRAINED_TARGET_MARGIN in the target logit;
    the teacher's likewise.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if distribution not in INPUT_DISTRIBUTIONS:
        raise ValueError(f"unknown input distribution {distribution!r}; valid: {', '.join(INPUT_DISTRIBUTIONS)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    length = min(seq_len, num_tokens)
    batch = max(1, num_tokens // length)
    if objective == "dpo" and batch % 2:
        batch += 1

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    def new_head(width: int) -> torch.Tensor:
        head = torch.randn(vocab, width, generator=generator) * width**-0.5
        if distribution == "trained":
            head *= torch.exp(0.4 * torch.randn(vocab, 1, generator=generator))
        return head.to(device=device, dtype=dtype)

    def states(head: torch.Tensor) -> torch.Tensor:
        width = head.shape[1]
        if distribution != "trained":
            return randn(batch, length, width)
        rows = head.detach().float()[targets]
        direction = rows / rows.square().sum(-1, keepdim=True)
        noise = torch.randn(batch, length, width, generator=generator).to(device)
        return (noise + TRAINED_TARGET_MARGIN * direction).to(dtype)

    if weight is None:
        weight = new_head(dim).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    hidden = states(weight).requires_grad_()
    extras: dict[str, torch.Tensor] = {}
    options: dict[str, float] = {}
    if objective in ("grpo", "chord", "dpo"):
        loss_mask = torch.ones(batch, length, dtype=torch.long)
        loss_mask[:, : length // 4] = 0
        extras["loss_mask"] = loss_mask.to(device)
    if objective in ("grpo", "chord"):
        extras["advantages"] = torch.randn(batch, generator=generator).to(device)
        extras["old_logp"] = (-torch.rand(batch, length, generator=generator) * 8).to(device)
    if objective == "chord":
        extras["is_expert"] = (torch.arange(batch) % 4 == 0).to(device)
    if objective == "dpo":
        extras["ref_hidden"] = randn(batch, length, dim)
    if objective == "distill":
        if teacher_weight is None:
            teacher_weight = new_head(DISTILL_TEACHER_WIDTH * dim)
        extras["teacher_weight"] = teacher_weight
        extras["teacher_hidden"] = states(teacher_weight)
        targets[:, : length // DISTILL_IGNORED_SHARE] = IGNORE_INDEX
        options = {"beta": distill_beta, "temperature": distill_temperature}
    return Problem(objective, hidden, weight, targets, extras, options)
