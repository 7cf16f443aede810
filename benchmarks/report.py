"""Where results go: one folder per run with JSON (every figure and the environment), Markdown and PNG plots."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from fused_hybrid import provenance


def device_name(device: torch.device) -> str:
    return provenance.machine(device)


def environment(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "versions": provenance.versions(),
        "command": _command(),
        "commit": provenance.source(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    return info


def installed_versions(env: dict) -> str:
    """ "torch 2.13.0, triton 3.9.0, ...": the versions of the packages the run found (provenance.PACKAGES)."""
    return ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version is not None)


def _command() -> str:
    """The run's command as typed in a checkout, without where its results went (--out)."""
    arguments, skip_next = [], False
    for argument in sys.argv[1:]:
        if skip_next or argument.startswith("--out="):
            skip_next = False
            continue
        if argument == "--out":
            skip_next = True
            continue
        arguments.append(argument)
    return " ".join(["fused-hybrid bench", *arguments])


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return None


def run_folder(out: Path, device: torch.device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-")
    folder = out / f"{slug}-{datetime.date.today().isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(env: dict, rows: list[dict], long_context: list[dict] | None = None) -> str:
    lines = [
        f"# fused-hybrid benchmark on {env['device']}",
        "",
        f"{env['date']}; {installed_versions(env)}; commit {env['commit']}",
        "",
        "Times are medians over steps (CUDA events on a GPU, the host clock on a CPU) after warm-up, rotating two "
        "input sets. `x floor`: fwd+bwd over the three "
        "N x D x V cuBLAS matmuls of loss + gradients measured in the same run; `fwd x mm`: forward over one "
        "such matmul; `x fused`: over fused-hybrid's time; TFLOP/s: the three matmuls' 6 N D V FLOPs over the "
        "fwd+bwd time; for distill the floor and the FLOPs include the teacher's N x D_t x V logits GEMM "
        "(2 N D_t V). Memory: peak bytes beyond inputs and gradients (CUDA allocator on a GPU, peak resident "
        "memory on a CPU). "
        "Errors: max |error| / max |fp32 reference| of loss, dhidden, dweight. Tiles kept: the fraction of "
        "the tile backward's tiles whose GEMM work gradient filtering kept.",
        "",
    ]
    for (preset, objective, inputs), group in _groups(rows).items():
        first = group[0]
        teacher = ""
        if first.get("teacher_dim") is not None:
            options = first["options"]
            teacher = (
                f", teacher D_t {first['teacher_dim']}, beta {options['beta']:g}, "
                f"temperature {options['temperature']:g}"
            )
        lines += [
            f"## {objective}, {preset} (D {first['dim']}, V {first['vocab']}, {first['dtype']}), {inputs} inputs"
            + teacher,
            "",
            "| N | provider | fwd ms | bwd ms | fwd+bwd ms | x floor | TFLOP/s | fwd x mm | x fused "
            "| peak MiB | err loss / dh / dw | tiles kept | status |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for row in group:
            err = row.get("errors")
            err_text = "-" if not err else " / ".join(f"{err[k]:.1e}" for k in ("loss", "d_hidden", "d_weight"))
            peak = None if row.get("peak_bytes") is None else row["peak_bytes"] / 2**20
            lines.append(
                f"| {row['tokens']} | {row['provider']} | {_fmt(row.get('forward_ms'), '.2f')} "
                f"| {_fmt(row.get('backward_ms'), '.2f')} | {_fmt(row.get('fwd_bwd_ms'), '.2f')} "
                f"| {_fmt(row.get('x_floor'), '.2f')} | {_fmt(row.get('tflops'), '.2f')} "
                f"| {_fmt(row.get('forward_x_matmul'), '.2f')} "
                f"| {_fmt(row.get('x_fused_hybrid'), '.2f')} | {_fmt(peak, '.0f')} | {err_text} "
                f"| {_fmt(row.get('tiles_kept'), '.2f')} | {row['status']} |"
            )
        lines.append("")
    if long_context:
        lines += [
            "## Long context: the longest training step that fits, and step time at equal length",
            "",
            "| model | loss | longest sequence | step s at equal length | peak GiB at equal length | status |",
            "|---|---|---:|---:|---:|---|",
        ]
        for row in long_context:
            lines.append(
                f"| {row['model']} | {row['loss']} | {row.get('max_length', '-')} | {_fmt(row.get('step_s'), '.3f')} "
                f"| {_fmt(row.get('peak_gib'), '.1f')} | {row['status']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (preset, objective, input distribution), in run order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["objective"], row.get("inputs", "random")), []).append(row)
    return groups


def plots(folder: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (preset, objective, inputs), group in _groups(rows).items():
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
        for provider in dict.fromkeys(r["provider"] for r in group):
            points = [r for r in group if r["provider"] == provider and r.get("fwd_bwd_ms") is not None]
            if not points:
                continue
            ax_time.plot([r["tokens"] for r in points], [r["fwd_bwd_ms"] for r in points], marker="o", label=provider)
            mem = [r for r in points if r.get("peak_bytes") is not None]
            if mem:
                ax_mem.plot(
                    [r["tokens"] for r in mem], [r["peak_bytes"] / 2**20 for r in mem], marker="o", label=provider
                )
        for ax, label in ((ax_time, "fwd+bwd ms"), (ax_mem, "peak MiB beyond inputs + grads")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=8)
        fig.suptitle(f"{objective}, {preset}, {inputs} inputs")
        fig.tight_layout()
        path = folder / f"{preset}-{objective}-{inputs}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(
    folder: Path, env: dict, rows: list[dict], long_context: list[dict] | None = None, *, plot: bool = True
) -> None:
    """results.json, results.md, the tuned launch configs and (with `plot`) one PNG per objective, shape and input
    distribution, in `folder`."""
    (folder / "results.json").write_text(
        json.dumps({"environment": env, "rows": rows, "long_context": long_context}, indent=2)
    )
    (folder / "results.md").write_text(markdown(env, rows, long_context))
    if torch.cuda.is_available():  # the launch configs the tile kernels' autotuning chose in this run
        from fused_hybrid.kernels.autotune import tuned_configs

        if tuned_configs():
            (folder / "tuned_configs.json").write_text(json.dumps(tuned_configs(), indent=2, default=str))
    if rows and plot:
        if importlib.util.find_spec("matplotlib") is None:  # e.g. the verl environment
            print("no plots: matplotlib is not installed (pip install matplotlib)", flush=True)
        else:
            plots(folder, rows)
