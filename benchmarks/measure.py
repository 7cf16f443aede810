"""How it is measured: median times with device events after warm-up over rotated inputs, peak memory beyond
the inputs and required gradients, the cuBLAS matmul floor, and errors against an fp32 reference."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .problems import Problem

FLOOR_CHUNK_TOKENS = 8192  # the floor's logits are computed in row chunks so that it fits wherever the losses do


class Timer:
    """Marks on the device's timeline (CUDA events) or the host clock (CPU); read after a synchronise."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Timing:
    forward_ms: float
    backward_ms: float
    fwd_bwd_ms: float


def time_loss(loss_fn, problems: list[Problem], *, repeats: int, warmup: int, device: torch.device) -> Timing:
    """Median forward, backward and fwd+bwd over `repeats` steps, cycling through `problems`; on a CPU with glibc's
    thresholds at their dynamic ceilings (_allocator_as_in_training), the first provider as every other."""
    if device.type == "cpu" and _cpu_peak_memory_readable():
        _allocator_as_in_training()
    timer = Timer(device)
    for step in range(warmup):
        problem = problems[step % len(problems)]
        loss_fn(problem).backward()
        problem.zero_grad()
    timer.synchronize()
    marks = []
    for step in range(repeats):
        problem = problems[step % len(problems)]
        start = timer.mark()
        loss = loss_fn(problem)
        middle = timer.mark()
        loss.backward()
        end = timer.mark()
        timer.synchronize()
        marks.append((start, middle, end))
        problem.zero_grad()
        del loss
    forward = [timer.elapsed_ms(a, b) for a, b, _ in marks]
    backward = [timer.elapsed_ms(b, c) for _, b, c in marks]
    total = [timer.elapsed_ms(a, c) for a, _, c in marks]
    return Timing(statistics.median(forward), statistics.median(backward), statistics.median(total))


def peak_workspace_bytes(loss_fn, problem: Problem, device: torch.device) -> int | None:
    """Peak bytes a fwd+bwd allocates beyond its inputs and the gradients it must return: the CUDA allocator's
    peak on a GPU; on a Linux CPU the process's peak resident memory (reset through /proc/self/clear_refs, with
    glibc returning every large block to the system at once while it is measured), None where neither can be read."""
    problem.zero_grad()
    gradient_bytes = sum(t.numel() * t.element_size() for t in (problem.hidden, problem.weight))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_fn(problem).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        if not _cpu_peak_memory_readable():
            return None
        with _large_blocks_returned_at_once():
            baseline = _resident_bytes("VmRSS")
            _reset_peak_resident()
            loss_fn(problem).backward()
            peak = _resident_bytes("VmHWM")
    problem.zero_grad()
    return max(0, peak - baseline - gradient_bytes)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# glibc's own dynamic thresholds grow with the blocks a process frees, up to these (64-bit): the timings run under
# them, as a training process would, not under the measurement's (every block of 1 MiB or more mapped afresh, its
# pages faulted in again on every call: that slowed every provider's CPU timing, more the more it allocates)
_DYNAMIC_MMAP_CEILING, _DYNAMIC_TRIM_CEILING = 32 << 20, 64 << 20


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def _mallopt(parameter: int, value: int) -> bool:
    return bool(_libc().mallopt(parameter, value))


@contextlib.contextmanager
def _large_blocks_returned_at_once():
    """While measuring, a freed block of 1 MiB or more leaves the process at once (the defaults keep freed blocks,
    hiding frees from the resident size), and the heap starts with no free block that an allocation could reuse
    unseen; afterwards the thresholds go back to the dynamic regime's ceilings."""
    _mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    _mallopt(_M_TRIM_THRESHOLD, 1 << 20)
    _libc().malloc_trim(0)  # the free blocks the timed steps left in the heap go back first
    try:
        yield
    finally:
        _allocator_as_in_training()


def _allocator_as_in_training() -> None:
    """glibc's thresholds where a long-running training process's dynamic ones end up."""
    _mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_CEILING)
    _mallopt(_M_TRIM_THRESHOLD, _DYNAMIC_TRIM_CEILING)


@functools.cache
def _cpu_peak_memory_readable() -> bool:
    """Whether the peak resident memory can be reset and read here (Linux, glibc)."""
    try:
        _reset_peak_resident()
        _resident_bytes("VmHWM")
        return hasattr(_libc(), "mallopt")
    except (OSError, ValueError):
        return False


def _resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"{field} not in /proc/self/status")


def _reset_peak_resident() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def matmul_floor_ms(problem: Problem, *, repeats: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(the forward's logits GEMMs, those and the two gradient GEMMs) in ms, cuBLAS in the inputs' dtype: one
    N x D x V matmul and three, plus the teacher's N x D_t x V logits in both for distillation."""
    hidden = problem.hidden.detach().reshape(-1, problem.hidden.shape[-1])
    weight = problem.weight.detach()
    teacher = problem.extras.get("teacher_hidden")
    if teacher is not None:
        teacher = teacher.reshape(-1, teacher.shape[-1])
    rows = min(FLOOR_CHUNK_TOKENS, hidden.shape[0])
    logits = torch.empty(rows, weight.shape[0], dtype=hidden.dtype, device=device)
    d_hidden = torch.empty(rows, hidden.shape[1], dtype=hidden.dtype, device=device)
    d_weight = torch.empty_like(weight)
    timer = Timer(device)

    def run(three: bool):
        for start in range(0, hidden.shape[0], rows):
            chunk = hidden[start : start + rows]
            out = logits[: chunk.shape[0]]
            if teacher is not None:
                torch.mm(teacher[start : start + rows], problem.extras["teacher_weight"].T, out=out)
            torch.mm(chunk, weight.T, out=out)
            if three:
                torch.mm(out, weight, out=d_hidden[: chunk.shape[0]])
                torch.mm(out.T, chunk, out=d_weight)

    results = []
    for three in (False, True):
        for _ in range(warmup):
            run(three)
        timer.synchronize()
        times = []
        for _ in range(repeats):
            start = timer.mark()
            run(three)
            end = timer.mark()
            timer.synchronize()
            times.append(timer.elapsed_ms(start, end))
        results.append(statistics.median(times))
    return results[0], results[1]


def max_errors(loss_fn, problem: Problem, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative max-abs errors of loss, dhidden and dweight against `reference` (same keys)."""
    problem.zero_grad()
    loss = loss_fn(problem)
    loss.backward()
    got = {"loss": loss.detach(), "d_hidden": problem.hidden.grad, "d_weight": problem.weight.grad}
    errors = {}
    for key, want in reference.items():
        scale = want.abs().max().clamp(min=1e-12)
        errors[key] = ((got[key].float() - want.float()).abs().max() / scale).item()
    problem.zero_grad()
    return errors


def kept_tile_fraction(loss_fn, problem: Problem) -> float:
    """The fraction of the tile kernels' backward tiles that gradient filtering kept, over one fwd+bwd."""
    from fused_hybrid.kernels.token_statistics_backward import count_filtered_tiles

    problem.zero_grad()
    with count_filtered_tiles() as tiles:
        loss_fn(problem).backward()
    problem.zero_grad()
    return tiles.kept_fraction


def fp32_reference(loss_fn, problem: Problem) -> dict[str, torch.Tensor]:
    """Loss and gradients of `loss_fn` on an fp32 copy of `problem`."""
    upcast = problem.upcast(torch.float32)
    loss = loss_fn(upcast)
    loss.backward()
    return {"loss": loss.detach(), "d_hidden": upcast.hidden.grad, "d_weight": upcast.weight.grad}
