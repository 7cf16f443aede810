"""Data: datasets from JSONL / Parquet / save_to_disk folders (or the synthetic addition task), the columns each
mode needs, and batches of token ids with labels.

Columns (names configurable in the `data` section):
- sft, dft, ift, minor_sft: `prompt`, `response`;
- dpo: `prompt`, `chosen`, `rejected`;
- grpo: `prompt`, plus whatever the reward function reads (`answer` for the built-in rewards);
- chord: `prompt`, `response` (the expert demonstration) and the reward's columns;
- distill: `prompt` on-policy (objective.distill_policy=on), `prompt` + `response` off-policy;
- kto: `prompt`, `response` and `label` (true: a desirable response, false: an undesirable one).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from ..engine.core import IGNORE_INDEX
from .config import DataConfig, UserError
from .text import prompt_ids, response_ids

logger = logging.getLogger("fused_hybrid.trainer")


def addition_task(size: int, digits: int, seed: int) -> list[dict]:
    """`a+b=` -> `a+b`, with operands of up to `digits` digits; a verifiable task with exact answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        rows.append({"prompt": f"{a}+{b}=", "response": str(a + b), "answer": str(a + b)})
    return rows


ADDITION_CHARACTERS = "0123456789+="


class DataError(UserError):
    """The data cannot be used as given; the message names the file, the row or the column."""


def load_dataset(config: DataConfig, seed: int, text_columns: list[str]):
    """A `datasets.Dataset` from `config.path`, whose `text_columns` are present and hold strings."""
    import datasets

    if config.path == "synthetic:addition":
        return datasets.Dataset.from_list(addition_task(config.synthetic_size, config.synthetic_digits, seed))
    path = Path(config.path)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(
                f"data.path {config.path!r}: a folder, but not one written by datasets' save_to_disk"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        rows = None
    elif not path.is_file():
        raise DataError(f"data.path {config.path!r}: no such file or folder (or use 'synthetic:addition')")
    elif path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path, config.path)
    elif path.suffix == ".parquet":
        loaded, rows = datasets.load_dataset("parquet", data_files=str(path), split="train"), None
    else:
        raise DataError(f"data.path {config.path!r}: expected a .jsonl, .json or .parquet file, or a dataset folder")
    columns = rows[0].keys() if rows is not None else loaded.column_names
    check_columns(list(columns), text_columns, config.path)
    _check_text(rows if rows is not None else loaded.select_columns(text_columns), text_columns, config.path)
    return datasets.Dataset.from_list(rows) if rows is not None else loaded


def _json_rows(path: Path, name: str) -> list[dict]:
    """The rows of a JSON Lines file (or a JSON list of objects), each checked to be an object."""
    text = path.read_text()
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DataError(f"data.path {name!r}, line {number}: not valid JSON ({error.msg})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"data.path {name!r}: not valid JSON ({error.msg}, line {error.lineno})") from None
    if not rows:
        raise DataError(f"data.path {name!r}: no rows (the file is empty)")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"data.path {name!r}, row {number}: expected an object with named columns, got {row!r}")
    return rows


def _check_text(rows, columns: list[str], name: str) -> None:
    """Every value of the text columns is a string (a number or null where text belongs is named, not coerced)."""
    for number, row in enumerate(rows, start=1):
        for column in columns:
            value = row.get(column) if isinstance(row, dict) else row[column]
            if not isinstance(value, str):
                raise DataError(f"data.path {name!r}, row {number}: column {column!r} holds {value!r}; expected text")


def required_columns(data_kind: str, config: DataConfig, reward_columns: tuple[str, ...]) -> list[str]:
    """The dataset columns an objective's kind of data needs (see objectives.registry.DATA_KINDS)."""
    if data_kind == "preferences":
        return [config.prompt_column, config.chosen_column, config.rejected_column]
    if data_kind == "rollouts":
        return [config.prompt_column, *reward_columns]
    if data_kind == "completions":
        return [config.prompt_column]
    if data_kind == "rollouts+demonstrations":
        return [config.prompt_column, config.response_column, *reward_columns]
    return [config.prompt_column, config.response_column]


def check_labels(dataset, column: str, path: str) -> None:
    """The label column of unpaired data is present and holds true / false in every row."""
    check_columns(dataset.column_names, [column], path)
    for number, value in enumerate(dataset[column], start=1):
        if not isinstance(value, bool):
            raise DataError(
                f"data.path {path!r}, row {number}: column {column!r} holds {value!r}; expected true (a desirable "
                "response) or false (an undesirable one)"
            )


def check_columns(present: list[str], columns: list[str], path: str) -> None:
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(
            f"data.path {path!r} lacks the column(s) {missing} this mode needs; it has {present} "
            "(or name them in the data section: prompt_column, response_column, ...)"
        )


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + response, labels only on the response. The trainer keeps only prompts that
    leave room for a response; a response that does not fit is truncated."""
    prompt_part = prompt_ids(tokenizer, prompt)
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


def concat_rows(first: dict, second: dict, pad_token_id: int) -> dict:
    """Stack two row sets (left- or right-padded) into one, right-padding the shorter to a common length."""
    length = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key in first:
        a, b = first[key], second[key]
        if key in fill:
            a = torch.nn.functional.pad(a, (0, length - a.shape[1]), value=fill[key])
            b = torch.nn.functional.pad(b, (0, length - b.shape[1]), value=fill[key])
        out[key] = torch.cat([a, b])
    return out
