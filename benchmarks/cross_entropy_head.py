"""Side-by-side fused linear cross-entropy at one LM-head shape: median fwd+bwd time and peak memory.

    python -m benchmarks.cross_entropy_head                      # Llama-3-8B head, N 16384, bf16 (on a GPU)
    python -m benchmarks.cross_entropy_head --tokens 512 --dim 256 --vocab 32000 --dtype float32   # on a CPU

Providers: fused-hybrid (its default backend for the device, and the chunked torch backend), naive PyTorch (full
logits, fp32 softmax as Hugging Face models do), Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy.
A provider that is not installed or cannot run on the device is reported as such. Peak memory is measured beyond
the inputs (CUDA only). Every provider's loss and gradients are compared with an fp32 full-logits reference.
Writes JSON and a Markdown table to benchmarks/results/<device>-<date>/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_hybrid

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def naive_loss(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def provider_functions(device: torch.device):
    """name -> (loss function or None, why it is unavailable)."""
    providers = {
        "fused-hybrid": (lambda h, w, y: fused_hybrid.linear_cross_entropy(h, w, y), ""),
        "fused-hybrid[torch]": (lambda h, w, y: fused_hybrid.linear_cross_entropy(h, w, y, backend="torch"), ""),
        "naive": (naive_loss, ""),
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        providers["liger"] = (lambda h, w, y: liger(w, h, y), "") if device.type == "cuda" else (None, "needs CUDA")
    except ImportError:
        providers["liger"] = (None, "not installed (pip install liger-kernel)")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_loss

        providers["cce"] = (
            (lambda h, w, y: cce_loss(h, w, y, impl="cce"), "") if device.type == "cuda" else (None, "needs CUDA")
        )
    except ImportError:
        providers["cce"] = (None, "not installed (pip install cut-cross-entropy)")
    return providers


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, hidden, weight, targets, repeats, warmup, device):
    """Median fwd+bwd seconds and peak bytes allocated beyond the inputs (CUDA only)."""
    for _ in range(warmup):
        fn(hidden, weight, targets).backward()
    hidden.grad = weight.grad = None
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(hidden, weight, targets).backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn(hidden, weight, targets).backward()
            times.append(time.perf_counter() - begin)
        hidden.grad = weight.grad = None
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        fn(hidden, weight, targets).backward()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated() - baseline
        hidden.grad = weight.grad = None
    return statistics.median(times), peak


def max_errors(fn, hidden, weight, targets, reference):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    loss.backward()
    ref_loss, ref_dh, ref_dw = reference
    return {
        "loss": abs(loss.item() - ref_loss.item()),
        "d_hidden": (h.grad.float() - ref_dh).abs().max().item(),
        "d_weight": (w.grad.float() - ref_dw).abs().max().item(),
    }


def fp32_reference(hidden, weight, targets):
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.tokens, args.dim, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, device=device) / args.dim**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    reference = fp32_reference(hidden, weight, targets) if args.tokens * args.vocab <= 2**31 else None

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    rows = []
    for name, (fn, why) in provider_functions(device).items():
        row = {"provider": name, "status": why or "ok"}
        if fn is not None:
            try:
                seconds, peak = measure(fn, hidden, weight, targets, args.repeats, args.warmup, device)
                row.update(fwd_bwd_ms=seconds * 1e3, peak_bytes=peak)
                if reference is not None:
                    row["max_error_vs_fp32"] = max_errors(fn, hidden, weight, targets, reference)
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
                torch.cuda.empty_cache()
        rows.append(row)
        print(row, flush=True)

    stamp = datetime.date.today().isoformat()
    folder = args.out / f"{device_name.replace(' ', '-')}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=device_name,
        torch=torch.__version__,
        shape=dict(N=args.tokens, D=args.dim, V=args.vocab),
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    (folder / "cross_entropy_head.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = [
        f"Fused linear cross-entropy, N={args.tokens} D={args.dim} V={args.vocab} {args.dtype} on {device_name}",
        "",
        "| provider | fwd+bwd ms | peak MiB beyond inputs | max d_weight error vs fp32 | status |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ms = f"{row['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in row else "-"
        peak = f"{row['peak_bytes'] / 2**20:.0f}" if row.get("peak_bytes") is not None else "-"
        err = f"{row['max_error_vs_fp32']['d_weight']:.2e}" if "max_error_vs_fp32" in row else "-"
        lines.append(f"| {row['provider']} | {ms} | {peak} | {err} | {row['status']} |")
    (folder / "cross_entropy_head.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {folder}")


if __name__ == "__main__":
    main()
