"""A GPU session in two calls: `fused-hybrid bench --gpu-suite --call 1` then `--call 2` (or `python -m
fused_hybrid.benchmarks.gpu_suite`), each one command within one device call's limit, ordered by what is worth most.

Each call runs stage by stage (each a subprocess with its own time limit, so one that hangs or fails never costs
the others) within its minutes (8 and 4 by default):

- both calls first: `install` (this checkout, editable, without dependencies or network: the machine has torch
  and Triton; left out when the package runs installed, with no checkout) and `peers` (the carried wheels of the
  pure-Python peers, PEER_PACKAGES, installed offline from `--wheels` into a folder the later stages put on their
  path; `--download-wheels DIR`, run where pip reaches the package index, fetches them for the GPU machine's Python);
- call 1: `gpu-tests` (a checkout's only: compiled kernels against float64, sync-free and CUDA-graph capture,
  autocast, autotuning,
  gradient filtering, deterministic mode, and the compile gate on the machine's Triton), then `cross-entropy`: the
  Llama-3-8B head (D 4096, V 128256), bf16, N 4096 and 16384, random and trained-like inputs, every provider, the
  three-GEMM floor measured in the same run: the figures the targets are stated for;
- call 2: `rl-objectives` (log-probs + entropy, GRPO, CHORD and distillation at the same head, N 16384:
  fused-hybrid, Liger, TRL, naive), `tile-filter` (the tile kernels with and without gradient filtering on
  trained-like inputs) and `long-context` (the longest training step that fits).

After every stage the call writes `summary.md` (each stage's status and time) and a `.tar.gz` of its folder (the
logs, each benchmark's results, which the benchmark rewrites after every measurement, and the launch configs the
autotuning chose) into `--archive` (on the device: $OUT), so a call cut off still brings back what it measured.
`--dry-run` checks every stage's command against the benchmark's own argument checks and prints the plan, running
nothing: the tests do that on the CPU, so that GPU time is never spent on a typo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

CALL_MINUTES = {1: 8.0, 2: 4.0}  # each within one device command's 10 minutes, the machine's start apart
# the peers the benchmark compares against and what they import that the GPU image lacks
PEER_PACKAGES = ("liger-kernel", "cut-cross-entropy", "trl", "datasets", "dill", "multiprocess")
GPU_PYTHON = "3.12"
ROOT = Path(__file__).resolve().parents[1]
# a checkout of the project (its tests and sources), or None when the package runs installed from a wheel: then the
# package is already installed and the GPU tests, which live in the checkout, are left out
CHECKOUT = ROOT if (ROOT / "pyproject.toml").is_file() and (ROOT / "tests" / "test_gpu.py").is_file() else None
MIN_STAGE_SECONDS = 30.0


@dataclass
class Stage:
    name: str
    command: list[str]
    share: float  # of the suite's time, at most
    bench_arguments: list[str] | None = None  # for the dry run's checks


def _bench(name: str, share: float, folder: Path, *arguments: str) -> Stage:
    bench_arguments = [*arguments, "--out", str(folder / name)]
    return Stage(name, [sys.executable, "-m", "fused_hybrid.benchmarks", *bench_arguments], share, bench_arguments)


def plan(folder: Path, wheels: Path | None, site: Path, call: int) -> list[Stage]:
    """The stages of `call` (1 or 2), in the order of what a GPU session most needs measured; from an installed
    package (no CHECKOUT) without the checkout's install and GPU tests."""
    stages = []
    if CHECKOUT is not None:
        install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        stages.append(Stage("install", [*install, "-e", str(CHECKOUT)], 0.04))
    if wheels is not None:
        stages.append(
            Stage(
                "peers",
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--no-index",
                    "--no-deps",
                    "--no-compile",
                    "--upgrade",
                    "--target",
                    str(site),
                    *sorted(str(w) for w in wheels.glob("*.whl")),
                ],
                0.04,
            )
        )
    # every head measurement: both input sets rotated, 5 timed steps after 2 of warm-up
    timed = ("--repeats", "5", "--warmup", "2")
    if call == 1 and CHECKOUT is not None:
        stages.append(
            Stage(
                "gpu-tests",
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "tests/test_gpu.py",
                    "tests/test_autocast.py",
                    "tests/test_benchmarks.py::test_compile_gate_every_shipped_launch_config_is_spill_free",
                ],
                0.3,
            )
        )
    if call == 1:
        selection = ("--presets", "llama3-8b", "--objectives", "cross_entropy", "--tokens", "4096,16384")
        everyone = ("--providers", "all", "--inputs", "random,trained")
        stages.append(_bench("cross-entropy", 0.55, folder, *selection, *everyone, *timed))
        return stages
    peers = "fused-hybrid,liger,trl,naive"
    objectives = "logprobs_entropy,grpo,chord,distill"
    selection = ("--presets", "llama3-8b", "--objectives", objectives, "--tokens", "16384", "--providers", peers)
    stages.append(_bench("rl-objectives", 0.45, folder, *selection, "--inputs", "random", *timed))
    tiles = "fused-hybrid[tile],fused-hybrid[tile,filter]"
    selection = ("--presets", "llama3-8b", "--objectives", "cross_entropy,logprobs_entropy", "--tokens", "16384")
    stages.append(_bench("tile-filter", 0.2, folder, *selection, "--providers", tiles, "--inputs", "trained", *timed))
    stages.append(_bench("long-context", 0.2, folder, "--long-context-only"))
    return stages


def gpu_folder_name() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-GPU"
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")
    return f"{slug}-{datetime.date.today().isoformat()}"


def check_bench_arguments(arguments: list[str]) -> None:
    """The benchmark's own argument checks (names of presets, objectives, providers, inputs), without running."""
    from .arguments import build_parser, parse_names
    from .problems import INPUT_DISTRIBUTIONS, OBJECTIVES, PRESETS
    from .providers import PROVIDERS

    parser = build_parser()
    args = parser.parse_args(arguments)
    parse_names(args.objectives, OBJECTIVES, "objective", parser)
    parse_names(args.presets, list(PRESETS), "preset", parser)
    parse_names(args.providers, list(PROVIDERS), "provider", parser)
    parse_names(args.inputs, INPUT_DISTRIBUTIONS, "input distribution", parser)
    [int(n) for n in args.tokens.split(",")]


def run_stage(stage: Stage, seconds: float, env: dict, log: Path) -> dict:
    begin = time.perf_counter()
    with log.open("w") as output:
        try:
            code = subprocess.run(
                stage.command,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=CHECKOUT or Path.cwd(),
                timeout=max(MIN_STAGE_SECONDS, seconds),
            ).returncode
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            status = f"stopped at its limit ({seconds:.0f} s)"
    return {"stage": stage.name, "status": status, "seconds": round(time.perf_counter() - begin, 1), "log": log.name}


def download_wheels(folder: Path) -> None:
    """The peers' installed versions as wheels for the GPU machine's Python (pure-Python ones: any platform)."""
    from importlib.metadata import version

    folder.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    for package in PEER_PACKAGES:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                f"--python-version={GPU_PYTHON}",
                "--implementation=cp",
                *platforms,
                "-d",
                str(folder),
                f"{package}=={version(package)}",
            ],
            check=True,
        )


def write_summary(folder: Path, results: list[dict], archive_to: Path) -> None:
    """suite.json and summary.md in the call's folder, and the folder's .tar.gz and summary.md in `archive_to`."""
    (folder / "suite.json").write_text(json.dumps(results, indent=2))
    lines = [f"# GPU suite: {folder.name}", "", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']} |" for r in results]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    archive_to.mkdir(parents=True, exist_ok=True)
    partial = archive_to / f".{folder.name}.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    partial.replace(archive_to / f"{folder.name}.tar.gz")  # a cut-off write never leaves half an archive
    if archive_to.resolve() != folder.resolve():
        (archive_to / "summary.md").write_text((folder / "summary.md").read_text())


def build_suite_parser() -> argparse.ArgumentParser:
    """The GPU suite's options (`fused-hybrid bench --help` lists them too)."""
    parser = argparse.ArgumentParser(
        prog="fused-hybrid bench --gpu-suite",
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--call", type=int, choices=sorted(CALL_MINUTES), default=1, help="which of the two calls")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where the call's folder goes")
    parser.add_argument(
        "--archive",
        type=Path,
        help="where the call's .tar.gz and summary.md are written after every stage (None: --out)",
    )
    parser.add_argument("--wheels", type=Path, help="folder of carried wheels of the peers, installed offline")
    parser.add_argument("--minutes", type=float, help="the call's time budget (None: 8 for call 1, 4 for call 2)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan, run nothing")
    parser.add_argument(
        "--download-wheels",
        type=Path,
        metavar="DIR",
        help=f"fetch the peers' wheels for the GPU machine (Python {GPU_PYTHON}) into DIR and stop",
    )
    return parser


def main(argv: list[str] | None = None) -> Path:
    parser = build_suite_parser()
    args = parser.parse_args(argv)
    if args.download_wheels is not None:
        download_wheels(args.download_wheels)
        return args.download_wheels
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {str(args.wheels)!r}: no such folder")
    minutes = CALL_MINUTES[args.call] if args.minutes is None else args.minutes
    folder = args.out / f"{gpu_folder_name()}-call{args.call}"
    site = args.out / "peer-site"
    stages = plan(folder, args.wheels, site, args.call)
    for stage in stages:
        if stage.bench_arguments is not None:
            check_bench_arguments(stage.bench_arguments)
    if args.dry_run:
        if CHECKOUT is None:
            print("installed package, no checkout: the install and gpu-tests stages (they need one) are left out")
        for stage in stages:
            print(f"[{stage.name}] at most {stage.share * minutes:.1f} min: {' '.join(stage.command)}")
        return folder

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(site.resolve()), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(p for p in paths if p))
    deadline = time.perf_counter() + 60 * minutes
    results = []
    for stage in stages:
        left = deadline - time.perf_counter()
        if left < MIN_STAGE_SECONDS:
            results.append({"stage": stage.name, "status": "not run: the call's time was spent", "seconds": 0})
            continue
        print(f"[{stage.name}] ...", flush=True)
        results.append(run_stage(stage, min(left, stage.share * 60 * minutes * 1.5), env, folder / f"{stage.name}.log"))
        print(f"[{stage.name}] {results[-1]['status']} in {results[-1]['seconds']} s", flush=True)
        write_summary(folder, results, args.archive or args.out)
    print(f"results in {folder} and {(args.archive or args.out) / folder.name}.tar.gz")
    return folder


if __name__ == "__main__":
    main()
