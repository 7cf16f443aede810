"""Generation: sampled completions of prompts (on-policy distillation's), the RL modes' rollouts (those with their
rewards and group-normalised advantages) and greedy evaluation."""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig
from .data import IGNORE_INDEX, pad_prompts_left
from .rewards import BUILT_IN, compute_rewards, group_advantages
from .text import prompt_ids


class SampledTokenLogProbs:
    """A logits processor that records, during generate(), the log-prob the sampler gave each token it drew:
    log_softmax(scores / T) at the drawn token. generate() runs it after its other logits processors (penalties,
    forced or suppressed tokens: what they do is recorded) and before its warpers, of which `POLICY_SAMPLING` leaves
    only the temperature. Only the last step's row is kept, until the next step shows which token it drew."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.last_step: torch.Tensor | None = None  # [B, V] log-probs of the step whose token is not yet known
        self.token_logps: list[torch.Tensor] = []

    def _take_last_step(self, drawn: torch.Tensor) -> None:
        self.token_logps.append(self.last_step.gather(-1, drawn[:, None])[:, 0])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last_step is not None:
            self._take_last_step(input_ids[:, -1])
        self.last_step = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def completion_logps(self, completion: torch.Tensor) -> torch.Tensor:
        """[B, L] log-probs of the L drawn completion tokens."""
        if self.last_step is not None:
            self._take_last_step(completion[:, len(self.token_logps)])
            self.last_step = None
        return torch.stack(self.token_logps, dim=1)


# generate()'s settings that would make it sample from another distribution than the policy's at the temperature,
# set to their neutral values whatever the model's generation_config says (a real model's often sets top_p / top_k).
POLICY_SAMPLING = {
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "top_h": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "watermarking_config": None,
}


def policy_sampling() -> dict:
    """POLICY_SAMPLING's settings that the installed transformers knows."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    return {name: value for name, value in POLICY_SAMPLING.items() if hasattr(known, name)}


@torch.no_grad()
def sample_completions(
    model: nn.Module, tokenizer, rows, config: TrainConfig, device: torch.device, *, sampler_logps: bool = False
):
    """`rollout.group_size` completions per prompt of `rows` (left-padded prompts, sampling with the KV cache), cut
    after the first eos: (input_ids, attention_mask and labels (completion tokens only), the completions' texts).
    With `sampler_logps`, also `sampler_logp` [B, T - 1] aligned with the shifted labels: the log-prob the sampler
    gave each completion token (NaN elsewhere), for the sampler correction of the policy losses."""
    rollout, data = config.rollout, config.data
    prompts = [prompt_ids(tokenizer, r[data.prompt_column])[-(data.max_length - 1) :] for r in rows]
    repeated = [p for p in prompts for _ in range(rollout.group_size)]
    inputs = pad_prompts_left(repeated, tokenizer.pad_token_id, device)
    from transformers import LogitsProcessorList

    recorder = SampledTokenLogProbs(rollout.temperature) if sampler_logps else None
    model.eval()
    model.config.use_cache = True
    try:
        generated = model.generate(
            **inputs,
            do_sample=True,
            temperature=rollout.temperature,
            max_new_tokens=rollout.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
            **policy_sampling(),
        )
    finally:
        model.config.use_cache = False
        model.train()
    prompt_length = inputs["input_ids"].shape[1]
    completion = generated[:, prompt_length:]
    is_eos = completion == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # tokens after the first eos
    completion_mask = (~after_eos).long()
    completion = completion.masked_fill(after_eos, tokenizer.pad_token_id)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completion.tolist()]
    labels = torch.cat(
        [
            torch.full_like(inputs["input_ids"], IGNORE_INDEX),
            completion.masked_fill(completion_mask == 0, IGNORE_INDEX),
        ],
        dim=1,
    )
    sequences = {
        "input_ids": torch.cat([inputs["input_ids"], completion], dim=1),
        "attention_mask": torch.cat([inputs["attention_mask"], completion_mask], dim=1),
        "labels": labels,
    }
    if recorder is not None:
        drawn = recorder.completion_logps(completion).masked_fill(completion_mask == 0, float("nan"))
        prompt_part = torch.full((len(drawn), prompt_length - 1), float("nan"), device=drawn.device)
        sequences["sampler_logp"] = torch.cat([prompt_part, drawn], dim=1)  # target j is token j + 1
    return sequences, texts


@torch.no_grad()
def sample_rollouts(
    model: nn.Module, tokenizer, rows, config: TrainConfig, reward_fn, device: torch.device, *, sampler_logps=False
) -> dict:
    """The sampled completions of `rows` (sample_completions) with their rewards and group-normalised advantages:
    input_ids, attention_mask, labels, rewards, advantages (and sampler_logp with `sampler_logps`)."""
    rollout, data = config.rollout, config.data
    sequences, texts = sample_completions(model, tokenizer, rows, config, device, sampler_logps=sampler_logps)
    columns = {
        c: [r[c] for r in rows for _ in range(rollout.group_size)] for c in rows.column_names if c != data.prompt_column
    }
    prompt_texts = [r[data.prompt_column] for r in rows for _ in range(rollout.group_size)]
    rewards = compute_rewards(reward_fn, prompt_texts, texts, columns).to(device)
    return {**sequences, "rewards": rewards, "advantages": group_advantages(rewards, rollout.group_size)}


@torch.no_grad()
def greedy_accuracy(model: nn.Module, tokenizer, rows, config: TrainConfig, reward_fn, device: torch.device) -> float:
    """The mean reward (exact match unless `reward_fn`) of greedy completions of `rows` (a Dataset with the prompt
    and answer columns)."""
    data = config.data
    prompts = [prompt_ids(tokenizer, r[data.prompt_column])[-(data.max_length - 1) :] for r in rows]
    inputs = pad_prompts_left(prompts, tokenizer.pad_token_id, device)
    model.eval()
    model.config.use_cache = True
    try:
        generated = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=config.rollout.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    finally:
        model.config.use_cache = False
        model.train()
    completions = [
        tokenizer.decode(g, skip_special_tokens=True) for g in generated[:, inputs["input_ids"].shape[1] :].tolist()
    ]
    columns = {c: list(rows[c]) for c in rows.column_names if c != data.prompt_column}
    texts = [r[data.prompt_column] for r in rows]
    return compute_rewards(reward_fn or BUILT_IN["exact_match"], texts, completions, columns).mean().item()
