"""The `fused-hybrid` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fused-hybrid", description="Logits-free fused LM-head losses.")
    parser.add_argument("command", choices=["bench"], help="bench: the speed and memory suite (see bench --help)")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        from .benchmarks.cli import main as bench_main

        bench_main(argv[1:])
