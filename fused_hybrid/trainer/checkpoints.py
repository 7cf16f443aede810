"""Checkpoints of the trainer: found by their marker, gathered under FSDP2, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_MARKER = "fused_hybrid_checkpoint.json"


def checkpoints(output_dir: Path) -> list[Path]:
    """Our checkpoints, oldest first; a checkpoint-* folder without our marker is an error, not a guess."""
    found = []
    if not output_dir.is_dir():
        return found
    for folder in sorted(output_dir.glob("checkpoint-*")):
        if not (folder / CHECKPOINT_MARKER).is_file():
            raise ValueError(f"{folder} is not a fused-hybrid checkpoint (no {CHECKPOINT_MARKER}); "
                             "move it away or choose another output_dir")  # fmt: skip
        found.append(folder)
    return sorted(found, key=lambda f: json.loads((f / CHECKPOINT_MARKER).read_text())["step"])


def full_states(policy: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict | None, dict]:
    """(model state dict, or None for the model's own, and the optimizer state dict); gathered in full on every
    rank's CPU when the policy is sharded by FSDP2 (a collective: every rank takes part)."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(policy, options=options)
    model_state = {k.removeprefix("model."): v for k, v in model_state.items()}
    return model_state, get_optimizer_state_dict(policy, optimizer, options=options)


def write_checkpoint(final: Path, *, model: nn.Module, tokenizer, model_state: dict | None, trainer_state: dict,
                     marker: dict, keep: int) -> None:  # fmt: skip
    """Write the checkpoint into a staging folder, rename it into place, and keep only the newest `keep`."""
    staging = final.parent / f".staging-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging, state_dict=model_state)
    tokenizer.save_pretrained(staging)
    torch.save(trainer_state, staging / "trainer_state.pt")
    (staging / CHECKPOINT_MARKER).write_text(json.dumps(marker))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old)
