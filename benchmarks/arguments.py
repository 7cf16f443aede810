"""The benchmark's command-line arguments and their checks, shared by `fused-hybrid bench` (cli.py) and the GPU
suite's dry run (gpu_suite.py)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from .problems import DTYPES, INPUT_DISTRIBUTIONS, OBJECTIVES, PRESETS
from .providers import PROVIDERS

MAX_SWEEP_TOKENS = 1 << 20


def parse_names(text: str, valid, what: str, parser: argparse.ArgumentParser) -> list[str]:
    # commas inside brackets belong to a name ("fused-hybrid[tile,filter]")
    names = list(valid) if text == "all" else [n.strip() for n in re.split(r",(?![^\[]*\])", text) if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        parser.error(f"unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)} (or 'all')")
    return names


def distill_beta(text: str) -> float:
    try:
        beta = float(text)
    except ValueError:
        beta = None
    if beta is None or not 0.0 <= beta <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return beta


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description and epilog as written, every option with its default."""


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    from .gpu_suite import build_suite_parser

    on_gpu = torch.cuda.is_available()
    suite_help = build_suite_parser().format_help()
    parser = argparse.ArgumentParser(
        prog="fused-hybrid bench",
        description=description,
        formatter_class=_HelpFormatter,
        epilog="A GPU session in two calls, `fused-hybrid bench --gpu-suite ...`, takes these options instead:\n\n"
        + suite_help,
    )
    parser.add_argument(
        "--gpu-suite", action="store_true", help="run a GPU session's call (its options are listed below)"
    )
    parser.add_argument("--objectives", default="all", help=f"comma list of {', '.join(OBJECTIVES)}, or all")
    shapes = ", ".join(f"{name} (D {dim}, V {vocab})" for name, (dim, vocab) in PRESETS.items())
    parser.add_argument("--presets", default="llama3-8b" if on_gpu else "tiny", help=f"comma list of: {shapes}")
    parser.add_argument(
        "--tokens", default="4096,16384,65536" if on_gpu else "256,1024", help="comma list of token counts N"
    )
    parser.add_argument(
        "--until-oom",
        action="store_true",
        help=f"keep doubling N past the list until every provider runs out of memory (at most {MAX_SWEEP_TOKENS})",
    )
    parser.add_argument("--providers", default="all", help=f"comma list of {', '.join(PROVIDERS)}, or all")
    parser.add_argument(
        "--inputs",
        default="random,trained" if on_gpu else "random",
        help=f"comma list of input distributions: {', '.join(INPUT_DISTRIBUTIONS)}",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="bfloat16" if on_gpu else "float32", help="the head's dtype"
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=1024 if on_gpu else 64,
        help="tokens per sequence (the sequence objectives use N / seq-len sequences)",
    )
    parser.add_argument(
        "--distill-beta",
        type=distill_beta,
        default=0.5,
        help="the distill objective's beta, TRL's convention: 0 forward KL(teacher || student), 1 reverse KL, "
        "between the generalized JSD with mixture (1 - beta) p_student + beta p_teacher (0.5: the JSD)",
    )
    parser.add_argument("--repeats", type=int, default=10 if on_gpu else 3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3 if on_gpu else 1, help="untimed steps before them")
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu", help="where to run")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="results folder, a subfolder per run (the committed runs live in benchmarks/results)",
    )
    parser.add_argument(
        "--long-context",
        action="store_true",
        help="also run the long-context experiment (real architectures, one training step)",
    )
    parser.add_argument("--long-context-only", action="store_true", help="run only the long-context experiment")
    return parser
