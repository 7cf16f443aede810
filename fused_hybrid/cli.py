"""The `fused-hybrid` command: `demo`, `train CONFIG`, `bench`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark suite parses its own options
        from .benchmarks.cli import main as bench_main

        bench_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="fused-hybrid", description="Logits-free fused LM-head losses.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="SFT vs CHORD on a synthetic addition task, with a report folder")
    demo.add_argument("--out", default="demo-report", help="report folder (default: demo-report)")
    demo.add_argument("--steps", type=int, default=1200, help="optimizer steps per run (default: 1200)")
    train = commands.add_parser("train", help="train with a YAML or TOML config")
    train.add_argument("config", help="a .yaml, .yml or .toml file")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set optim.max_steps=100 (repeatable)")  # fmt: skip
    commands.add_parser("bench", help="the speed and memory benchmark suite (fused-hybrid bench --help)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, steps=args.steps)
    elif args.command == "train":
        from .trainer import ConfigError, HybridTrainer, load_config

        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as error:
            parser.exit(2, f"fused-hybrid train: config error: {error}\n")
        HybridTrainer(config).train()
