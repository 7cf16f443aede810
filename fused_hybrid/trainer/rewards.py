"""Rewards for rollouts: a callable `reward(prompts, completions, **columns) -> list[float]`, one per completion.

`columns` holds the dataset's other fields for each completion (e.g. `answer`). Built in: `exact_match` and
`numeric` (the last number in the completion equals the answer's). A custom reward is named by a dotted path,
`package.module:function` or `package.module.function`.
"""

from __future__ import annotations

import importlib
import math
import re

import torch

from .config import ConfigError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def exact_match(prompts, completions, answer, **_) -> list[float]:
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def numeric(prompts, completions, answer, **_) -> list[float]:
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = NUMBER.findall(completion)
        try:
            rewards.append(float(bool(numbers) and math.isclose(float(numbers[-1]), float(expected), abs_tol=1e-6)))
        except ValueError:
            rewards.append(0.0)
    return rewards


BUILT_IN = {"exact_match": exact_match, "numeric": numeric}
BUILT_IN_COLUMNS = ("answer",)


class RewardError(RuntimeError):
    """A reward function failed or returned something other than one finite number per completion."""


def load_reward(spec: str):
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, _, attribute = spec.replace(":", ".").rpartition(".")
    if not module_name:
        raise ConfigError(f"objective.reward {spec!r}: use {', '.join(BUILT_IN)} or a dotted path module.function")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"objective.reward {spec!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ConfigError(f"objective.reward {spec!r} is not callable")
    return function


def compute_rewards(function, prompts: list[str], completions: list[str], columns: dict[str, list]) -> torch.Tensor:
    name = getattr(function, "__qualname__", repr(function))
    try:
        values = function(prompts, completions, **columns)
    except Exception as error:
        raise RewardError(f"reward function {name} raised {type(error).__name__}: {error}") from error
    try:
        rewards = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RewardError(f"reward function {name} must return numbers, got {type(values).__name__}") from error
    if rewards.numel() != len(completions):
        raise RewardError(
            f"reward function {name} returned {rewards.numel()} rewards for {len(completions)} "
            "completions; it must return one per completion"
        )
    if not torch.isfinite(rewards).all():
        raise RewardError(f"reward function {name} returned a non-finite reward")
    return rewards


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = (R_i - mean_group R) / (std_group R + 1e-6) (docs/objectives.md, "Group-normalised advantages")."""
    grouped = rewards.reshape(-1, group_size)
    std = grouped.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(dim=1, keepdim=True)) / (std + 1e-6)).reshape(-1)
