"""What a reported figure was measured on: the machine (CPU model and threads, or the GPU), the versions of the
packages that compute it, and the commit of the checkout it ran from (or the installed package's version)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("fused-hybrid", "torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "verl")


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str = "cpu") -> str:
    """The device a figure was measured on: the GPU's name, or the CPU's model with torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}, {torch.get_num_threads()} threads"


def versions() -> dict[str, str | None]:
    """The installed versions of PACKAGES (None: not installed)."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def commit() -> str | None:
    """The commit of the checkout this package runs from; None when it runs installed (its folder may sit inside
    somebody else's repository: only a checkout of this project counts)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "kernels").is_dir():
        return None
    try:
        top, head = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, check=True, cwd=root
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None
    return head if Path(top).resolve() == root else None


def source() -> str:
    """The commit, or the installed version where no checkout's commit is known."""
    return commit() or f"the installed fused-hybrid {versions()['fused-hybrid']} (no checkout)"


def label(device: torch.device | str = "cpu") -> str:
    """One line naming the machine, the main versions and the source of a figure."""
    found = versions()
    named = ", ".join(f"{p} {v}" for p, v in found.items() if v is not None and p != "fused-hybrid")
    return f"{machine(device)}; {named}; fused-hybrid {found['fused-hybrid']} at {source()}"
