"""Launch-config choice for the tile kernels on CUDA: each pass ships a short list of configs, every one of them
spill-free on sm_80 and sm_90a with the Triton versions the package supports (the compile gate,
`python -m benchmarks.compile_report --check`, enforces it); the first is the default and the others are timed
once per problem key on the device the first time that key is seen.

The timing runs the pass's own launcher on the real inputs (it allocates its own outputs, so a timed run leaves
nothing behind) and synchronises: it happens once per key, never inside a CUDA-graph capture (the default config
is used there) and not at all with `FUSED_HYBRID_AUTOTUNE=0`. `tuned_configs()` lists the choices made so far, so
a benchmark run can publish them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .logit_tile import LaunchConfig

Result = TypeVar("Result")
_CHOSEN: dict[tuple, LaunchConfig] = {}
TIMED_RUNS = 3


def autotune_enabled() -> bool:
    return os.environ.get("FUSED_HYBRID_AUTOTUNE", "1") != "0"


def tokens_bucket(num_tokens: int) -> int:
    """Token counts up to the next power of two share one choice (a varlen batch does not re-tune each step)."""
    return 1 << max(0, num_tokens - 1).bit_length()


def _elapsed_ms(launch: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(TIMED_RUNS):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / TIMED_RUNS


def run_tuned(
    pass_name: str, key: tuple, candidates: Sequence[LaunchConfig], launch: Callable[[LaunchConfig], Result]
) -> Result:
    """`launch(config)` with the fastest candidate for `key` (timed on the first call on this CUDA device), or with
    the first candidate when there is nothing to choose (the interpreter has one), tuning is off, or a CUDA graph is
    being captured."""
    if len(candidates) == 1:
        return launch(candidates[0])
    full_key = (pass_name, torch.cuda.get_device_capability(), *key)
    config = _CHOSEN.get(full_key)
    if config is None:
        if not autotune_enabled() or torch.cuda.is_current_stream_capturing():
            return launch(candidates[0])
        for candidate in candidates:  # compile each before timing any
            launch(candidate)
        timings = {candidate: _elapsed_ms(lambda c=candidate: launch(c)) for candidate in candidates}
        config = _CHOSEN[full_key] = min(timings, key=timings.get)
    return launch(config)


def tuned_configs() -> list[dict]:
    """The choices made in this process: pass, device capability, problem key and the chosen config."""
    return [
        dict(pass_name=key[0], capability=list(key[1]), key=list(key[2:]), config=config._asdict())
        for key, config in _CHOSEN.items()
    ]
