"""Data: datasets from JSONL / Parquet / save_to_disk folders (or the synthetic addition task), the columns each
mode needs, and batches of token ids with labels.

Columns (names configurable in the `data` section):
- sft, dft, ift, minor_sft: `prompt`, `response`;
- dpo: `prompt`, `chosen`, `rejected`;
- grpo: `prompt`, plus whatever the reward function reads (`answer` for the built-in rewards);
- chord: `prompt`, `response` (the expert demonstration) and the reward's columns.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from .config import DataConfig
from .text import prompt_ids, response_ids

logger = logging.getLogger("fused_hybrid.trainer")
IGNORE_INDEX = -100


def addition_task(size: int, digits: int, seed: int) -> list[dict]:
    """`a+b=` -> `a+b`, with operands of up to `digits` digits; a verifiable task with exact answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        rows.append({"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)})
    return rows


ADDITION_CHARACTERS = "0123456789+="


def load_dataset(config: DataConfig, seed: int):
    """A `datasets.Dataset` from `config.path`."""
    import datasets

    if config.path == "synthetic:addition":
        return datasets.Dataset.from_list(addition_task(config.synthetic_size, config.synthetic_digits, seed))
    path = Path(config.path)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return loaded
    if not path.is_file():
        raise ValueError(f"data.path {config.path!r}: no such file or folder (or use 'synthetic:addition')")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise ValueError(f"data.path {config.path!r}: expected a .jsonl, .json or .parquet file, or a dataset folder")
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def required_columns(data_kind: str, config: DataConfig, reward_columns: tuple[str, ...]) -> list[str]:
    """The dataset columns an objective's kind of data needs (see objectives.registry.DATA_KINDS)."""
    if data_kind == "preferences":
        return [config.prompt_column, config.chosen_column, config.rejected_column]
    if data_kind == "rollouts":
        return [config.prompt_column, *reward_columns]
    if data_kind == "rollouts+demonstrations":
        return [config.prompt_column, config.response_column, *reward_columns]
    return [config.prompt_column, config.response_column]


def check_columns(dataset, columns: list[str], path: str) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset {path!r} lacks the column(s) {missing} this mode needs; it has {dataset.column_names} "
            "(rename them in the data section: prompt_column, response_column, ...)"
        )


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of prompt + response, labels only on the response; None (and a log line) when the
    prompt alone does not fit `max_length`. A response that does not fit is truncated."""
    prompt_part = prompt_ids(tokenizer, prompt)
    if len(prompt_part) >= max_length:
        logger.warning("skipping a sample: its prompt has %d tokens, max_length is %d", len(prompt_part), max_length)
        return None
    ids = (prompt_part + response_ids(tokenizer, response))[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_part) + ids[len(prompt_part) :]
    return ids, labels


def pad_batch(pairs: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels."""
    length = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def pad_prompts_left(prompts: list[list[int]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
