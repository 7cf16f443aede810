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
OBJECTIVES = ("cross_entropy", "logprobs_entropy", "dft", "grpo", "chord", "dpo")
# random: unit-scale logits, near-uniform softmax. trained: what a trained head gives (the regime Cut Cross-Entropy's
# filtering is made for): a confident target logit and a heavy-tailed rest, where data-dependent work shows.
INPUT_DISTRIBUTIONS = ("random", "trained")
TRAINED_TARGET_MARGIN = 16.0  # the target logit's expected lead over a typical logit
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Problem:
    """One micro-batch: hidden [B, T, D] and weight [V, D] are leaves that require grad; targets [B, T]."""

    objective: str
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()

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
    seed: int = 0,
    distribution: str = "random",
) -> Problem:
    """Fresh random inputs for `objective` with `num_tokens` = B * T tokens (T = min(seq_len, num_tokens)).

    Logits have unit scale (weight ~ N(0, 1/D)); RL objectives mask the first quarter of each sequence (the
    prompt); DPO has an even number of sequences (chosen then rejected) and a frozen reference head's hidden states.
    Pass `weight` to share one head between problems (it is the largest input).

    ``distribution="trained"``: the head's rows have log-normal norms (a heavy-tailed logit distribution) and each
    hidden state is noise plus a component along its target's row worth TRAINED_TARGET_MARGIN in the target logit.
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

    if weight is None:
        weight = torch.randn(vocab, dim, generator=generator) * dim**-0.5
        if distribution == "trained":
            weight *= torch.exp(0.4 * torch.randn(vocab, 1, generator=generator))
        weight = weight.to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    if distribution == "trained":
        rows = weight.detach().float()[targets]
        direction = rows / rows.square().sum(-1, keepdim=True)
        noise = torch.randn(batch, length, dim, generator=generator).to(device)
        hidden = (noise + TRAINED_TARGET_MARGIN * direction).to(dtype).requires_grad_()
    else:
        hidden = randn(batch, length, dim).requires_grad_()
    extras: dict[str, torch.Tensor] = {}
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
    return Problem(objective, hidden, weight, targets, extras)
