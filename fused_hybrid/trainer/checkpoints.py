"""Checkpoints of the trainer: found by their marker, gathered under FSDP2, written atomically; a resume checks
that the saved run is the one the config describes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from torch import nn

from ..objectives import OBJECTIVES
from .config import TrainConfig, UserError

logger = logging.getLogger("fused_hybrid.trainer")

CHECKPOINT_MARKER = "fused_hybrid_checkpoint.json"


class ResumeError(UserError):
    """The output folder holds a run that the config does not describe."""


def run_settings(config: TrainConfig) -> dict:
    """What makes a run the same run: its mode, its objective's settings, its data and its teacher if it has one
    (not its length: raising optim.max_steps continues a finished run)."""
    settings = {"mode": config.mode, "objective": dataclasses.asdict(config.objective), "data.path": config.data.path}
    if OBJECTIVES[config.mode].needs_teacher(config):
        settings["teacher"] = dataclasses.asdict(config.teacher)
    return settings


def _flat(settings: dict) -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def marker_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / CHECKPOINT_MARKER).read_text())


def check_same_run(checkpoint: Path, config: TrainConfig) -> None:
    """Refuse to resume `checkpoint` under settings other than those it was trained with."""
    marker = marker_of(checkpoint)
    saved = _flat(marker.get("settings", {"mode": marker.get("mode")}))
    now = _flat(run_settings(config))
    differ = [f"{key}={saved[key]!r} there, {now.get(key)!r} now" for key in saved if saved[key] != now.get(key)]
    if differ:
        raise ResumeError(
            f"output_dir {config.output_dir!r} holds a run (step {marker['step']}) trained with other "
            f"settings: {'; '.join(differ)}. Resuming it would go on under the new ones: start fresh "
            "with --set resume=false (replaces that run) or choose another output_dir"
        )


def checkpoints(output_dir: Path) -> list[Path]:
    """Our checkpoints, oldest first; a checkpoint-* folder without our marker is an error, not a guess."""
    found = []
    if not output_dir.is_dir():
        return found
    for folder in sorted(output_dir.glob("checkpoint-*")):
        if not (folder / CHECKPOINT_MARKER).is_file():
            raise ResumeError(
                f"{folder} is not a fused-hybrid checkpoint (no {CHECKPOINT_MARKER}); "
                "move it away or choose another output_dir"
            )
        found.append(folder)
    return sorted(found, key=lambda f: marker_of(f)["step"])


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


def write_checkpoint(
    final: Path, *, model: nn.Module, tokenizer, model_state: dict | None, trainer_state: dict, marker: dict, keep: int
) -> None:
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


@contextlib.contextmanager
def interrupt_at_step_end():
    """Within the block, a first Ctrl-C (SIGINT) is only noted: the yielded function says whether it came, so the
    loop stops at a step boundary; the handler is then the previous one again, and a second Ctrl-C acts at once.
    Outside the main thread (where signals cannot be handled) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)
    came = []

    def note(signum, frame):
        came.append(signum)
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous)


def clear_previous_run(output_dir: Path) -> None:
    """A fresh start in a folder that holds a run (resume=false): that run's checkpoints, metrics, curves and
    TensorBoard events go, so nothing of it is appended to or mixed in."""
    old = checkpoints(output_dir)
    leftovers = [output_dir / name for name in ("metrics.jsonl", "curves.png", "tensorboard")]
    if old or any(p.exists() for p in leftovers):
        logger.info(
            "starting fresh in %s: removing the previous run (%d checkpoints, its metrics)", output_dir, len(old)
        )
    for path in [*old, *leftovers]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
