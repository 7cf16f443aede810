"""The `fused-hybrid` command: `demo`, `train CONFIG`, `bench`, `--version`."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import textwrap
from pathlib import Path

from . import __version__

HELP_WIDTH = 100


def _wrapped(text: str, indent: str = "", first: str = "") -> str:
    return textwrap.fill(
        text, width=HELP_WIDTH, initial_indent=first or indent, subsequent_indent=indent, break_on_hyphens=False
    )


def _config_keys_help() -> str:
    """The config's keys with their defaults, one paragraph per section (read from the config's dataclasses)."""
    from .trainer.config_reading import config_keys

    lines = ["config keys (section.key=default; set with --set section.key=value):"]
    for section, keys in config_keys().items():
        lines.append(_wrapped(", ".join(keys), indent="    ", first=f"  {section or '(top level)'}: "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark suite parses its own options
        from .benchmarks.cli import main as bench_main

        bench_main(argv[1:])
        return
    from .trainer import registered_modes

    parser = argparse.ArgumentParser(prog="fused-hybrid", description="Logits-free fused LM-head losses.")
    parser.add_argument("--version", action="version", version=f"fused-hybrid {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    from .demo import ADAPT_STEPS, SEEDS

    demo = commands.add_parser(
        "demo",
        help="a base model adapted to a new task by SFT, DFT, GRPO, CHORD, ..., and distilled from a teacher: "
        "accuracy on both tasks and entropy, with a report folder",
    )
    demo.add_argument("--out", default="demo-report", help="report folder (default: demo-report)")
    demo.add_argument(
        "--steps", type=int, default=ADAPT_STEPS, help=f"adaptation steps per method (default: {ADAPT_STEPS})"
    )
    demo.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per method (default: {SEEDS})")
    train = commands.add_parser(
        "train",
        help="train with a YAML or TOML config",
        description=_wrapped(
            f"Train with a YAML or TOML config. Modes (the `mode` key): {', '.join(registered_modes())}. "
            "The config keys, their defaults and ranges are documented in fused_hybrid/trainer/config.py and in the "
            "README's trainer section; `fused-hybrid examples` writes out complete configs. A run resumes from the "
            "newest checkpoint in its output_dir when the settings match (--set resume=false starts fresh there)."
        ),
        epilog=_config_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="a .yaml, .yml or .toml file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set optim.max_steps=100 (repeatable)",
    )
    examples = commands.add_parser(
        "examples", help="write the example scripts and trainer configs into a folder, to read, run and edit"
    )
    examples.add_argument(
        "folder", nargs="?", default="fused-hybrid-examples", help="where (default: fused-hybrid-examples)"
    )
    commands.add_parser("bench", help="the speed and memory benchmark suite (fused-hybrid bench --help)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "demo":
        for name in ("steps", "seeds"):
            if getattr(args, name) < 1:
                parser.exit(2, f"fused-hybrid demo: --{name}: {getattr(args, name)} is out of range; allowed: >= 1\n")
        from .demo import run_demo

        run_demo(args.out, steps=args.steps, seeds=args.seeds)
    elif args.command == "train":
        train_command(parser, args.config, args.overrides)
    elif args.command == "examples":
        examples_command(parser, Path(args.folder))


def examples_command(parser: argparse.ArgumentParser, folder: Path) -> None:
    """Write the shipped examples (fused_hybrid.examples: scripts and configs) into `folder`; an existing file of
    the same name is left as it is and named (exit 2), before anything is written."""
    from importlib.resources import files

    shipped = sorted(
        (
            item
            for item in files("fused_hybrid.examples").iterdir()
            if item.name.endswith((".py", ".yaml")) and item.name != "__init__.py"
        ),
        key=lambda item: item.name,
    )
    taken = [item.name for item in shipped if (folder / item.name).exists()]
    if taken:
        parser.exit(2, f"fused-hybrid examples: error: {folder} already holds {', '.join(taken)}; nothing written\n")
    folder.mkdir(parents=True, exist_ok=True)
    for item in shipped:
        (folder / item.name).write_bytes(item.read_bytes())
    print(f"fused-hybrid examples: wrote {', '.join(item.name for item in shipped)} into {folder}")


def train_command(parser: argparse.ArgumentParser, config_path: str, overrides: list[str]) -> None:
    """Run `train`: a user error (config, data, output folder) prints one line and exits 2, leaving no run folder
    this command created; Ctrl-C saves a checkpoint and says how to resume."""
    from .trainer import HybridTrainer, UserError, load_config

    trainer = None
    output_dir = None
    try:
        config = load_config(config_path, overrides)
        output_dir = Path(config.output_dir)
        existed = output_dir.exists()
        trainer = HybridTrainer(config)
        start = trainer.step
        trainer.train()
    except UserError as error:
        if output_dir is not None and not existed:
            shutil.rmtree(output_dir, ignore_errors=True)
        parser.exit(2, f"fused-hybrid train: error: {error}\n")
    except KeyboardInterrupt:
        step = "" if trainer is None else f" at step {trainer.step}"
        parser.exit(130, f"\nfused-hybrid train: interrupted{step}; run the same command to resume\n")
    if trainer.step > start:
        print(f"fused-hybrid train: done, step {trainer.step} of {config.optim.max_steps}; run folder {output_dir}")
