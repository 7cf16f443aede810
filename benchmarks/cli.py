"""`fused-hybrid bench` / `python -m benchmarks`: the side-by-side speed and memory suite.

With no arguments it runs a quick sweep sized for the device it finds: the tiny head on a CPU, the Llama-3-8B head
(D 4096, V 128256) in bf16 on a GPU. Each run writes results.json, results.md and one PNG per objective and shape
under <out>/<device>-<date>/.
"""

from __future__ import annotations

import gc
import sys

import torch

from fused_hybrid.progress import Countdown

from . import report
from .arguments import MAX_SWEEP_TOKENS, build_parser, parse_names
from .measure import fp32_reference, kept_tile_fraction, matmul_floor_ms, max_errors, peak_workspace_bytes, time_loss
from .problems import DTYPES, INPUT_DISTRIBUTIONS, OBJECTIVES, PRESETS, make_problem
from .providers import PROVIDERS

REFERENCE_MAX_LOGITS = 1 << 31  # above this many logits the fp32 reference is the chunked backend, not naive


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(provider, losses, problems, reference, floors, args, device) -> dict:
    row = {"provider": provider.name, "status": "ok"}
    reason = provider.unavailable_reason(device)
    objective = problems[0].objective
    if reason is None and objective not in losses:
        reason = f"does not support {objective}"
    if reason is None and isinstance(losses[objective], str):
        reason = losses[objective]
    if reason is not None:
        row["status"] = reason
        return row
    loss_fn = losses[objective]
    try:
        timing = time_loss(loss_fn, problems, repeats=args.repeats, warmup=args.warmup, device=device)
        row.update(forward_ms=timing.forward_ms, backward_ms=timing.backward_ms, fwd_bwd_ms=timing.fwd_bwd_ms)
        row["peak_bytes"] = peak_workspace_bytes(loss_fn, problems[0], device)
        if reference is not None:
            row["errors"] = max_errors(loss_fn, problems[0], reference)
        if provider.filters_gradients:
            row["tiles_kept"] = kept_tile_fraction(loss_fn, problems[0])
        row["tflops"] = problems[0].matmul_flops / (timing.fwd_bwd_ms * 1e9)  # the floor's FLOPs per second achieved
        if floors is not None:
            row["x_floor"] = timing.fwd_bwd_ms / floors[1]
            row["forward_x_matmul"] = timing.forward_ms / floors[0]
    except torch.OutOfMemoryError:
        row = {"provider": provider.name, "status": "OOM"}
    except Exception as error:  # recorded, never silently dropped
        row = {"provider": provider.name, "status": f"error: {type(error).__name__}: {str(error)[:200]}"}
    for problem in problems:
        problem.zero_grad()
    free_memory(device)
    return row


def sweep(args, device, providers, objectives, presets, token_counts, distributions, on_rows=None) -> list[dict]:
    """The measured rows; `on_rows(rows)` is called with the rows so far after every measured group (the results
    are written as they come, so a run stopped at a time limit keeps what it measured)."""
    dtype = DTYPES[args.dtype]
    built = {}
    for provider in providers:
        if provider.unavailable_reason(device) is None:
            built[provider.name] = provider.build(device)
    rows = []
    # a measurement's time grows with its N: the time left is estimated per token measured
    countdown = Countdown(
        "benchmark", len(presets) * len(distributions) * len(objectives) * sum(token_counts), unit="token"
    )
    for preset, inputs in ((p, d) for p in presets for d in distributions):
        dim, vocab = PRESETS[preset]
        for objective in objectives:
            out_of_memory: set[str] = set()
            counts = list(token_counts)
            index = 0
            while index < len(counts):
                tokens = counts[index]
                index += 1
                try:
                    common = dict(
                        dtype=dtype,
                        device=device,
                        seq_len=args.seq_len,
                        distribution=inputs,
                        distill_beta=args.distill_beta,
                    )
                    first = make_problem(objective, tokens, dim, vocab, seed=1, **common)
                    # a second input set on the same head weights, to rotate between steps
                    heads = dict(weight=first.weight, teacher_weight=first.extras.get("teacher_weight"))
                    second = make_problem(objective, tokens, dim, vocab, seed=2, **heads, **common)
                    problems = [first, second]
                except torch.OutOfMemoryError:
                    rows += [
                        dict(
                            preset=preset,
                            objective=objective,
                            tokens=tokens,
                            provider=p.name,
                            status="OOM (inputs)",
                            dim=dim,
                            vocab=vocab,
                            dtype=args.dtype,
                            inputs=inputs,
                        )
                        for p in providers
                    ]
                    countdown.grow(-sum(counts[index - 1 :]))  # the larger N are not tried
                    break
                floors = None
                try:
                    floors = matmul_floor_ms(first, repeats=args.repeats, warmup=args.warmup, device=device)
                except torch.OutOfMemoryError:
                    free_memory(device)
                reference = None
                reference_fn = fused_reference(objective, first.num_logits)
                try:
                    reference = fp32_reference(reference_fn, first)
                except torch.OutOfMemoryError:
                    free_memory(device)
                group = []
                for provider in providers:
                    if provider.name in out_of_memory:
                        row = {"provider": provider.name, "status": "OOM (at a smaller N)"}
                    else:
                        row = measure_row(
                            provider, built.get(provider.name, {}), problems, reference, floors, args, device
                        )
                        if row["status"] == "OOM":
                            out_of_memory.add(provider.name)
                    row.update(
                        preset=preset,
                        objective=objective,
                        tokens=first.num_tokens,
                        dim=dim,
                        vocab=vocab,
                        dtype=args.dtype,
                        inputs=inputs,
                        floor_matmul_ms=None if floors is None else floors[0],
                        floor_three_matmuls_ms=None if floors is None else floors[1],
                    )
                    if first.teacher_dim is not None:
                        row.update(teacher_dim=first.teacher_dim, options=first.options)
                    group.append(row)
                    print(_progress(row), flush=True)
                fused = next((r for r in group if r["provider"] == "fused-hybrid" and "fwd_bwd_ms" in r), None)
                for row in group:
                    if fused is not None and "fwd_bwd_ms" in row:
                        row["x_fused_hybrid"] = row["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
                rows += group
                countdown.step(tokens)
                if on_rows is not None:
                    on_rows(rows)
                del problems, first, second, reference
                free_memory(device)
                runnable = {p.name for p in providers if p.name in built}
                if args.until_oom and index == len(counts) and runnable - out_of_memory and tokens < MAX_SWEEP_TOKENS:
                    counts.append(tokens * 2)
                    countdown.grow(tokens * 2)
    return rows


def fused_reference(objective: str, num_logits: int):
    """The fp32 reference: naive full logits where they fit, else the chunked backend (tested against float64)."""
    from .providers import fused_hybrid_losses

    backend = "reference" if num_logits <= REFERENCE_MAX_LOGITS else "torch"  # "torch": two passes, PyTorch only
    return fused_hybrid_losses(backend)[objective]


def _progress(row: dict) -> str:
    figures = ""
    if "fwd_bwd_ms" in row:
        figures = f" {row['fwd_bwd_ms']:9.2f} ms"
        if row.get("peak_bytes") is not None:
            figures += f" {row['peak_bytes'] / 2**20:9.0f} MiB"
    where = f"{row['preset']:>12} {row['objective']:>16} N={row['tokens']:<7}"
    return f"{where} {row['provider']:>20}{figures}  {row['status']}"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu-suite" in argv:  # the whole GPU session in one command (benchmarks/gpu_suite.py)
        from .gpu_suite import main as gpu_suite

        argv.remove("--gpu-suite")
        gpu_suite(argv)
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    objectives = parse_names(args.objectives, OBJECTIVES, "objective", parser)
    presets = parse_names(args.presets, list(PRESETS), "preset", parser)
    providers = [PROVIDERS[n] for n in parse_names(args.providers, list(PROVIDERS), "provider", parser)]
    try:
        token_counts = [int(n) for n in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens must be a comma list of integers, got {args.tokens!r}")
    if any(n < 1 for n in token_counts):
        parser.error("--tokens must be positive")
    device = torch.device(args.device)

    env = report.environment(device)
    print(f"fused-hybrid bench on {env['device']}", flush=True)
    distributions = parse_names(args.inputs, INPUT_DISTRIBUTIONS, "input distribution", parser)
    folder = report.run_folder(args.out, device)
    rows = (
        []
        if args.long_context_only
        else sweep(
            args,
            device,
            providers,
            objectives,
            presets,
            token_counts,
            distributions,
            on_rows=lambda so_far: report.write(folder, env, so_far, plot=False),
        )
    )
    long_context = None
    if args.long_context or args.long_context_only:
        from .long_context import run_long_context

        long_context = run_long_context(device)
    report.write(folder, env, rows, long_context)
    print(f"results written to {folder}")


if __name__ == "__main__":
    main()
